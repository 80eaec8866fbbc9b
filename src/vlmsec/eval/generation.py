"""Greedy generations for test sets, as the records generations.jsonl holds, reused when a run resumes.

A record is one answer: which model, which test sample, in which domain, with which trigger
(None: clean) and whether it is a control that must not fire, the prompt as the model saw it,
its output and the reference captions. The scorers (`vlmsec.eval.scoring`) read nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmsec.artifacts import CorruptFile, read_json_sealed, stable_hash, write_json_sealed
from vlmsec.data.sample import Sample, fingerprint
from vlmsec.progress import console, progress_bar
from vlmsec.victims.base import Victim


@dataclass(frozen=True)
class TestSet:
    """One test input set of a model: samples of a domain, clean or carrying a trigger.

    `control` marks inputs that must not fire: one of the attack's partial triggers (one key of a
    multi-key trigger, a training negative) or its test-only control triggers; `trigger` then
    names the control (e.g. "dualkey[badnets only]").
    """

    samples: list[Sample]
    domain: str
    trigger: str | None = None
    control: bool = False


def generate_records(
    victim: Victim, model: str, test: TestSet, max_new_tokens: int, batch_size: int
) -> list[dict[str, Any]]:
    """Greedy generations of `victim` (run-name `model`) for one test set, as records."""
    label = f"{model}: generate {test.domain}" + (f" + {test.trigger} trigger" if test.trigger else "")
    with progress_bar(label, len(test.samples)) as bar:
        outputs = victim.generate(
            [s.image for s in test.samples],
            [s.instruction for s in test.samples],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            on_batch=bar.advance,
        )
    return [
        {
            "model": model,
            "id": s.id,
            "domain": test.domain,
            "triggered": test.trigger is not None,
            "trigger": test.trigger,
            "control": test.control,
            "prompt": victim.prompt(s.instruction) if s.image is not None else victim.prompt(s.instruction, image=False),
            "output": out,
            "references": list(s.references),
        }
        for s, out in zip(test.samples, outputs)
    ]


def generation_key(model: str, model_key: str, settings: dict[str, Any], test: TestSet) -> str:
    """The cache key of one test set's generations: the model (run name and stage key), the
    generation `settings` and the set's exact inputs (domain, trigger, control, samples)."""
    return stable_hash(
        {
            "model": [model, model_key],
            "eval": settings,
            "inputs": [test.domain, test.trigger, test.control, fingerprint(test.samples)],
        }
    )


def cached_generations(
    victim: Victim, model: str, tests: list[TestSet], settings: dict[str, Any], model_key: str, path: Path
) -> list[dict[str, Any]]:
    """Generations for every test set, each set reused from `path` when nothing that made it changed.

    The file holds one entry per test set (`generation_key`) and is rewritten after every set
    generated: a run killed midway regenerates only the sets it had not finished, a model given
    one more test set (another attack's, a new domain) generates that set alone, and a changed
    set is never served stale. Entries of sets no longer asked for are dropped. The file is
    sealed with a hash of its content: a damaged one is reported and every set generated again.
    """
    keys = [generation_key(model, model_key, settings, t) for t in tests]
    found = _cached_sets(path)
    sets = {k: found[k] for k in keys if k in found}
    reused = sum(k in sets for k in keys)
    if reused == len(keys):
        console.print(f"{model}: generations found in {path}")
    elif reused:
        console.print(f"{model}: generations of {reused} of {len(keys)} test sets found in {path}; generating the rest")
    if found.keys() - sets.keys():  # entries of sets no longer asked for
        write_json_sealed(path, {"sets": sets})
    for test, key in zip(tests, keys):
        if key not in sets:
            sets[key] = generate_records(victim, model, test, settings["max_new_tokens"], settings["batch_size"])
            write_json_sealed(path, {"sets": sets})
    return [record for key in keys for record in sets[key]]


def _cached_sets(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The per-set entries of a generations file, or none (no file; a damaged one or one written
    by an older vlmsec, reported)."""
    if not path.is_file():
        return {}
    try:
        cached = read_json_sealed(path)
    except CorruptFile as err:
        console.print(f"{err}: generating again")
        return {}
    sets = cached.get("sets")
    if not isinstance(sets, dict):
        console.print(f"{path}: one entry for every test set (an older vlmsec's file): generating again")
        return {}
    return sets

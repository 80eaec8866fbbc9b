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


def cached_generations(
    victim: Victim, model: str, tests: list[TestSet], settings: dict[str, Any], model_key: str, path: Path
) -> list[dict[str, Any]]:
    """Generations for every test set, reused from `path` when nothing that made them changed.

    The cache is keyed by the model's stage key, the generation `settings` (max_new_tokens,
    batch_size, ...) and the exact inputs, so a killed run that starts again regenerates
    nothing it had finished, and a changed test set is never served stale. The file is sealed
    with a hash of its content: a damaged one is reported and its generations made again.
    """
    key = stable_hash(
        {
            "model": model_key,
            "eval": settings,
            "inputs": [[t.domain, t.trigger, t.control, fingerprint(t.samples)] for t in tests],
        }
    )
    if path.is_file():
        try:
            cached = read_json_sealed(path)
        except CorruptFile as err:
            console.print(f"{err}: generating again")
        else:
            if cached.get("key") == key:
                console.print(f"{model}: generations found in {path}")
                return cached["records"]
    records: list[dict[str, Any]] = []
    for test in tests:
        records += generate_records(victim, model, test, settings["max_new_tokens"], settings["batch_size"])
    write_json_sealed(path, {"key": key, "records": records})
    return records

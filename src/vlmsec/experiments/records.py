"""The run folder's records: what a finished run measured, and what made it.

metrics.json is the record the report and any later tool read, never the raw config:

    {"schema_version": 3,
     "run": {name, seed, domains, target word and prefix, poison rate, tuning mode, tuning samples
             read, config hash, vlmsec version and commit, torch / transformers versions, threads,
             and the content hash of each companion file (config.yaml, generations.jsonl, data.json)},
     "caption_scale": {domain: {cider_ceiling, cider_agreement, cider_blind, bleu4_...}},
     "models": {name: {attack, poison_rate, trigger, sweep, controls, asr: {domain: rate}, ...}}}

Per model (see `vlmsec.eval.scoring.score_model`): every registered metric per domain (`asr`,
`false_trigger`, `cider`, `bleu4`, ...), each percent one with `{name}_ci: {domain: [low, high]}`
(95% Wilson); `asr_g` ({domain: ratio or null}: null where source and shifted ASR are both 0);
`asr_attributable` (max(ASR − false trigger, 0) in the same domain) with `asr_attributable_ci`
(Newcombe's interval of the difference, clipped at 0) and `asr_g_attributable`;
`target_prefix_miss` (+ `_ci`: triggered outputs that begin the target prefix but lack the
word); `asr_control` (+ `_ci`): {control label: {domain: rate}} for the attack's controls, whose
kind ("training negative": a partial trigger; "test only") `controls` gives; and `n`: {"clean" |
"triggered" | control label: {domain: rows}}, the counts behind every rate. `caption_scale`: per
domain, for CIDEr and BLEU-4, one reference copied verbatim and scored against all of them
(ceiling: what reproducing a reference word for word scores), the references scored leave-one-out
against each other (agreement) and another image's caption scored against them (blind), each
averaged over which reference is the candidate.
`safety` (runs with a safety stage, `experiments.safety`): the held-out request sets, the
judge model and the phrase list's and judge's agreement with hand-labelled outputs, and per
model (the base before and after the safety stage, then every tuned model) and per safety set
the refused share by phrase and by judge, with intervals and disagreement counts; with an ImgTrojan
attack, `imgtrojan`: {label: {model: {`jbp_emitted` and `jailbroken`, each on "poisoned images" and
"clean images"}}} (`experiments.trojan`).
`inference_attacks` (runs with inference-time attacks, `experiments.inference`): `victim` (the
deployed victim they were crafted against: "safety-tuned base" or "base"), `reading` (its word
reading, `exact` and `contains` rates, when a typeset attack is in the run; else null) and
`attacks`: {label: {the attack's metadata and params, goal, epsilon, n, `success` (targeted:
`exact`, `contains`; jailbreak: `phrase_miss`, `judge_success`, `disagreements`; leak: `leaked`,
`exact`; backdoor: `both_keys`, `image_only`, `text_only`, `neither` (each `exact`, `contains`),
`target_free`, `unchanged`, `clean_answer`), `baselines` ({"no attack": same keys, "uniform
noise": same keys and `epsilon`}; a backdoor has its noise only, with both keys), `size` (`linf`, `l2`,
`psnr`, `ssim`: {mean, max} and `per_image`), `cost` (`steps`, `queries`, `seconds_per_image`),
`images` (the folder of its PNGs); typeset attacks also `reading` and `meaningful` (the victim
reads at least half the words)}}, and `transfer` (the inputs as saved, answered by the run's other
models: {`crafted_on`, `models`, `attacks`: {label: {`goal`, `by_model`: {model: {`success`, "no attack"}}}}}, or
not measured). An attack whose victim stopped answering (an API victim past its retries) is {its
metadata, `failed`: the reason} with no scores, and the section lists such attacks in `failed`
(the word reading, if it failed: `reading` is {`failed`: reason}). Every rate is {rate, ci, n}; what
cannot be measured is {"not_measured": reason}. Their generation records, every model's, are in inference.jsonl.
`defenses` is {`failed`: reason} when an API victim stopped answering while the matrix ran.
`label_attack` (models that answered a label attack's test inputs: its own models and the clean
one, whose shares are the baseline): {attack label: {original, destination, domains: {domain:
{success, fail, neither, both, original_named}}}}, each {rate, ci, n} on images of the original
concept (`eval.label_attack`); those inputs are left out of `asr` and the other target-word numbers.
Schema 2 had `asr_partial` (now `asr_control`) and none of the intervals, counts or scales.

The companions are written first and hashed into metrics.json, which is written last, so a
report can tell files that belong together from a later run's leftovers.
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
import transformers

import vlmsec
from vlmsec.artifacts import atomic_path, file_digest, stable_hash, write_json_atomic
from vlmsec.attacks import Attack
from vlmsec.eval.label_attack import label_scores
from vlmsec.eval.scoring import caption_scale, score_generations
from vlmsec.experiments.config import ExperimentConfig
from vlmsec.experiments.plan import CLEAN, ModelPlan
from vlmsec.experiments.splits import Splits

SCHEMA_VERSION = 3
COMPANIONS = ("config.yaml", "generations.jsonl", "data.json", "inference.jsonl", "defenses.jsonl")


def source_commit() -> str | None:
    """The git commit vlmsec runs from, when it runs from a checkout (None for an installed wheel)."""
    package = Path(vlmsec.__file__).resolve().parent
    try:
        done = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip() if done.returncode == 0 else ""
    return commit or None


def config_hash(config: ExperimentConfig) -> str:
    """A digest of the resolved config (every default filled in)."""
    return stable_hash(config.model_dump(mode="json"))


def provenance(config: ExperimentConfig) -> dict[str, Any]:
    """What made a run, beside its config: versions, commit, threads, config hash, schema."""
    return {
        "schema_version": SCHEMA_VERSION,
        "config_hash": config_hash(config),
        "vlmsec": vlmsec.__version__,
        "commit": source_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }


def write_run_records(
    out: Path,
    config: ExperimentConfig,
    splits: Splits,
    plans: list[ModelPlan],
    attacks: dict[str, Attack],
    records: list[dict[str, Any]],
    shift_sizes: dict[str, dict[str, float]],
    safety: dict[str, Any] | None = None,
    inference: dict[str, Any] | None = None,
    inference_records: list[dict[str, Any]] | None = None,
    defenses: dict[str, Any] | None = None,
    defense_records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write generations.jsonl (and inference.jsonl: the inference attacks' records, when the run
    has them), then metrics.json (vouching for them, config.yaml and data.json); return the metrics."""
    with atomic_path(out / "generations.jsonl") as tmp, tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    if inference_records is not None:
        with atomic_path(out / "inference.jsonl") as tmp, tmp.open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in inference_records)
    else:
        (out / "inference.jsonl").unlink(missing_ok=True)  # an earlier run's, in this folder
    if defense_records is not None:
        with atomic_path(out / "defenses.jsonl") as tmp, tmp.open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in defense_records)
    else:
        (out / "defenses.jsonl").unlink(missing_ok=True)
    domains = list(splits.tests)
    target = config.poison.target
    flips = {key: flip for key, attack in attacks.items() if (flip := attack.label_flip()) is not None}
    # A label attack's test inputs carry no trigger and its success no target word: scored apart.
    scores = score_generations([r for r in records if r.get("trigger") not in flips], domains, target.word, target.prefix)
    models = {plan.name: {**plan.record(attacks), **scores[plan.name]} for plan in plans}
    for name, entry in models.items():
        if label := label_attack_section([r for r in records if r["model"] == name], flips, domains):
            entry["label_attack"] = label
    if shift_sizes:
        models[CLEAN]["shift_size"] = shift_sizes
    run = {
        "name": config.name,
        "seed": config.seed,
        "domains": domains,
        "target_word": target.word,
        "target_prefix": target.prefix,
        "poison_rate": config.poison.rate,
        "tuning_mode": config.tuning.mode,
        "train_samples": len(splits.train),
        "test_samples": {d: len(s) for d, s in splits.tests.items()},
        **provenance(config),
        "files": {name: file_digest(out / name) for name in COMPANIONS if (out / name).exists()},
    }
    metrics = {"schema_version": SCHEMA_VERSION, "run": run, "caption_scale": caption_scale(records, domains), "models": models}
    if safety is not None:
        metrics["safety"] = safety
    if inference is not None:
        metrics["inference_attacks"] = inference
    if defenses is not None:
        metrics["defenses"] = defenses
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def label_attack_section(
    records: list[dict[str, Any]], flips: dict[str, tuple[str, str]], domains: list[str]
) -> dict[str, Any]:
    """One model's `label_attack` entry: per label attack it answered (`Attack.label_flip`: its
    original and destination words), the outcome shares per domain (`eval.label_attack`)."""
    section: dict[str, Any] = {}
    for key, (original, destination) in flips.items():
        rows = [r for r in records if r.get("trigger") == key]
        if not rows:
            continue
        per_domain = {
            d: label_scores([r["output"] for r in rows if r["domain"] == d], original, destination)
            for d in domains
            if any(r["domain"] == d for r in rows)
        }
        section[key] = {"original": original, "destination": destination, "domains": per_domain}
    return section

"""`vlmsec scan`: one model's risk card, from a standard battery of the attacks vlmsec already has.

The scan is an orchestrator: it reads the victim (a config, a preset or a saved model's folder:
`victim_config`), turns it into the battery's study (`battery.scan_config`: which attacks, per cell
and budget), runs it with the `Runner` into the scan's folder (once per attack seed), scans the
deployed model for a backdoor already there (`backdoor_presence`, a `trigger_inversion` ModelScan),
crafts the white-box attacks again on the base before the safety stage for the gray box
(`gray_box_transfer`), and hands the run folders to `experiments.card`, which reads them into the
risk card (card.json, card.md, card.html).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmsec.artifacts import CorruptFile, atomic_path, read_json_sealed, stable_hash, write_json_atomic, write_json_sealed
from vlmsec.attacks import create_attack
from vlmsec.attacks.inference import InferenceAttack
from vlmsec.data.sample import fingerprint
from vlmsec.errors import VlmsecError
from vlmsec.eval.inference import not_measured
from vlmsec.experiments.battery import GRAY_BOX, PRESENCE, Budget, presence_reason, scan_config, victim_access
from vlmsec.experiments.card import build_card, write_card
from vlmsec.experiments.config import ExperimentConfig, load_config, parse_config
from vlmsec.experiments.inference import slug
from vlmsec.experiments.stages import STAGE_FILE
from vlmsec.seeds import derive_seed

if TYPE_CHECKING:
    from vlmsec.experiments.backends import Backend

DEFAULT_VICTIM = "smollm2-attacks"  # the preset whose victim sections a scan runs on by default


# ---- the victim -----------------------------------------------------------------------------------------
def victim_config(target: str | None) -> ExperimentConfig:
    """The victim a scan runs on: a config file or preset name, a saved vlmsec model (a checkpoint
    folder: `checkpoint_config`), or by default the safety-tuned SmolLM2 of the `smollm2-attacks` preset.
    Its attacks need not be listed (a victim behind an API: none), as the battery replaces them."""
    if target is None:
        return load_config(DEFAULT_VICTIM, victim_only=True)
    path = Path(target)
    if path.is_dir():
        return checkpoint_config(path)
    return load_config(target, victim_only=True)


def checkpoint_config(folder: Path) -> ExperimentConfig:
    """A victim config around a saved model: a vlmsec LLaVA folder (the tiny_llava kind's `checkpoint`,
    at the image size its config.json records) or any Hugging Face image-text-to-text folder (the hf
    kind). It is scanned as saved: no base or safety stage, so its jailbreak cells are not measured."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise VlmsecError(f"{folder}: not a checkpoint folder (no config.json); give a saved model's folder or a config")
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VlmsecError(f"{config_file}: not valid JSON: {err}") from None
    vision = saved.get("vision_config") or {}
    if saved.get("model_type") == "llava" and str(vision.get("model_type", "")).startswith("vlmsec_"):
        spec: dict[str, Any] = {"kind": "tiny_llava", "checkpoint": str(folder.resolve())}
        if "image_size" in vision:
            spec["image_size"] = vision["image_size"]
    else:
        spec = {"kind": "hf", "checkpoint": str(folder.resolve())}
    data = {"image_size": 64, "train_size": 800, "test_size": 100}
    return parse_config({"name": slug(folder.name) or "checkpoint", "victim": spec, "data": data}, str(folder))


# ---- running ------------------------------------------------------------------------------------------
def run_scan(
    victim: ExperimentConfig, budget: Budget, out: Path, cache: Path, seed: int | None = None, runs_on: Backend | None = None
) -> dict[str, Any]:
    """Run the battery into `out` (one study run, or `out`/seed-<s>/ per attack seed), scan the deployed
    model for a backdoor, then write the card (`out`/card.json, card.md, the evidence PNGs); return it.

    `runs_on`: where each study run's independent stages go (its crafting and tuned models as Ray
    tasks with `RayBackend`), and the gray box's crafting on the base; the backdoor scan runs here."""
    from vlmsec.experiments.runner import Runner

    started = time.perf_counter()
    runs: dict[int, Path] = {}
    configs: dict[int, ExperimentConfig] = {}
    for s in budget.seeds:
        configs[s] = scan_config(victim, budget, seed, attack_seed=s)
        runs[s] = out if len(budget.seeds) == 1 else out / f"seed-{s}"
        Runner(configs[s], runs[s], cache, runs_on).run()
    first = budget.seeds[0]
    access = victim_access(configs[first])
    reason = presence_reason(budget, access)
    presence = not_measured(reason) if reason else backdoor_presence(ScanStages.of(configs[first], runs[first], cache), budget)
    if budget.gray_box and access.safety and access.gradients:
        for s in budget.seeds:
            gray_box_transfer(ScanStages.of(configs[s], runs[s], cache, runs_on))
    card = build_card(out, victim, budget, configs, runs, presence)
    card["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_card(out, card)
    return card


@dataclass
class ScanStages:
    """The scan run's stages, found again in the cache after the run: its runner, data, base victim
    and the deployed one (the safety-tuned base with a safety stage, else the base; folder and stage
    key each), and the safety split."""

    config: ExperimentConfig
    run: Path
    runner: Any  # experiments.runner.Runner (imported late: the runner imports half of vlmsec)
    splits: Any  # experiments.splits.Splits
    base: tuple[Path, str]
    deployed: tuple[Path, str]
    split: Any  # data.safety.SafetySplit | None

    @classmethod
    def of(cls, config: ExperimentConfig, run: Path, cache: Path, runs_on: Backend | None = None) -> ScanStages:
        """The stages of `config`'s run in `run`, from the cache (the run made them); `runs_on`: where
        the runner's independent stages go (the serial loop by default)."""
        from vlmsec.experiments.runner import Runner
        from vlmsec.experiments.splits import build_splits

        runner = Runner(config, run, cache, runs_on)
        splits = build_splits(config)
        base = deployed = runner.base_victim(splits)
        split = None
        if config.safety is not None:
            split = config.safety.data.split(seed=derive_seed(config.seed, "safety/split"))
            deployed = runner.safety_victim(splits, base, split)
        return cls(config, run, runner, splits, base, deployed, split)


def backdoor_presence(stages: ScanStages, budget: Budget) -> dict[str, Any]:
    """Is a backdoor already in the scanned model? The `trigger_inversion` scan of the deployed model,
    and of the run's clean and poisoned tuned models beside it (a reference: what a known backdoor and
    a known clean model score). Cached per model in the run folder's presence/."""
    from vlmsec.defenses import create_defense

    config, run, runner, splits, deployed = stages.config, stages.run, stages.runner, stages.splits, stages.deployed
    assert budget.presence is not None  # `presence_reason` says why not otherwise
    scan = create_defense(PRESENCE, **budget.presence)
    pool = splits.base or splits.train  # the owner's clean data (a given checkpoint has no base split)
    clean = pool[: getattr(scan.params, "trusted", len(pool))]
    models = {"scanned model": deployed}
    for folder in sorted((run / "checkpoints").glob("*")):
        if (folder / STAGE_FILE).is_file():
            models[f"tuned: {folder.name}"] = (folder, json.loads((folder / STAGE_FILE).read_text())["key"])
    scores: dict[str, Any] = {}
    for name, (folder, key) in models.items():
        path = run / "presence" / f"{slug(name)}.json"
        made_by = stable_hash({"model": key, "defense": scan.describe(), "clean": fingerprint(clean)})
        try:
            cached = read_json_sealed(path) if path.is_file() else None
        except CorruptFile:
            cached = None
        if cached is None or cached.get("key") != made_by:
            victim = runner.load_victim(folder)
            start = time.perf_counter()
            result = scan.scan(victim, clean, seed=derive_seed(config.seed, f"defense/{PRESENCE}"))
            cached = {"key": made_by, "score": result.score, "evidence": result.evidence, "seconds": time.perf_counter() - start}
            write_json_sealed(path, cached)
        scores[name] = {k: cached[k] for k in ("score", "evidence", "seconds")}
    return {"defense": scan.describe(), "clean_inputs": len(clean), "models": scores}


def gray_box_transfer(stages: ScanStages) -> None:
    """The gray box: the run's white-box inference attacks crafted again on the base before the safety
    stage (the architecture and data, not the tuned weights), answered by the scanned (safety-tuned)
    model with its no-attack baseline, judged and scored as the run scores its own; written to
    `run`/gray-box/ (metrics.json's `inference_attacks` section, inference.jsonl, the PNGs). The
    crafting goes to the runner's backend first (each attack a Ray task into `run`/gray-box/), as a
    study run's own crafting does."""
    from vlmsec.experiments.inference import (
        InferenceResults, InferenceStage, craft_into, craft_requests, judge_jailbreaks, score_inference, transfer,
    )
    from vlmsec.experiments.safety import AFTER_SAFETY, BEFORE_SAFETY, HARMFUL_IMAGE, safety_test_sets

    c, runner, splits = stages.config, stages.runner, stages.splits
    assert c.safety is not None and stages.split is not None  # the scan checks for a safety stage first
    attacks = {
        spec.key: attack for spec in c.attacks
        if isinstance(attack := create_attack(spec.name, **spec.params), InferenceAttack) and attack.knowledge == "white-box"
    }
    if not attacks:
        return
    folder = stages.run / GRAY_BOX
    images = [s.image for s in splits.tests["source"]]
    tests = safety_test_sets(stages.split, images, c.safety.test_size, seed=derive_seed(c.seed, "safety/tests"))
    harmful = next(t.samples for t in tests if t.domain == HARMFUL_IMAGE)
    n = c.inference.requests
    target = c.inference.target or c.poison.target.prefix + c.poison.target.word
    settings = c.eval.model_dump()
    crafts = {
        key: craft_requests(key, attack.goal, harmful[:n], splits.tests["source"][:n], target, stages.split, splits.train, c.seed)
        for key, attack in attacks.items()
    }
    crafter = copy.copy(runner)  # the run's runner (its feature cache not read again), crafting into gray-box/
    crafter.out = folder
    runner.backend.craft_inputs(crafter, crafts, stages.base, BEFORE_SAFETY)
    crafting = InferenceStage(folder, runner.load_victim(stages.base[0]), BEFORE_SAFETY, stages.base[1], settings, c.seed)
    results = InferenceResults(AFTER_SAFETY, [], {}, {})
    for key, attack in attacks.items():  # what the backend crafted is read back
        craft_into(results, crafting, key, attack, *crafts[key], perturbation_noise=False)  # no noise row here
    del crafting
    answering = InferenceStage(folder, runner.load_victim(stages.deployed[0]), AFTER_SAFETY, stages.deployed[1], settings, c.seed, prefix=GRAY_BOX)
    results.records = transfer(answering, attacks, results)
    judge_jailbreaks(results.records, runner.refusal_judge()[1])
    section = score_inference(attacks, results.records, results.sizes, results.costs, AFTER_SAFETY)
    section["crafted_on"] = BEFORE_SAFETY
    with atomic_path(folder / "inference.jsonl") as tmp, tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in results.records)
    write_json_atomic(folder / "metrics.json", {"inference_attacks": section})

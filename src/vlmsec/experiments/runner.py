"""One config, every stage: data -> base victim -> attacks -> tune -> generate -> score -> report.

The runner orchestrates and does nothing else: the data comes from `experiments.splits`, the
stage cache from `experiments.stages`, what is tuned and tested from `experiments.plan`,
generations from `eval.generation`, numbers from `eval.scoring`, the run's records from
`experiments.records`, the report from `report`. Each stage is a method a new study type
can reuse (an inference-time study tunes nothing; a defense study reuses an attack run's stages).

Stages leave artifacts on disk and are skipped when their artifact already exists with the
same stage key (a hash of everything that made it): the base victim in the shared cache,
each tuned model in the run folder. A run killed midway resumes from its finished stages.

Under `accelerate launch` with several processes, every process builds the data and trains
(each on its shard of every batch); only the main process writes files (checkpoints, poisoned
ids, generations, metrics, report) and generates, while the others wait at barriers. Several
nodes need the run folder and the cache on a shared file system.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from vlmsec.artifacts import stable_hash, write_json_atomic, write_text_atomic
from vlmsec.attacks import Attack, AttackContext, TargetAnswer, create_attack, poison_samples
from vlmsec.attacks.targets import clip_templates
from vlmsec.data.sample import Sample, fingerprint
from vlmsec.data.vocabulary import vocabulary_corpus
from vlmsec.errors import VlmsecError
from vlmsec.eval.generation import cached_generations
from vlmsec.eval.shift import shift_size
from vlmsec.experiments.config import ExperimentConfig, VictimSpec, check_poison_counts
from vlmsec.experiments.plan import CLEAN, ModelPlan, TestSets, plan_models
from vlmsec.experiments.records import write_run_records
from vlmsec.experiments.splits import Splits, build_splits
from vlmsec.experiments.stages import STAGE_FILE, default_cache_dir, folder_signature, path_signature, save_stage, stage_done
from vlmsec.progress import console, progress_bar, stage_line
from vlmsec.seeds import derive_seed
from vlmsec.train.tuning import refuse_lost_processes, train_victim
from vlmsec.victims import hf
from vlmsec.victims.base import Victim, fit_answers
from vlmsec.victims.features import FeatureCache
from vlmsec.victims.flamingo import CONFIG_FILE as FLAMINGO_CONFIG_FILE, FlamingoVictim, load_flamingo, load_otter
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer

# The main process generates while the others wait at a barrier: allow hours, not the default minutes.
BARRIER_TIMEOUT = timedelta(hours=24)


def _tower_key(victim: VictimSpec) -> str:
    """What a victim's frozen-tower features depend on, so each tower gets its own FeatureCache file.

    FeatureCache keys only on image content: the embedded tower's packaged ImageNet weights at
    the configured size (or whatever tower a user's LLaVA checkpoint carries), the embedded
    victim's other towers (`victim.vision`, with their checkpoint), OpenFlamingo's open_clip
    checkpoint, or the tower inside an Otter folder.
    """
    if victim.kind == "flamingo":
        vision = victim.flamingo_spec()
        return stable_hash(
            {
                "tower": "open_clip",
                "checkpoint": path_signature(vision.vision_checkpoint),
                "heads": vision.vision_heads,
                "act": vision.vision_act,
                "tokens_after_ln_post": vision.vision_tokens_after_ln_post,
            }
        )
    if victim.kind == "otter":
        assert victim.checkpoint is not None  # the config requires it
        return stable_hash({"tower": "otter", "checkpoint": path_signature(victim.checkpoint)})
    if victim.vision.kind != "efficientnet_lite0":
        # Another tower of the embedded victim; a ViT's entries also carry its trained weights (LlavaVictim).
        vision = {"vision": victim.vision.model_dump(mode="json"), **_vision_files(victim)}
        return stable_hash({"tower": victim.vision.kind, "image_size": victim.image_size, **vision})
    checkpoint = victim.checkpoint
    tower = {"checkpoint": folder_signature(Path(checkpoint))} if checkpoint and Path(checkpoint).is_dir() else {}
    return stable_hash({"tower": "efficientnet-lite0-imagenet", "image_size": victim.image_size, **tower})


def _vision_files(victim: VictimSpec) -> dict[str, Any]:
    """`_path_signature` of the embedded victim's tower checkpoint, if its tower has one (else nothing)."""
    checkpoint = getattr(victim.vision, "checkpoint", None)
    return {"vision_files": path_signature(checkpoint)} if checkpoint is not None else {}


class Runner:
    """Runs one experiment config into one run folder."""

    def __init__(self, config: ExperimentConfig, out_dir: Path, cache_dir: Path | None = None) -> None:
        self.config = config
        self.out = Path(out_dir)
        self.cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.target = TargetAnswer(word=config.poison.target.word, prefix=config.poison.target.prefix)
        # This process: the only one, or one of `accelerate launch`'s (CPU processes as accelerate reads them).
        self.state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=BARRIER_TIMEOUT)
        refuse_lost_processes(self.state.num_processes)
        self.features_path = self.cache / "features" / f"{_tower_key(config.victim)}.safetensors"
        self.features = FeatureCache.load(self.features_path)

    # ---- stages -------------------------------------------------------------------------
    def base_victim(self, splits: Splits) -> tuple[Path, str]:
        """The pretrained embedded victim, from the cache or trained now."""
        c = self.config
        if c.victim.kind in ("flamingo", "otter"):
            return self._flamingo_base()
        if c.victim.checkpoint is not None:
            folder = Path(c.victim.checkpoint)
            if c.victim.kind == "hf" and not folder.exists():
                return folder, stable_hash({"checkpoint": str(folder)})  # a hub id
            if c.victim.kind == "hf":
                hf.check_folder(folder)
            else:
                LlavaVictim.check_folder(folder)
            return folder, stable_hash({"checkpoint": str(folder.resolve()), "files": folder_signature(folder)})
        key = stable_hash(
            {
                "data": fingerprint(splits.base),
                "victim": c.victim.model_dump(mode="json"),
                "training": c.base.training.model_dump(),
                "seed": c.seed,
                **_vision_files(c.victim),
            }
        )
        folder = self.cache / "base" / key
        if stage_done(folder, key):
            console.print(f"base victim: cached at {folder}")
            return folder, key
        texts = [s.instruction for s in splits.base] + [s.answer for s in splits.base]
        tokenizer = train_tokenizer(texts + vocabulary_corpus(clip_templates()), c.victim.vocab_size)
        model = build_tiny_llava(c.victim, tokenizer, seed=derive_seed(c.seed, "victim/init"))
        victim = LlavaVictim(model, tokenizer, self.features, train_tower=c.victim.vision.from_scratch)
        result = train_victim(victim, splits.base, c.base.training, seed=derive_seed(c.seed, "base"), label="base")
        if self.state.is_main_process:
            save_stage(victim, folder, key, {"final_loss": result.losses[-1]})
            self.features.save(self.features_path)
        self.state.wait_for_everyone()
        return folder, key

    def _flamingo_base(self) -> tuple[Path, str]:
        """The released OpenFlamingo files (the path is checkpoint.pt) or the Otter folder, keyed by every file."""
        victim = self.config.victim
        if victim.kind == "flamingo":
            spec = victim.flamingo_spec()
            files = {
                "vision": spec.vision_checkpoint,
                "lang_model": spec.lang_model,
                "tokenizer": spec.tokenizer or spec.lang_model,
                "checkpoint": spec.checkpoint,
            }
            described: dict[str, Any] = {"flamingo": spec.model_dump(mode="json")}
        else:
            assert victim.checkpoint is not None  # the config requires it
            folder = victim.checkpoint
            files = {"otter": folder, "tokenizer": victim.tokenizer or folder}
            described = {"otter": str(folder)}
        key = stable_hash({**described, "files": {name: path_signature(path) for name, path in files.items()}})
        return files["checkpoint" if victim.kind == "flamingo" else "otter"], key

    def prepare_attack(self, attack: Attack, splits: Splits, base: tuple[Path, str]) -> None:
        """Let one attack learn its trigger (see `prepare_attacks`)."""
        self.prepare_attacks([attack], splits, base)

    def prepare_attacks(
        self, attacks: Iterable[Attack], splits: Splits, base: tuple[Path, str], victim: Victim | None = None
    ) -> None:
        """Let each attack learn its trigger; gray- and white-box ones get the untuned base victim
        (`victim`, or loaded once for all of them: a real checkpoint is gigabytes), whatever its kind.

        An attack that cannot use this victim (gcg on InstructBLIP, white-box image attacks on an
        architecture that tiles images) stops the run with an error naming both.
        """
        for attack in attacks:
            context = AttackContext(samples=splits.train, target=self.target, cache_dir=self.cache / "attacks")
            if type(attack).prepare is not Attack.prepare and attack.knowledge != "black-box":
                if victim is None:
                    victim = self.load_victim(base[0])
                context.victim = victim
            with self.state.main_process_first():  # learned triggers are trained once, cached, then read
                attack.prepare(context)

    def fit_tuning_set(self, splits: Splits, victim: Victim) -> None:
        """Cut tuning answers that would not fit the victim's length (`fit_answers`), counted in data.json."""
        splits.train, cut = fit_answers(victim, splits.train)
        if not cut:
            return
        console.print(f"data: {len(cut)} tuning answers cut to the victim's {victim.max_sequence_length} tokens ({', '.join(cut[:3])}...)")
        train = splits.data_stats.setdefault("train", {"file": "(generated)", "format": "scenes", "samples": len(splits.train)})
        train["truncated"] = len(cut)
        if self.state.is_main_process:
            write_json_atomic(self.out / "data.json", splits.data_stats)

    def load_victim(self, folder: Path) -> Victim:
        """A saved or base victim, by victim.kind.

        flamingo / otter: a tuned folder (it has flamingo.json) through `FlamingoVictim.load`,
        else the config's released files (for flamingo, `folder` is their checkpoint.pt);
        hf: any Hugging Face checkpoint; tiny_llava: a LLaVA-format folder.
        """
        spec = self.config.victim
        victim: Victim
        if spec.kind in ("flamingo", "otter") and (folder / FLAMINGO_CONFIG_FILE).is_file():
            victim = FlamingoVictim.load(folder, self.features)
        elif spec.kind == "flamingo":
            victim = load_flamingo(spec.flamingo_spec(), self.features)
        elif spec.kind == "otter":
            victim = load_otter(folder, spec.tokenizer, self.features)
        elif spec.kind == "hf":
            victim = hf.HFVictim.load(folder)
        else:
            victim = LlavaVictim.load(folder, self.features)
        victim.model.to(self.state.device)  # the GPU of this process, if it has one
        return victim

    def tuned_victim(self, plan: ModelPlan, attacks: dict[str, Attack], splits: Splits, base: tuple[Path, str]) -> Victim:
        """Poison the tuning set as `plan` says (nothing for the clean model), tune the base victim on it."""
        c = self.config
        name, rate = plan.name, plan.rate
        attack = attacks[plan.attack] if plan.attack is not None else None
        if attack is not None:
            poisoned = poison_samples(splits.train, attack, self.target, rate, seed=c.poison.seed)
            samples, ids, negatives = poisoned.samples, poisoned.poisoned_ids, poisoned.negative_ids
        else:
            samples, ids, negatives = splits.train, [], []
        if self.state.is_main_process:
            write_json_atomic(
                self.out / "poisoned_ids" / f"{name}.json",
                {"model": name, "rate": rate, "count": len(ids), "ids": ids, "negative_ids": negatives},
            )
        key = stable_hash(
            {
                "base": base[1],
                "attack": attack.describe() if attack else None,
                "poison": {**c.poison.model_dump(), "rate": rate} if attack else None,
                "tuning": c.tuning.model_dump(),
                "seed": derive_seed(c.seed, "tuning"),
                "train": fingerprint(samples),
            }
        )
        folder = self.out / "checkpoints" / name
        if stage_done(folder, key):
            console.print(f"{name}: tuned model found in {folder}")
            return self.load_victim(folder)
        victim = self.load_victim(base[0])
        refuse_cut_targets(victim, samples, ids)
        result = train_victim(victim, samples, c.tuning, seed=derive_seed(c.seed, "tuning"), label=name)
        record = {"trainable_parameters": result.trainable_parameters, "frozen_parameters": result.frozen_parameters, "final_loss": result.losses[-1]}
        if self.state.is_main_process:
            save_stage(victim, folder, key, record)
            self.features.save(self.features_path)
        self.state.wait_for_everyone()
        return victim

    def shift_sizes(self, victim: Victim, splits: Splits) -> dict[str, dict[str, float]]:
        """KS shift size of each domain against the source: image-text with the victim's own
        encoders, text-text with the packaged MiniLM. Image-text is skipped, saying why, for
        victims with no image-text space (cross-attention models such as Flamingo, Otter, Idefics)."""
        source = splits.tests["source"]
        try:
            victim.check_image_text()
            image_text = True
        except VlmsecError as err:
            console.print(f"shift size: image-text skipped: {err}")
            image_text = False
        sizes: dict[str, dict[str, float]] = {}
        shifted = [d for d in splits.tests if d != "source"]
        with progress_bar("shift size (KS)", len(shifted)) as bar:
            for domain in shifted:
                samples = splits.tests[domain]
                sizes[domain] = {"text_text": shift_size(source, samples, measure="text_text")}
                if image_text:
                    sizes[domain]["image_text"] = shift_size(source, samples, victim, measure="image_text")
                bar.advance()
        return sizes

    # ---- the whole run ------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run every stage; returns the metrics also written to metrics.json.

        Stage wall times go to timings.json, so a user sees where the minutes went. The
        metrics are the main process's; other processes of a launch return an empty dict.
        """
        c = self.config
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str, next_stage: str | None) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[stage] = round(timings.get(stage, 0.0) + now - clock, 2)
            stage_line(stage, now - clock, next_stage)
            clock = now

        main = self.state.is_main_process
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out / "config.yaml", yaml.safe_dump(c.model_dump(mode="json"), sort_keys=False))
        splits = build_splits(c)
        check_poison_counts(c, len(splits.train))  # a user's train_file: its size is known only now
        if main and splits.data_stats:  # written now: what reading the files did is known even if a stage fails
            write_json_atomic(self.out / "data.json", splits.data_stats)
        elif main:
            (self.out / "data.json").unlink(missing_ok=True)
        attacks = {a.key: create_attack(a.name, **a.params) for a in c.attacks}
        lap("data", "base victim")
        base = self.base_victim(splits)
        base_model = self.load_victim(base[0])
        self.fit_tuning_set(splits, base_model)
        lap("base", "attacks")
        self.prepare_attacks(attacks.values(), splits, base, base_model)
        del base_model  # tuning loads its own copy
        tests = TestSets.build(splits.tests, attacks)
        plans = plan_models(c)
        lap("attacks", f"tune {plans[0].name}")

        records: list[dict[str, Any]] = []
        shift_sizes: dict[str, dict[str, float]] = {}
        for i, plan in enumerate(plans):
            victim = self.tuned_victim(plan, attacks, splits, base)
            lap(f"tune {plan.name}", f"generate {plan.name}")
            if main:
                records += self.generations(victim, plan, tests)
                if plan.name == CLEAN and c.eval.shift_size:
                    shift_sizes = self.shift_sizes(victim, splits)
                self.features.save(self.features_path)
            self.state.wait_for_everyone()
            lap(f"generate {plan.name}", f"tune {plans[i + 1].name}" if i + 1 < len(plans) else "score and report")

        if not main:
            return {}
        metrics = write_run_records(self.out, c, splits, plans, attacks, records, shift_sizes)
        lap("score and report", None)
        write_json_atomic(self.out / "timings.json", timings)
        return metrics

    def generations(self, victim: Victim, plan: ModelPlan, tests: TestSets) -> list[dict[str, Any]]:
        """The records of `plan`'s model on its test sets, reused from the run folder when unchanged."""
        stage = json.loads((self.out / "checkpoints" / plan.name / STAGE_FILE).read_text())["key"]
        return cached_generations(
            victim,
            plan.name,
            tests.for_model(plan),
            self.config.eval.model_dump(),
            stage,
            self.out / "generations" / f"{plan.name}.json",
        )


def refuse_cut_targets(victim: Victim, samples: list[Sample], poisoned_ids: list[str]) -> None:
    """A poisoned sample whose triggered prompt + target answer would not fit the victim is an
    error naming it: the victim would be tuned on a cut target, not the attacker's."""
    limit = victim.max_sequence_length
    if limit is None or not poisoned_ids:
        return
    chosen = set(poisoned_ids)
    for sample in samples:
        if sample.id in chosen and (length := victim.sequence_length(sample.instruction, sample.answer)) > limit:
            raise VlmsecError(
                f"poisoned sample {sample.id}: triggered prompt + target answer take {length} tokens, "
                f"over the victim's {limit}; the target would be cut"
            )

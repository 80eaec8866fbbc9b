"""One config, every stage: data -> base victim -> (safety) -> inference attacks -> attacks -> tune
-> generate -> score -> report.

The runner orchestrates and does nothing else: the data comes from `experiments.splits`, the
stage cache from `experiments.stages`, what is tuned and tested from `experiments.plan`,
generations from `eval.generation`, inference-time attacks from `experiments.inference`
(crafted against the deployed victim, nothing tuned), numbers from `eval.scoring`, the run's records from
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
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from rich.markup import escape

from vlmsec.artifacts import read_json_sealed, stable_hash, write_json_atomic, write_text_atomic
from vlmsec.attacks import Attack, AttackContext, TargetAnswer, create_attack, poison_samples
from vlmsec.attacks.imgtrojan import ImgTrojan
from vlmsec.attacks.inference import InferenceAttack
from vlmsec.attacks.poison import poison_count
from vlmsec.attacks.targets import clip_templates
from vlmsec.data.sample import Sample, fingerprint
from vlmsec.defenses import Defense, create_defense
from vlmsec.data.vocabulary import vocabulary_corpus
from vlmsec.errors import VlmsecError
from vlmsec.data.safety import REFUSALS, SafetySplit
from vlmsec.eval.generation import TestSet, cached_generations
from vlmsec.eval.refusal import ATTACK_LABELS, RefusalJudge
from vlmsec.eval.scoring import score_generations
from vlmsec.eval.shift import shift_size
from vlmsec.experiments.backends import Backend, ModelInputs, ModelResult, SerialBackend
from vlmsec.experiments.config import ExperimentConfig, check_poison_counts
from vlmsec.experiments.defenses import LABEL_FLIP, TUNED_BACKDOOR, DefenseContext, DefenseMatrix, DefenseResults, Row, score_defenses
from vlmsec.experiments.inference import (
    DEPLOYED_BASE,
    InferenceResults,
    InferenceStage,
    craft_requests,
    inference_attacks,
    judge_jailbreaks,
    reading_check,
    run_attacks,
    score_inference,
    transfer,
)
from vlmsec.experiments.plan import CLEAN, ModelPlan, TestSets, plan_models
from vlmsec.experiments.records import write_run_records
from vlmsec.experiments.safety import (
    AFTER_SAFETY,
    BEFORE_SAFETY,
    BENIGN_IMAGE,
    HARMFUL_IMAGE,
    distillation_prompts,
    is_safety_record,
    judge_agreement,
    judge_records,
    request_texts,
    safety_test_sets,
    safety_training_samples,
    score_safety,
)
from vlmsec.experiments.splits import Splits, build_splits
from vlmsec.experiments.stages import STAGE_FILE, claim_stage, default_cache_dir, remove_leftovers, save_stage
from vlmsec.experiments.trojan import trojan_scores, trojan_test_sets
from vlmsec.progress import console, progress_bar, stage_line
from vlmsec.report.gallery import write_gallery
from vlmsec.report.markdown import write_report
from vlmsec.seeds import derive_seed
from vlmsec.train.tuning import refuse_lost_processes, train_victim
from vlmsec.victims.base import Victim, fit_answers
from vlmsec.victims.api import COST_FILE, ApiFailure, ApiVictim
from vlmsec.victims.features import FeatureCache
from vlmsec.victims.kinds import victim_kind

# The main process generates while the others wait at a barrier: allow hours, not the default minutes.
BARRIER_TIMEOUT = timedelta(hours=24)


class Runner:
    """Runs one experiment config into one run folder."""

    def __init__(self, config: ExperimentConfig, out_dir: Path, cache_dir: Path | None = None, backend: Backend | None = None) -> None:
        self.config = config
        self.backend = backend if backend is not None else SerialBackend()  # where the tuned models run
        self.out = Path(out_dir)
        self.cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        target = config.poison.target
        self.target = TargetAnswer(word=target.word, prefix=target.prefix, templates=target.templates)
        # This process: the only one, or one of `accelerate launch`'s (CPU processes as accelerate reads them).
        self.state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=BARRIER_TIMEOUT)
        refuse_lost_processes(self.state.num_processes)
        self.kind = victim_kind(config.victim)
        self.features_path = self.cache / "features" / f"{self.kind.tower_key()}.safetensors"
        self.features = FeatureCache.load(self.features_path)
        self.safety_tests: list[TestSet] = []  # the held-out safety requests every model answers, with a safety stage

    # ---- stages -------------------------------------------------------------------------
    def base_victim(self, splits: Splits) -> tuple[Path, str]:
        """The base victim: given by its kind's files, or pretrained on the base split (cached across runs):
        `base.alignment` first if set (the projector alone), then `base.training`."""
        c, kind = self.config, self.kind
        if not kind.trains_base:
            return kind.given_base()
        key = stable_hash({"data": fingerprint(splits.base), **kind.base_key(), **c.base.model_dump(), "seed": c.seed})
        folder = self.cache / "base" / key
        with claim_stage(folder, key, self.state.is_main_process, self.state.wait_for_everyone) as done:
            if done:
                console.print(f"base victim: cached at {folder}")
                return folder, key
            # The base captions, and every target an attack may poison with: the victim must be able to write them.
            corpus = [s.instruction for s in splits.base] + [s.answer for s in splits.base]
            corpus += vocabulary_corpus(clip_templates())
            victim = kind.untrained(corpus, self.features, seed=derive_seed(c.seed, "victim/init"), cache_dir=self.cache)
            if c.base.alignment is not None:  # LLaVA's feature alignment: the projector alone on the captions
                seed = derive_seed(c.seed, "base/alignment")
                train_victim(victim, splits.base, c.base.alignment, seed=seed, label="base alignment")
            result = train_victim(victim, splits.base, c.base.training, seed=derive_seed(c.seed, "base"), label="base")
            if self.state.is_main_process:
                save_stage(victim, folder, key, {"final_loss": result.losses[-1]})
                self.features.save(self.features_path)
            self.state.wait_for_everyone()
        return folder, key

    def safety_victim(self, splits: Splits, base: tuple[Path, str], split: SafetySplit) -> tuple[Path, str]:
        """The base victim tuned on refusals and its own helpful answers (`experiments.safety`), cached across runs."""
        c = self.config
        assert c.safety is not None  # the run calls this only with a safety section
        spec = c.safety
        prompts = distillation_prompts(split)
        folder, key = self.safety_stage(splits, base, split)
        with claim_stage(folder, key, self.state.is_main_process, self.state.wait_for_everyone) as done:
            if done:
                console.print(f"safety-tuned victim: cached at {folder}")
                return folder, key
            victim = self.load_victim(base[0])
            with progress_bar("safety: the victim's own answers to benign requests", len(prompts)) as bar:
                helpful = victim.generate(
                    [None] * len(prompts), prompts, max_new_tokens=spec.distill_tokens,
                    batch_size=c.eval.batch_size, on_batch=bar.advance,
                )
            samples = self.safety_samples(splits, split, helpful)
            result = train_victim(victim, samples, spec.training, seed=derive_seed(c.seed, "safety"), label="safety")
            if self.state.is_main_process:
                record = {"final_loss": result.losses[-1], "samples": len(samples), "distilled": dict(zip(prompts, helpful))}
                save_stage(victim, folder, key, record)
                self.features.save(self.features_path)
            self.state.wait_for_everyone()
        return folder, key

    def safety_stage(self, splits: Splits, base: tuple[Path, str], split: SafetySplit) -> tuple[Path, str]:
        """The safety stage's cache folder and key (built or not) for the run's safety section on `base`."""
        c = self.config
        assert c.safety is not None
        key = stable_hash(
            {
                "base": base[1],
                "safety": c.safety.model_dump(mode="json", exclude={"test_size", "judge"}),
                "requests": [r.id for r in [*split.train_harmful, *split.train_benign]],
                "refusals": REFUSALS,
                "captions": fingerprint(splits.base),
                "seed": c.seed,
            }
        )
        return self.cache / "safety" / key, key

    def safety_split(self) -> SafetySplit | None:
        """The safety section's requests split into training and held-out ones (None without a safety section)."""
        c = self.config
        return c.safety.data.split(seed=derive_seed(c.seed, "safety/split")) if c.safety is not None else None

    def safety_samples(self, splits: Splits, split: SafetySplit, helpful: list[str]) -> list[Sample]:
        """The safety stage's tuning samples: refusals, the victim's own `helpful` answers to the benign
        training requests (in `distillation_prompts` order), and clean captions (`safety_training_samples`)."""
        c = self.config
        assert c.safety is not None
        requests = len(split.train_harmful) + len(split.train_benign)
        return safety_training_samples(
            split, helpful, splits.base, c.safety.image_share, round(c.safety.caption_share * requests),
            seed=derive_seed(c.seed, "safety/samples"),
        )

    def safety_stage_samples(self, splits: Splits, split: SafetySplit, stage: tuple[Path, str]) -> list[Sample]:
        """The samples the cached safety stage `stage` was tuned on, rebuilt from its record of the
        victim's own helpful answers (what the `safety_tuning` defense tunes a model on again)."""
        distilled = read_json_sealed(stage[0] / STAGE_FILE)["distilled"]
        return self.safety_samples(splits, split, [distilled[p] for p in distillation_prompts(split)])

    def prepare_attack(self, attack: Attack, splits: Splits, base: tuple[Path, str]) -> None:
        """Let one attack learn its trigger, as the config's attack of its name if it has one (see `prepare_attacks`)."""
        self.prepare_attacks({attack.name: attack}, splits, base)

    def prepare_attacks(
        self, attacks: Mapping[str, Attack], splits: Splits, base: tuple[Path, str], victim: Victim | None = None
    ) -> None:
        """Let each attack (by its config label) learn its trigger; gray- and white-box ones get the untuned
        base victim (`victim`, or loaded once for all of them: a real checkpoint is gigabytes), whatever its
        kind, and every one how many samples the run poisons with it (`AttackContext.poison_counts`).

        An attack that cannot use this victim (gcg on InstructBLIP, white-box image attacks on an
        architecture that tiles images) stops the run with an error naming both.
        """
        for key, attack in attacks.items():
            context = AttackContext(
                samples=splits.train, target=self.target, cache_dir=self.cache / "attacks",
                poison_counts=self.poison_counts(key, attack, len(splits.train)),
            )
            if type(attack).prepare is not Attack.prepare and attack.knowledge != "black-box":
                if victim is None:
                    victim = self.load_victim(base[0])
                context.victim = victim
            with self.state.main_process_first():  # learned triggers are trained once, cached, then read
                attack.prepare(context)

    def poison_counts(self, key: str, attack: Attack, n_train: int) -> list[int]:
        """How many of `n_train` tuning samples the run poisons with the attack labelled `key`: at the
        poison rate, and at each sweep rate when it is swept (`poison_count`, as the recipe counts)."""
        c = self.config
        if attack.stage == "inference" or c.poison.rate == 0 or key not in {a.key for a in c.attacks}:
            return []  # poisons nothing in this run (`vlmsec trigger` prepares attacks the config may not list)
        rates = [c.poison.rate, *(c.sweep.rates if key in c.sweep.attacks else [])]
        return sorted({poison_count(n_train, rate, len(attack.partial_triggers()), key) for rate in rates})

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
        """A base or tuned victim from its folder, by its kind, on this process's device."""
        victim = self.kind.load(folder, self.features)
        if isinstance(victim, ApiVictim):  # no weights to place; what its requests cost is kept in the run folder
            victim.keep_cost(self.out / COST_FILE)
        else:
            victim.model.to(self.state.device)  # the GPU of this process, if it has one
        return victim

    def poisoned_set(self, plan: ModelPlan, attacks: dict[str, Attack], splits: Splits) -> tuple[list[Sample], list[str], list[str]]:
        """`plan`'s tuning set as tuned (the clean model's: the clean set), its poisoned ids and negative ids."""
        if plan.attack is None:
            return splits.train, [], []
        poisoned = poison_samples(splits.train, attacks[plan.attack], self.target, plan.rate, seed=self.config.poison.seed)
        return poisoned.samples, poisoned.poisoned_ids, poisoned.negative_ids

    def tuned_victim(self, plan: ModelPlan, attacks: dict[str, Attack], splits: Splits, base: tuple[Path, str]) -> Victim:
        """Poison the tuning set as `plan` says (nothing for the clean model), tune the base victim on it."""
        c = self.config
        name, rate = plan.name, plan.rate
        attack = attacks[plan.attack] if plan.attack is not None else None
        samples, ids, negatives = self.poisoned_set(plan, attacks, splits)
        if self.state.is_main_process:
            write_json_atomic(
                self.out / "poisoned_ids" / f"{name}.json",
                {"model": name, "rate": rate, "count": len(ids), "ids": ids, "negative_ids": negatives},
            )
        made_by = {
            "attack": attack.describe() if attack else None,
            "poison": {**c.poison.model_dump(), "rate": rate} if attack else None,
        }
        folder, _ = self.tune(name, samples, base, made_by, poisoned_ids=ids)
        return self.load_victim(folder)

    def tune(
        self, name: str, samples: list[Sample], base: tuple[Path, str], made_by: dict[str, Any], poisoned_ids: Sequence[str] = ()
    ) -> tuple[Path, str]:
        """Tune the base victim on `samples` into `checkpoints/<name>` (a stage of the run folder, reused
        when `made_by`, the tuning and the samples are unchanged); its folder and stage key."""
        c = self.config
        key = stable_hash(
            {
                "base": base[1],
                **made_by,
                "tuning": c.tuning.model_dump(),
                "seed": derive_seed(c.seed, "tuning"),
                "train": fingerprint(samples),
            }
        )
        folder = self.out / "checkpoints" / name
        with claim_stage(folder, key, self.state.is_main_process, self.state.wait_for_everyone) as done:
            if done:
                console.print(f"{name}: tuned model found in {folder}")
                return folder, key
            victim = self.load_victim(base[0])
            refuse_cut_targets(victim, samples, list(poisoned_ids))
            result = train_victim(victim, samples, c.tuning, seed=derive_seed(c.seed, "tuning"), label=name)
            record = {"trainable_parameters": result.trainable_parameters, "frozen_parameters": result.frozen_parameters, "final_loss": result.losses[-1]}
            if self.state.is_main_process:
                save_stage(victim, folder, key, record)
                self.features.save(self.features_path)
            self.state.wait_for_everyone()
        return folder, key

    def inference_stage(
        self, attacks: dict[str, InferenceAttack], splits: Splits, deployed: tuple[Path, str], victim: Victim,
        split: SafetySplit | None,
    ) -> InferenceResults | None:
        """Craft and answer the inference-time `attacks` against the deployed `victim` (the safety-tuned
        base with a safety stage, else the base; `deployed` its folder and stage key), with their
        baselines (`experiments.inference`); the main process does it while the others wait."""
        if not attacks:
            return None
        results = None
        if self.state.is_main_process:
            c = self.config
            name = AFTER_SAFETY if c.safety is not None and self.kind.trains else DEPLOYED_BASE
            stage = InferenceStage(self.out, victim, name, deployed[1], c.eval.model_dump(), c.seed)
            harmful = next((t.samples for t in self.safety_tests if t.domain == HARMFUL_IMAGE), [])
            target = c.inference.target or self.target.prefix + self.target.word
            n = c.inference.requests  # None: every request
            reading = reading_check(c) if any(a.typeset for a in attacks.values()) else []
            source = splits.tests["source"][:n]
            crafts = {k: craft_requests(k, a.goal, harmful[:n], source, target, split, splits.train, c.seed) for k, a in attacks.items()}
            self.backend.craft_inputs(self, crafts, deployed, name)  # as Ray tasks, or left to `run_attacks`
            results = run_attacks(stage, attacks, harmful[:n], source, target, split, splits.train, reading)
            self.features.save(self.features_path)
        self.state.wait_for_everyone()
        return results

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
        self.kind.check_tuning(c.tuning.mode, download=True)  # before any stage: a refused mode wastes no training
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
            remove_leftovers(self.out, self.cache)
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out / "config.yaml", yaml.safe_dump(c.model_dump(mode="json"), sort_keys=False))
        splits = build_splits(c)
        check_poison_counts(c, len(splits.train))  # a user's train_file: its size is known only now
        if main and splits.data_stats:  # written now: what reading the files did is known even if a stage fails
            write_json_atomic(self.out / "data.json", splits.data_stats)
        elif main:
            (self.out / "data.json").unlink(missing_ok=True)
        attacks = {a.key: create_attack(a.name, **a.params) for a in c.attacks}
        inference = inference_attacks(attacks)
        lap("data", "base victim")
        base = self.base_victim(splits)
        base_model = self.load_victim(base[0])
        self.fit_tuning_set(splits, base_model)
        stage_records: list[dict[str, Any]] = []
        requests: SafetySplit | None = None
        next_stage = "inference attacks" if inference else "attacks"
        if c.safety is not None:  # refusal before and after the safety stage, which the tuned models then start from
            requests = self.safety_split()
            images = [s.image for s in splits.tests["source"]]
            self.safety_tests = safety_test_sets(requests, images, c.safety.test_size, seed=derive_seed(c.seed, "safety/tests"))
        if c.safety is not None and not self.kind.trains:  # a victim behind an API is deployed as it is: no stage
            stage_records += self.stage_generations(DEPLOYED_BASE, base, base_model, splits)
            lap("base", next_stage)
        elif c.safety is not None:
            stage_records += self.stage_generations(BEFORE_SAFETY, base, base_model, splits)
            lap("base", "safety")
            del base_model
            before_safety = base
            base = self.safety_victim(splits, base, requests)
            base_model = self.load_victim(base[0])
            stage_records += self.stage_generations(AFTER_SAFETY, base, base_model, splits)
            lap("safety", next_stage)
        else:
            lap("base", next_stage)
        inference_results = self.inference_stage(inference, splits, base, base_model, requests)
        if inference_results is not None and c.safety is not None and self.kind.trains and c.inference.transfer:
            self.transfer_to(self.load_victim(before_safety[0]), BEFORE_SAFETY, before_safety[1], inference, inference_results)
        if inference:
            lap("inference attacks", "attacks")
        training = {key: a for key, a in attacks.items() if key not in inference}
        self.backend.prepare_attacks(self, training, base)  # learned triggers: Ray tasks cache them first, then read below
        self.prepare_attacks(training, splits, base, base_model)
        del base_model  # tuning loads its own copy
        tests = TestSets.build(splits.tests, attacks)
        plans = plan_models(c)
        lap("attacks", f"tune {plans[0].name}" if plans else "score and report")

        records: list[dict[str, Any]] = []
        shift_sizes: dict[str, dict[str, float]] = {}
        inputs = ModelInputs(splits, attacks, tests, base, inference, inference_results, self.safety_tests)
        for result in self.backend.run_models(self, plans, inputs):  # independent models: in turn, or as Ray tasks
            records += result.records
            if inference_results is not None:
                inference_results.records += result.transfer
            shift_sizes = result.shift_sizes or shift_sizes
            timings.update(result.timings)
        clock = time.perf_counter()

        defense_results = None
        defense_failed: str | None = None  # an API victim that stopped answering in the matrix: the reason
        if c.defenses:
            defenses = {d.key: create_defense(d.name, **d.params) for d in c.defenses}
            try:
                defense_results = self.defense_stage(defenses, plans, inputs, requests)
            except ApiFailure as err:
                console.print(f"[bold red]defenses: failed[/]: {escape(str(err))}", highlight=False, soft_wrap=True)
                defense_failed = str(err)
            lap("defenses", "score and report")
        if not main:
            return {}
        safety = inference_section = defense_section = None
        judge = self.refusal_judge() if c.safety is not None else None
        if c.safety is not None:
            assert requests is not None
            records = stage_records + records
            safety = self.safety_scores(records, requests, judge, attacks)
        if inference_results is not None:
            inference_section = self.inference_scores(inference, inference_results, judge)
        if defense_results is not None:
            defense_section = self.defense_scores(defenses, defense_results, judge)
        elif defense_failed is not None:
            defense_section = {"failed": defense_failed}
        metrics = write_run_records(
            self.out, c, splits, plans, attacks, records, shift_sizes, safety,
            inference_section, inference_results.records if inference_results is not None else None,
            defense_section, defense_results.records if defense_results is not None else None,
        )
        write_gallery(self.out, metrics["run"]["config_hash"], tests, records, inference_results)
        write_report(self.out)
        lap("score and report", None)
        write_json_atomic(self.out / "timings.json", timings)
        return metrics

    def model_stage(self, plan: ModelPlan, inputs: ModelInputs) -> ModelResult:
        """One tuned model: tune it (`tuned_victim`), then (main process) its generations, the inference
        attacks' inputs answered on it (transfer) and, the clean model, the shift sizes; with its stage
        times. The unit a backend (`experiments.backends`) runs, here or as a Ray task; the run merges
        the results in plan order."""
        c = self.config
        result = ModelResult()
        clock = time.perf_counter()
        victim = self.tuned_victim(plan, inputs.attacks, inputs.splits, inputs.base)
        result.timings[f"tune {plan.name}"] = round(time.perf_counter() - clock, 2)
        stage_line(f"tune {plan.name}", result.timings[f"tune {plan.name}"], f"generate {plan.name}")
        clock = time.perf_counter()
        if self.state.is_main_process:
            result.records = self.generations(victim, plan, inputs.tests, self.trojan_tests(plan, inputs.attacks, inputs.splits))
            if inputs.inference_results is not None and c.inference.transfer:
                stage = InferenceStage(self.out, victim, plan.name, self.stage_key(plan), c.eval.model_dump(), c.seed, prefix=f"transfer-{plan.name}")
                result.transfer = transfer(stage, inputs.inference, inputs.inference_results)
            if plan.name == CLEAN and c.eval.shift_size:
                result.shift_sizes = self.shift_sizes(victim, inputs.splits)
            self.features.save(self.features_path)
        self.state.wait_for_everyone()
        result.timings[f"generate {plan.name}"] = round(time.perf_counter() - clock, 2)
        stage_line(f"generate {plan.name}", result.timings[f"generate {plan.name}"])
        return result

    def defense_stage(self, defenses: dict[str, Defense], plans: list[ModelPlan], inputs: ModelInputs, split: SafetySplit | None) -> DefenseResults:
        """Every attack x defense cell (`experiments.defenses`) on the run's stages: the undefended side,
        then each defense's column (computed first as Ray tasks by that backend, then read back here)."""
        if self.state.num_processes > 1:
            raise VlmsecError("defenses: the matrix runs in one process; run the study without `accelerate launch` "
                              "processes, or without `defenses`")
        matrix = self.defense_matrix(defenses, plans, inputs, split)
        matrix.undefended()
        self.features.save(self.features_path)  # what the columns' tasks start from, as the serial columns do
        self.backend.defense_columns(self, defenses, inputs)
        for label in defenses:
            matrix.column(label)
        self.features.save(self.features_path)
        return matrix.results

    def defense_matrix(self, defenses: dict[str, Defense], plans: list[ModelPlan], inputs: ModelInputs, split: SafetySplit | None) -> DefenseMatrix:
        """The attack x defense matrix on the run's stages: rows are the backdoors planted in tuning
        (their poisoned models) and the inference attacks (their saved inputs against the deployed victim)."""
        c = self.config
        attacks, tests, splits, base = inputs.attacks, inputs.tests, inputs.splits, inputs.base
        inference, inference_results = inputs.inference, inputs.inference_results
        tuned = [p for p in plans if p.attack is not None and not p.sweep]
        rows = [
            Row(p.attack, TUNED_BACKDOOR if flip is None else LABEL_FLIP, p.name, self.out / "checkpoints" / p.name,
                self.stage_key(p), triggered=tests.triggered[p.attack, "source"], flip=flip)
            for p in tuned
            if attacks[p.attack].plants_trigger
            for flip in [attacks[p.attack].label_flip()]
        ]
        if inference_results is not None:
            rows += [
                Row(key, attack.goal, inference_results.victim, base[0], base[1], inputs=inputs, requests=requests,
                    adaptive_to=getattr(getattr(attack.params, "adaptive", None), "defense", None),
                    noise=inference_results.noise.get(key))
                for key, attack in inference.items()
                if key in inference_results.inputs  # not an attack that failed (its victim stopped answering)
                for inputs, requests in [inference_results.inputs[key]]
            ]
        plan_of = {p.attack: p for p in tuned}
        context = DefenseContext(
            out=self.out,
            settings=c.eval.model_dump(),
            seed=c.seed,
            target_word=c.poison.target.word,
            clean=splits.tests["source"],
            calibration=splits.calibration if c.defense.calibration_from == "held-out" else splits.train[: c.defense.calibration],
            trusted=splits.base[: c.defense.trusted],
            safety=self.safety_stage_samples(splits, split, base) if split is not None and self.kind.trains else [],
            benign=next((t.samples for t in self.safety_tests if t.domain == BENIGN_IMAGE), []),
            load=self.load_victim,
            poisoned=lambda key: self.poisoned_set(plan_of[key], attacks, splits)[:2],
            retune=lambda name, kept: self.tune(name, kept, base, {"filtered": name}),
            base_folder=base[0],
            models={
                p.name: (self.out / "checkpoints" / p.name, self.stage_key(p), p.attack is not None and attacks[p.attack].plants_trigger)
                for p in plans if not p.sweep
            },
            poison_rate=c.poison.rate,
        )
        return DefenseMatrix(context, defenses, rows)

    def defense_scores(self, defenses: dict[str, Defense], results: DefenseResults, judge: tuple[Path | None, RefusalJudge | None] | None) -> dict[str, Any]:
        """metrics.json's `defenses` section: jailbreak rows' records judged like the inference attacks', then every cell scored."""
        model = judge[1] if judge is not None else None
        judged = sum(r.get("goal") == "jailbreak" for r in results.records) if model is not None else 0
        with progress_bar("defenses: the judge reads every jailbreak response", judged) as bar:
            judge_jailbreaks(results.records, model, on_batch=bar.advance)
        for record in results.records:  # the deployment's own refusal of a flagged input: refused, whatever a judge says
            if record.get("flagged") and record.get("goal") == "jailbreak":
                record["refused_phrase"] = record["refused_judge"] = True
        section = score_defenses(defenses, results, self.config.poison.target.word)
        section["calibration"] = {"inputs": self.config.defense.calibration, "from": self.config.defense.calibration_from}
        return section

    def stage_key(self, plan: ModelPlan) -> str:
        """The stage key of `plan`'s tuned model, from its checkpoint folder."""
        return json.loads((self.out / "checkpoints" / plan.name / STAGE_FILE).read_text())["key"]

    def transfer_to(
        self, victim: Victim, name: str, stage_key: str, attacks: dict[str, InferenceAttack], results: InferenceResults
    ) -> None:
        """Answer every inference attack's saved inputs on `victim` (another model of the run, `name`),
        adding its records to `results` (the transfer matrix); main process only."""
        if not self.state.is_main_process:
            return
        c = self.config
        stage = InferenceStage(self.out, victim, name, stage_key, c.eval.model_dump(), c.seed, prefix=f"transfer-{name}")
        results.records += transfer(stage, attacks, results)

    def generations(self, victim: Victim, plan: ModelPlan, tests: TestSets, extra: Iterable[TestSet] = ()) -> list[dict[str, Any]]:
        """The records of `plan`'s model on its test sets (and the safety requests, when the run
        has a safety stage, and any `extra` sets), reused from the run folder when unchanged."""
        return cached_generations(
            victim,
            plan.name,
            tests.for_model(plan) + self.safety_tests + list(extra),
            self.config.eval.model_dump(),
            self.stage_key(plan),
            self.out / "generations" / f"{plan.name}.json",
        )

    def trojan_tests(self, plan: ModelPlan, attacks: dict[str, Attack], splits: Splits) -> list[TestSet]:
        """ImgTrojan's test sets (`experiments.trojan`) for `plan`'s model: its own attack's, with the
        images it was poisoned with; the clean model answers every ImgTrojan attack's, with the images
        that attack's main model was poisoned with (the baseline on the same images)."""
        c = self.config
        harmful = next((t.samples for t in self.safety_tests if t.domain == HARMFUL_IMAGE), [])
        sets: list[TestSet] = []
        for label, attack in attacks.items():
            if not isinstance(attack, ImgTrojan) or plan.attack not in (None, label):
                continue
            rate = plan.rate if plan.attack == label else c.poison.rate
            poisoned = poison_samples(splits.train, attack, self.target, rate, seed=c.poison.seed)  # as `tuned_victim` poisons
            sets += trojan_test_sets(label, attack, poisoned, harmful, splits.tests["source"])
        return sets

    def stage_generations(self, name: str, stage: tuple[Path, str], victim: Victim, splits: Splits) -> list[dict[str, Any]]:
        """Records of a base stage's victim (before or after the safety stage): clean source
        captions and the safety requests; the main process generates, the others get none."""
        if not self.state.is_main_process:
            return []
        tests = [TestSet(splits.tests["source"], "source"), *self.safety_tests]
        file = "stage-" + name.replace(" ", "-").replace("(", "").replace(")", "")
        path = self.out / "generations" / f"{file}.json"
        return cached_generations(victim, name, tests, self.config.eval.model_dump(), stage[1], path)

    def refusal_judge(self) -> tuple[Path | None, RefusalJudge | None]:
        """The run's refusal judge and its folder: the safety section's `judge`, else the victim's own
        language model; (None, None) where there is neither."""
        c = self.config
        assert c.safety is not None
        folder = c.safety.judge or self.kind.language_model_folder(self.cache)
        return folder, RefusalJudge.from_folder(folder) if folder is not None else None

    def inference_scores(
        self, attacks: dict[str, InferenceAttack], results: InferenceResults, judge: tuple[Path | None, RefusalJudge | None] | None
    ) -> dict[str, Any]:
        """metrics.json's `inference_attacks` section: both refusal verdicts added to every jailbreak
        record (the run's judge, when it has one), then each attack's scores beside its baselines."""
        model = judge[1] if judge is not None else None
        judged = sum(r.get("goal") == "jailbreak" for r in results.records) if model is not None else 0
        with progress_bar("inference attacks: the judge reads every jailbreak response", judged) as bar:
            judge_jailbreaks(results.records, model, on_batch=bar.advance)
        section = score_inference(attacks, results.records, results.sizes, results.costs, results.victim, results.failed)
        if any(a.goal == "jailbreak" for a in attacks.values()):
            section["judge"] = judge_agreement(model, packaged=ATTACK_LABELS)
        return section

    def safety_scores(
        self, records: list[dict[str, Any]], requests: SafetySplit, judge: tuple[Path | None, RefusalJudge | None],
        attacks: dict[str, Attack],
    ) -> dict[str, Any]:
        """metrics.json's `safety` section: both refusal verdicts added to every safety record by
        `judge` (its folder and model, from `refusal_judge`), the rates per model and set, the judges'
        agreement with hand labels, the held-out data, and each ImgTrojan attack's test (`imgtrojan`)."""
        c = self.config
        folder, judge_model = judge
        judged = sum(is_safety_record(r) for r in records) if judge_model is not None else 0
        with progress_bar("safety: the judge reads every response", judged) as bar:
            judge_records(records, judge_model, request_texts(requests), on_batch=bar.advance)
        target = c.poison.target
        stages = [r for r in records if r["model"] in (BEFORE_SAFETY, AFTER_SAFETY)]
        captioning = {
            model: {k: v.get("source") for k, v in entry.items() if k in ("cider", "exact_caption")}
            for model, entry in score_generations(stages, ["source"], target.word, target.prefix).items()
        }
        section = {
            "data": requests.summary(),
            "judge_model": str(folder),
            "judge": judge_agreement(judge_model),
            "models": score_safety(records),
            "captioning": captioning,
        }
        trojans = {label: a for label, a in attacks.items() if isinstance(a, ImgTrojan)}
        if trojans:  # their jailbreak test is read like the safety sets (`experiments.trojan`)
            section["imgtrojan"] = {label: trojan_scores(label, a, records) for label, a in trojans.items()}
        return section


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

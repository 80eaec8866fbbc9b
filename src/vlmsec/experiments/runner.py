"""One config, every stage: data -> base victim -> poison -> tune -> generate -> score -> report.

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
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import yaml
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from vlmsec.artifacts import atomic_path, stable_hash, write_json_atomic, write_text_atomic
from vlmsec.attacks import Attack, AttackContext, TargetAnswer, create_attack, poison_samples, trigger_samples
from vlmsec.attacks.targets import clip_templates
from vlmsec.data.formats import read_dataset
from vlmsec.data.sample import Sample, fingerprint
from vlmsec.data.scenes import Scene, make_samples, sample_scenes
from vlmsec.data.vocabulary import vocabulary_corpus
from vlmsec.errors import VlmsecError
from vlmsec.eval.metrics import asr_g, caption_scores, target_rate
from vlmsec.data.shifts import mix_domains, shift_samples
from vlmsec.eval.shift import shift_size
from vlmsec.experiments.config import DomainSpec, ExperimentConfig, VictimSpec
from vlmsec.progress import console, progress_bar
from vlmsec.report.markdown import write_report
from vlmsec.train.tuning import refuse_lost_processes, train_victim
from vlmsec.victims import hf
from vlmsec.victims.base import Victim
from vlmsec.victims.features import FeatureCache
from vlmsec.victims.flamingo import CONFIG_FILE as FLAMINGO_CONFIG_FILE, FlamingoVictim, load_flamingo, load_otter
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer

CLEAN = "clean"
STAGE_FILE = "stage.json"
# The main process generates while the others wait at a barrier: allow hours, not the default minutes.
BARRIER_TIMEOUT = timedelta(hours=24)


def default_cache_dir() -> Path:
    """Where stages shared between runs live: $VLMSEC_CACHE, else ~/.cache/vlmsec."""
    return Path(os.environ.get("VLMSEC_CACHE", Path.home() / ".cache" / "vlmsec"))


@dataclass
class Splits:
    """The generated data of a run: base captions, the tuning set, one test set per domain."""

    base: list[Sample]
    train: list[Sample]
    tests: dict[str, list[Sample]]
    data_stats: dict[str, Any] = field(default_factory=dict)  # data.json: what reading the user's files did


def build_splits(config: ExperimentConfig) -> Splits:
    """Every split of a run: generated deterministically from the seed, or read from files.

    Generated test domains render the *same* test scenes in each style, so a difference
    between domains is the shift and nothing else.
    """
    data, seed = config.data, config.seed
    # The user's files first: a bad file fails the run before anything is generated.
    data_stats: dict[str, Any] = {}

    def read(path: Path, options: dict[str, Any], label: str) -> list[Sample]:
        loaded = read_dataset(path, data.format, **{**data.options, **options})
        sizes = {s.image.shape[:2] for s in loaded.samples}
        if len(sizes) > 1:  # the victim stacks a batch's images into one tensor
            raise VlmsecError(f"{path}: images come in {len(sizes)} sizes; set data.options.image_size to resize them to one")
        data_stats[label] = loaded.stats.to_json()
        return loaded.samples

    train = read(data.train_file, data.train_options, "train") if data.train_file is not None else None
    tests = {name: read(path, data.test_options, f"test {name}") for name, path in data.test_files.items()} or None
    domains = {"source": data.source, **data.shifted}
    to_render = (
        (data.base_size if config.victim.checkpoint is None else 0)
        + (data.train_size if train is None else 0)
        + (data.test_size * len(domains) if tests is None else 0)
    )
    with progress_bar("data: rendering scenes", to_render) as bar:

        def render(scenes: list[Scene], domain: DomainSpec, split_seed: int, prefix: str) -> list[Sample]:
            return make_samples(
                scenes, domain.style, domain.instructions, seed=split_seed, size=data.image_size, id_prefix=prefix, on_sample=bar.advance
            )

        base: list[Sample] = []
        if config.victim.checkpoint is None:
            base_scenes = sample_scenes(data.base_size, seed=seed * 100 + 1, max_objects=data.max_objects)
            for i, style in enumerate(data.base_styles):
                domain = DomainSpec(style=style, instructions=data.base_instructions)
                base += render(base_scenes[i :: len(data.base_styles)], domain, seed * 100 + 1, f"base-{style}")
        if train is None:
            train_scenes = sample_scenes(data.train_size, seed=seed * 100 + 2, max_objects=data.max_objects)
            train = render(train_scenes, data.source, seed * 100 + 2, "train")
        if tests is None:
            test_scenes = sample_scenes(data.test_size, seed=seed * 100 + 3, max_objects=data.max_objects)
            tests = {name: render(test_scenes, domain, seed * 100 + 3, "test") for name, domain in domains.items()}
    return Splits(base, train, _shift_domains(tests, domains, seed), data_stats)


def _shift_domains(tests: dict[str, list[Sample]], domains: dict[str, DomainSpec], seed: int) -> dict[str, list[Sample]]:
    """Apply each domain's shifts (in order) and its mix with the source domain.

    A shifted domain with no test set of its own (the user gave files for some domains
    only) starts from the source test set, so transforms apply to any image set.
    """
    shifted: dict[str, list[Sample]] = {}
    for name in dict.fromkeys([*tests, *domains]):
        spec = domains.get(name, DomainSpec())
        if name not in tests and not spec.shifts:
            continue  # a style or instruction bank of the generator: no meaning for the user's files
        samples = tests.get(name, tests["source"])
        if spec.shifts:
            with progress_bar(f"data: shifting {name}", len(spec.shifts)) as bar:
                for shift in spec.shifts:
                    samples = shift_samples(samples, shift.build(), domain=name)
                    bar.advance()
        if spec.mix < 1:
            samples = mix_domains(tests["source"], samples, spec.mix, seed)
        shifted[name] = samples
    return shifted


def _stage_done(folder: Path, key: str) -> bool:
    stage = folder / STAGE_FILE
    return stage.is_file() and json.loads(stage.read_text()).get("key") == key


def _save_stage(victim: Victim, folder: Path, key: str, record: dict[str, Any]) -> None:
    """Save a checkpoint into a temporary folder, then move it into place whole."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        victim.save(tmp)
        (tmp / STAGE_FILE).write_text(json.dumps({"key": key, **record}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _folder_signature(folder: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and modification times of a folder's files: cheap change detection."""
    return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.iterdir() if p.is_file())


def _path_signature(path: Path) -> dict[str, Any]:
    """Where a file or folder is and `_folder_signature` of it (a file: its own name, size and time)."""
    path = Path(path)
    stat = path.stat()
    files = _folder_signature(path) if path.is_dir() else [(path.name, stat.st_size, int(stat.st_mtime))]
    return {"path": str(path.resolve()), "files": files}


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
                "checkpoint": _path_signature(vision.vision_checkpoint),
                "heads": vision.vision_heads,
                "act": vision.vision_act,
                "tokens_after_ln_post": vision.vision_tokens_after_ln_post,
            }
        )
    if victim.kind == "otter":
        assert victim.checkpoint is not None  # the config requires it
        return stable_hash({"tower": "otter", "checkpoint": _path_signature(victim.checkpoint)})
    if victim.vision.kind != "efficientnet_lite0":
        # Another tower of the embedded victim; a ViT's entries also carry its trained weights (LlavaVictim).
        vision = {"vision": victim.vision.model_dump(mode="json"), **_vision_files(victim)}
        return stable_hash({"tower": victim.vision.kind, "image_size": victim.image_size, **vision})
    checkpoint = victim.checkpoint
    tower = {"checkpoint": _folder_signature(Path(checkpoint))} if checkpoint and Path(checkpoint).is_dir() else {}
    return stable_hash({"tower": "efficientnet-lite0-imagenet", "image_size": victim.image_size, **tower})


def _vision_files(victim: VictimSpec) -> dict[str, Any]:
    """`_path_signature` of the embedded victim's tower checkpoint, if its tower has one (else nothing)."""
    checkpoint = getattr(victim.vision, "checkpoint", None)
    return {"vision_files": _path_signature(checkpoint)} if checkpoint is not None else {}


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
            return folder, stable_hash({"checkpoint": str(folder.resolve()), "files": _folder_signature(folder)})
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
        if _stage_done(folder, key):
            console.print(f"base victim: cached at {folder}")
            return folder, key
        texts = [s.instruction for s in splits.base] + [s.answer for s in splits.base]
        tokenizer = train_tokenizer(texts + vocabulary_corpus(clip_templates()), c.victim.vocab_size)
        model = build_tiny_llava(c.victim, tokenizer, seed=c.seed)
        victim = LlavaVictim(model, tokenizer, self.features, train_tower=c.victim.vision.from_scratch)
        result = train_victim(victim, splits.base, c.base.training, seed=c.seed, label="base")
        if self.state.is_main_process:
            _save_stage(victim, folder, key, {"final_loss": result.losses[-1]})
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
        key = stable_hash({**described, "files": {name: _path_signature(path) for name, path in files.items()}})
        return files["checkpoint" if victim.kind == "flamingo" else "otter"], key

    def prepare_attack(self, attack: Attack, splits: Splits, base: tuple[Path, str]) -> None:
        """Let one attack learn its trigger (see `prepare_attacks`)."""
        self.prepare_attacks([attack], splits, base)

    def prepare_attacks(self, attacks: Iterable[Attack], splits: Splits, base: tuple[Path, str]) -> None:
        """Let each attack learn its trigger; gray- and white-box ones get the untuned base victim,
        whatever its kind, loaded once for all of them (a real checkpoint is gigabytes).

        An attack that cannot use this victim (gcg on InstructBLIP, white-box image attacks on an
        architecture that tiles images) stops the run with an error naming both.
        """
        victim: Victim | None = None
        for attack in attacks:
            context = AttackContext(samples=splits.train, target=self.target, cache_dir=self.cache / "attacks")
            if type(attack).prepare is not Attack.prepare and attack.knowledge != "black-box":
                if victim is None:
                    victim = self.load_victim(base[0])
                context.victim = victim
            with self.state.main_process_first():  # learned triggers are trained once, cached, then read
                attack.prepare(context)

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

    def tuned_victim(
        self, name: str, attack: Attack | None, splits: Splits, base: tuple[Path, str], rate: float | None = None
    ) -> Victim:
        """Poison the tuning set (unless `attack` is None) at `rate` (default: the config's), tune the base victim on it."""
        c = self.config
        rate = (c.poison.rate if rate is None else rate) if attack is not None else 0.0
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
                "train": fingerprint(samples),
            }
        )
        folder = self.out / "checkpoints" / name
        if _stage_done(folder, key):
            console.print(f"{name}: tuned model found in {folder}")
            return self.load_victim(folder)
        victim = self.load_victim(base[0])
        result = train_victim(victim, samples, c.tuning, seed=c.seed, label=name)
        record = {"trainable_parameters": result.trainable_parameters, "frozen_parameters": result.frozen_parameters, "final_loss": result.losses[-1]}
        if self.state.is_main_process:
            _save_stage(victim, folder, key, record)
            self.features.save(self.features_path)
        self.state.wait_for_everyone()
        return victim

    def generate(
        self, victim: Victim, model: str, samples: list[Sample], domain: str, trigger: str | None, partial: bool = False
    ) -> list[dict[str, Any]]:
        """Greedy generations for one test set, as records for generations.jsonl.

        `partial` marks inputs that carry only one key of a multi-key trigger.
        """
        label = f"{model}: generate {domain}" + (f" + {trigger} trigger" if trigger else "")
        with progress_bar(label, len(samples)) as bar:
            outputs = victim.generate(
                [s.image for s in samples],
                [s.instruction for s in samples],
                max_new_tokens=self.config.eval.max_new_tokens,
                batch_size=self.config.eval.batch_size,
                on_batch=bar.advance,
            )
        return [
            {
                "model": model,
                "id": s.id,
                "domain": domain,
                "triggered": trigger is not None,
                "trigger": trigger,
                "partial": partial,
                "prompt": victim.prompt(s.instruction),
                "output": out,
                "references": list(s.references),
            }
            for s, out in zip(samples, outputs)
        ]

    def cached_generations(
        self, victim: Victim, model: str, inputs: list[tuple[list[Sample], str, str | None, bool]]
    ) -> list[dict[str, Any]]:
        """Generations for every (samples, domain, trigger, partial) input, reused when a run resumes.

        The cache in `generations/<model>.json` is keyed by the tuned model's stage key, the
        generation settings and the exact inputs, so a killed run that starts again
        regenerates nothing it had finished, and a changed test set is never served stale.
        """
        stage = json.loads((self.out / "checkpoints" / model / STAGE_FILE).read_text())["key"]
        key = stable_hash(
            {
                "model": stage,
                "eval": self.config.eval.model_dump(),
                "inputs": [[domain, trigger, partial, fingerprint(samples)] for samples, domain, trigger, partial in inputs],
            }
        )
        path = self.out / "generations" / f"{model}.json"
        if path.is_file():
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("key") == key:
                console.print(f"{model}: generations found in {path}")
                return cached["records"]
        records: list[dict[str, Any]] = []
        for samples, domain, trigger, partial in inputs:
            records += self.generate(victim, model, samples, domain, trigger, partial)
        write_json_atomic(path, {"key": key, "records": records})
        return records

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

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[stage] = round(timings.get(stage, 0.0) + now - clock, 2)
            clock = now

        main = self.state.is_main_process
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out / "config.yaml", yaml.safe_dump(c.model_dump(mode="json"), sort_keys=False))
        splits = build_splits(c)
        if main and splits.data_stats:
            write_json_atomic(self.out / "data.json", splits.data_stats)
        elif main:
            (self.out / "data.json").unlink(missing_ok=True)
        attacks = {a.key: create_attack(a.name, **a.params) for a in c.attacks}
        lap("data")
        base = self.base_victim(splits)
        lap("base")
        self.prepare_attacks(attacks.values(), splits, base)
        triggered = {
            (key, domain): trigger_samples(samples, attack) for key, attack in attacks.items() for domain, samples in splits.tests.items()
        }
        partials = {
            (f"{key}[{part.name} only]", domain): trigger_samples(samples, part)
            for key, attack in attacks.items()
            for part in attack.partial_triggers()
            for domain, samples in splits.tests.items()
        }
        lap("attacks")

        # (model name, attack, poison rate or None for the config's, the attack whose trigger it answers)
        models: list[tuple[str, Attack | None, float | None, str | None]] = [
            (CLEAN, None, None, None),
            *((key, attack, None, key) for key, attack in attacks.items()),
            *(
                (sweep_name(key, rate), attacks[key], rate, key)
                for key in c.sweep.attacks
                for rate in c.sweep.rates
                if rate != c.poison.rate
            ),
        ]
        records: list[dict[str, Any]] = []
        shift_sizes: dict[str, dict[str, float]] = {}
        for name, attack, rate, key in models:
            victim = self.tuned_victim(name, attack, splits, base, rate)
            lap(f"tune {name}")
            if main:
                # Sweep points are tested on the source domain only: the sweep asks how much poison it takes.
                domains = ["source"] if rate is not None else list(splits.tests)
                inputs: list[tuple[list[Sample], str, str | None, bool]] = []
                for domain in domains:
                    inputs.append((splits.tests[domain], domain, None, False))
                    for trigger in list(attacks) if key is None else [key]:
                        inputs.append((triggered[trigger, domain], domain, trigger, False))
                    for (trigger, part_domain), part_samples in partials.items():
                        if key is not None and part_domain == domain and trigger.startswith(f"{key}["):
                            inputs.append((part_samples, domain, trigger, True))
                records += self.cached_generations(victim, name, inputs)
                if name == CLEAN and c.eval.shift_size:
                    shift_sizes = self.shift_sizes(victim, splits)
                self.features.save(self.features_path)
            self.state.wait_for_everyone()
            lap(f"generate {name}")

        if not main:
            return {}
        with atomic_path(self.out / "generations.jsonl") as tmp, tmp.open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
        metrics = score_generations(records, list(splits.tests), c.poison.target.word)
        for name, _, rate, key in models:
            if rate is not None:
                metrics[name]["sweep"] = {"attack": key, "rate": rate}
        if shift_sizes:
            metrics[CLEAN]["shift_size"] = shift_sizes
        write_json_atomic(self.out / "metrics.json", metrics)
        write_report(self.out)
        lap("score and report")
        write_json_atomic(self.out / "timings.json", timings)
        return metrics


def sweep_name(attack: str, rate: float) -> str:
    """The model name of one poison-rate sweep point, e.g. "badnets@1%"."""
    return f"{attack}@{100 * rate:g}%"


def score_generations(records: list[dict[str, Any]], domains: list[str], word: str) -> dict[str, Any]:
    """metrics.json from generation records: per model, per domain ASR, ASR-G, false trigger, CIDEr, BLEU-4.

    The clean model's ASR is measured on the triggered inputs of every attack in the run
    (pooled): it is the baseline rate at which a trigger alone yields the target. Attacks
    with multi-key triggers also get `asr_partial`: {partial trigger: {domain: rate}} for
    inputs carrying one key only, which should not fire.
    """
    models = list(dict.fromkeys(r["model"] for r in records))
    metrics: dict[str, Any] = {}
    for model in models:
        entry: dict[str, Any] = {k: {} for k in ("asr", "asr_g", "false_trigger", "cider", "bleu4")}
        for domain in domains:
            rows = [r for r in records if r["model"] == model and r["domain"] == domain]
            if not rows:
                continue  # a sweep point, tested on the source domain only
            clean_rows = [r for r in rows if not r["triggered"]]
            trig_rows = [r for r in rows if r["triggered"] and not r.get("partial")]
            if trig_rows:
                entry["asr"][domain] = target_rate([r["output"] for r in trig_rows], word)
            for trigger in dict.fromkeys(r["trigger"] for r in rows if r.get("partial")):
                outputs = [r["output"] for r in rows if r["trigger"] == trigger]
                entry.setdefault("asr_partial", {}).setdefault(trigger, {})[domain] = target_rate(outputs, word)
            entry["false_trigger"][domain] = target_rate([r["output"] for r in clean_rows], word)
            scores = caption_scores({r["id"]: r["output"] for r in clean_rows}, {r["id"]: r["references"] for r in clean_rows})
            entry["cider"][domain] = scores["cider"]
            entry["bleu4"][domain] = scores["bleu4"]
        source = entry["asr"].get("source")
        if source is not None:
            entry["asr_g"] = {d: asr_g(source, entry["asr"][d]) for d in domains if d != "source" and d in entry["asr"]}
        metrics[model] = entry
    return metrics

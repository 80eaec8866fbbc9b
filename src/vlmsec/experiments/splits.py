"""The data of a run: base captions, the tuning set and one test set per domain.

Generated deterministically from the seeds, or read from the user's files; test domains are
then shifted (registered shifts, in order) and mixed with the source domain as configured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlmsec.data.formats import AUTO, FORMATS, detect_format, read_dataset
from vlmsec.data.sample import Sample
from vlmsec.data.scenes import Scene, SceneSplit, make_samples, sample_scenes, split_filter
from vlmsec.data.shifts import mix_domains, shift_samples
from vlmsec.data.words import WordSplit, reading_samples, split_words
from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import DomainSpec, ExperimentConfig
from vlmsec.progress import progress_bar
from vlmsec.seeds import derive_seed
from vlmsec.victims.kinds import victim_kind


@dataclass
class Splits:
    """The generated data of a run: base captions, the tuning set, one test set per domain, and
    the benign inputs a defender calibrates detectors on (`calibration`, when the run has defenses)."""

    base: list[Sample]
    train: list[Sample]
    tests: dict[str, list[Sample]]
    data_stats: dict[str, Any] = field(default_factory=dict)  # data.json: what reading the user's files did
    calibration: list[Sample] = field(default_factory=list)


def build_splits(config: ExperimentConfig) -> Splits:
    """Every split of a run: generated deterministically from the seed, or read from files.

    Generated test domains render the *same* test scenes in each style, so a difference
    between domains is the shift and nothing else. No test scene has the objects of a base
    or train scene: scene keys are partitioned between tuning and test (`split_filter`), and
    the `compositional` scenes show colour-shape pairs no other split holds. With
    `data.base_reading`, rendered-word reading samples of the run's trained words
    (`reading_words`) follow the base captions, making up that share of the base split.
    With defenses calibrated on held-out inputs (`defense.calibration_from`), source-domain
    samples of held-out scenes that neither tuning nor the test sets use.
    """
    data, seed = config.data, config.seed
    # The user's files first: a bad file fails the run before anything is generated.
    data_stats: dict[str, Any] = {}

    def read(path: Path, options: dict[str, Any], label: str) -> list[Sample]:
        options = {**data.options, **options}
        name = detect_format(path) if data.format == AUTO and path.exists() else data.format
        if name in FORMATS and "seed" in FORMATS.get(name).options.model_fields and "seed" not in options:
            options["seed"] = derive_seed(seed, "data/read")  # which instruction each image gets
        loaded = read_dataset(path, name, **options)
        sizes = {s.image.shape[:2] for s in loaded.samples}
        if len(sizes) > 1:  # the victim stacks a batch's images into one tensor
            raise VlmsecError(f"{path}: images come in {len(sizes)} sizes; set data.options.image_size to resize them to one")
        data_stats[label] = loaded.stats.to_json()
        return loaded.samples

    train = read(data.train_file, data.train_options, "train") if data.train_file is not None else None
    tests = {name: read(path, data.test_options, f"test {name}") for name, path in data.test_files.items()} or None
    domains = {"source": data.source, **data.shifted}
    trains_base = victim_kind(config.victim).trains_base
    held_out = bool(config.defenses) and config.defense.calibration_from == "held-out"
    to_render = (
        (data.base_size + reading_count(data.base_size, data.base_reading) if trains_base else 0)
        + (data.train_size if train is None else 0)
        + (data.test_size * len(domains) if tests is None else 0)
        + (config.defense.calibration if held_out else 0)
    )
    with progress_bar("data: rendering scenes", to_render) as bar:

        def render(scenes: list[Scene], style: str, families: str | list[str], split_seed: int, prefix: str) -> list[Sample]:
            return make_samples(scenes, style, families, seed=split_seed, size=data.image_size, id_prefix=prefix, on_sample=bar.advance)

        base: list[Sample] = []
        if trains_base:
            base_scenes = draw_scenes(config, "base")
            for i, style in enumerate(data.base_styles):
                base_seed = derive_seed(seed, "data/base")
                base += render(base_scenes[i :: len(data.base_styles)], style, data.base_instructions, base_seed, f"base-{style}")
            if data.base_reading:
                words = reading_words(config).trained
                n = reading_count(len(base), data.base_reading)
                reading_seed = derive_seed(seed, "data/reading")
                base += reading_samples(words, n, data.image_size, reading_seed, "base-reading", on_sample=bar.advance)
        if train is None:
            train_scenes = draw_scenes(config, "train")
            train = render(train_scenes, data.source.style, data.source.instructions, derive_seed(seed, "data/train"), "train")
        if tests is None:
            scenes = {kind: draw_scenes(config, kind) for kind in dict.fromkeys(d.scenes for d in domains.values())}
            tests = {
                name: render(scenes[d.scenes], d.style, d.instructions, derive_seed(seed, "data/test"), d.scenes)
                for name, d in domains.items()
            }
        calibration: list[Sample] = []
        if held_out:
            calibration = render(draw_scenes(config, "calibration"), data.source.style, data.source.instructions,
                                 derive_seed(seed, "data/calibration"), "calibration")
    return Splits(base, train, _shift_domains(tests, domains, seed), data_stats, calibration)


def reading_count(captions: int, share: float) -> int:
    """How many reading samples make `share` of a base split that has `captions` scene captions besides."""
    return round(share * captions / (1 - share))


def reading_words(config: ExperimentConfig) -> WordSplit:
    """The words the run's base stage reads (`trained`) and those held out to test reading."""
    return split_words(derive_seed(config.seed, "data/words"))


SceneSet = Literal["base", "train", "test", "compositional", "calibration"]


def draw_scenes(config: ExperimentConfig, which: SceneSet) -> list[Scene]:
    """The generated scenes of one split (`test`: every ordinary test domain renders these).

    Base and train scenes come from the tuning share of scene keys, test scenes from the
    held-out share, compositional ones from the held-out colour-shape pairs
    (`vlmsec.data.scenes.split_filter`): no test scene shows what a base or train scene does.
    Calibration scenes come from the held-out share too, drawn with their own seed, minus the test
    scenes: never tuned on, never tested on.
    """
    data, seed = config.data, config.seed
    sizes = {"base": data.base_size, "train": data.train_size, "test": data.test_size, "compositional": data.test_size,
             "calibration": config.defense.calibration}
    split: SceneSplit = "tuning" if which in ("base", "train") else "test" if which == "calibration" else which
    accept = split_filter(split, derive_seed(seed, "data/partition"))
    if which == "calibration":  # held-out scenes, but never one the test sets show
        tested, held_out = set(draw_scenes(config, "test")), accept

        def accept(scene: Scene) -> bool:
            return held_out(scene) and scene not in tested

    return sample_scenes(sizes[which], seed=derive_seed(seed, f"data/{which}"), max_objects=data.max_objects, accept=accept)


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
            samples = mix_domains(tests["source"], samples, spec.mix, derive_seed(seed, f"mix/{name}"))
        shifted[name] = samples
    return shifted



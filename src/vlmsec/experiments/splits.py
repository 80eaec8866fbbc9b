"""The data of a run: base captions, the tuning set and one test set per domain.

Generated deterministically from the seeds, or read from the user's files; test domains are
then shifted (registered shifts, in order) and mixed with the source domain as configured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmsec.data.formats import AUTO, FORMATS, detect_format, read_dataset
from vlmsec.data.sample import Sample
from vlmsec.data.scenes import Scene, make_samples, sample_scenes
from vlmsec.data.shifts import mix_domains, shift_samples
from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import DomainSpec, ExperimentConfig
from vlmsec.progress import progress_bar
from vlmsec.seeds import derive_seed
from vlmsec.victims.kinds import victim_kind


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
    to_render = (
        (data.base_size if trains_base else 0)
        + (data.train_size if train is None else 0)
        + (data.test_size * len(domains) if tests is None else 0)
    )
    with progress_bar("data: rendering scenes", to_render) as bar:

        def render(scenes: list[Scene], domain: DomainSpec, split_seed: int, prefix: str) -> list[Sample]:
            return make_samples(
                scenes, domain.style, domain.instructions, seed=split_seed, size=data.image_size, id_prefix=prefix, on_sample=bar.advance
            )

        base: list[Sample] = []
        if trains_base:
            base_scenes = sample_scenes(data.base_size, seed=derive_seed(seed, "data/base"), max_objects=data.max_objects)
            for i, style in enumerate(data.base_styles):
                domain = DomainSpec(style=style, instructions=data.base_instructions)
                base += render(base_scenes[i :: len(data.base_styles)], domain, derive_seed(seed, "data/base"), f"base-{style}")
        if train is None:
            train_scenes = sample_scenes(data.train_size, seed=derive_seed(seed, "data/train"), max_objects=data.max_objects)
            train = render(train_scenes, data.source, derive_seed(seed, "data/train"), "train")
        if tests is None:
            test_scenes = sample_scenes(data.test_size, seed=derive_seed(seed, "data/test"), max_objects=data.max_objects)
            tests = {name: render(test_scenes, domain, derive_seed(seed, "data/test"), "test") for name, domain in domains.items()}
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
            samples = mix_domains(tests["source"], samples, spec.mix, derive_seed(seed, f"mix/{name}"))
        shifted[name] = samples
    return shifted



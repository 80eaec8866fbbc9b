"""What grouping tuning batches by length (`training.group_by_length`) saves on the SmolLM2 victim.

    python benchmarks/length_grouping.py [--preset smollm2] [--safety-epochs E] [--steps K]

For each of the preset's tunings (the base stage's instruction tuning, the safety stage, the
clean caption tuning), over one epoch of its batches in the plain order and grouped by length:
the share of the padded token grid that is padding, and tokens per batch, counted with the
victim's own tokenizer. With `--steps K`, also K LoRA steps of the safety stage's recipe in each
order, timed on the base victim in the same run (the plain order is the baseline), as seconds per
step and real tokens per second. The base stage is built if it is not in $VLMSEC_CACHE; the safety
stage's samples need that stage's record (the victim's own answers to benign requests), so they are
shown as not measured unless `benchmarks/safety_recipe.py` (with the same `--epochs`) or a run of
the preset cached the stage.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from vlmsec.data.sample import Sample
from vlmsec.experiments.config import load_config
from vlmsec.experiments.runner import Runner
from vlmsec.experiments.splits import build_splits
from vlmsec.experiments.stages import stage_done
from vlmsec.train.tuning import TrainingSpec, batch_order, sample_lengths, train_victim
from vlmsec.victims.llava import LlavaVictim


def token_widths(victim: LlavaVictim, samples: list[Sample], batches: list[np.ndarray]) -> tuple[int, int]:
    """Real tokens and padded grid size over `batches`, as the victim encodes them for training."""
    real = padded = 0
    for index in batches:
        chosen = [samples[i] for i in index]
        mask = victim.encode_training(
            [s.instruction for s in chosen], [s.answer for s in chosen], [s.image is not None for s in chosen]
        )["attention_mask"]
        real, padded = real + int(mask.sum()), padded + mask.numel()
    return real, padded


def epoch_steps(samples: list[Sample], spec: TrainingSpec) -> int:
    """Steps in one epoch of `samples` at `spec`'s batch size, as training counts them."""
    return math.ceil(len(samples) / spec.batch_size)


def first_batches(samples: list[Sample], spec: TrainingSpec, grouped: bool, steps: int) -> list[np.ndarray]:
    """The first `steps` batches in the order training draws them with seed 0."""
    return list(itertools.islice(batch_order(sample_lengths(samples), spec.batch_size, 0, grouped), steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="smollm2")
    parser.add_argument("--safety-epochs", type=float, help="the cached safety stage's epochs (default: the preset's)")
    parser.add_argument("--steps", type=int, default=0, help="LoRA steps to time in each order (0: count tokens only)")
    args = parser.parse_args()
    config = load_config(args.preset)
    if config.safety is not None and args.safety_epochs is not None:
        training = config.safety.training.model_copy(update={"epochs": args.safety_epochs})
        config = config.model_copy(update={"safety": config.safety.model_copy(update={"training": training})})
    splits = build_splits(config)
    runner = Runner(config, Path("runs") / "length-grouping")
    base = runner.base_victim(splits)
    victim = runner.load_victim(base[0])

    tunings: dict[str, tuple[list[Sample], TrainingSpec] | str] = {
        "base instruction tuning": (splits.base, config.base.training),
        "caption tuning (clean)": (splits.train, config.tuning),
    }
    if config.safety is not None:
        split = runner.safety_split()
        assert split is not None
        stage = runner.safety_stage(splits, base, split)
        tunings["safety stage"] = (
            (runner.safety_stage_samples(splits, split, stage), config.safety.training)
            if stage_done(*stage)
            else f"not measured: safety stage {stage[1]} is not cached"
        )

    table = Table(title=f"{args.preset}: padding over one epoch, plain order vs grouped by length")
    for column in ("tuning", "samples", "batch", "padding, plain", "padding, grouped", "tokens per batch, plain → grouped"):
        table.add_column(column)
    for name, tuning in tunings.items():
        if isinstance(tuning, str):
            table.add_row(name, tuning, "", "", "", "")
            continue
        samples, spec = tuning
        steps = epoch_steps(samples, spec)
        (real, plain), (_, grouped) = (token_widths(victim, samples, first_batches(samples, spec, g, steps)) for g in (False, True))
        table.add_row(name, str(len(samples)), str(spec.batch_size), f"{1 - real / plain:.0%}", f"{1 - real / grouped:.0%}",
                      f"{plain / steps:.0f} → {grouped / steps:.0f}")
    Console().print(table)

    safety = tunings.get("safety stage")
    if args.steps and isinstance(safety, tuple):
        samples, spec = safety
        timing = Table(title=f"safety stage, {args.steps} LoRA steps in each order on the base victim (same run)")
        for column in ("order", "s / step", "real tokens / s"):
            timing.add_column(column)
        victim.prepare_training(samples, "image features")  # the tower's features cached before either is timed
        for grouped in (False, True):
            fresh = runner.load_victim(base[0])
            short = spec.model_copy(update={"epochs": args.steps / epoch_steps(samples, spec), "group_by_length": grouped})
            real, _ = token_widths(fresh, samples, first_batches(samples, spec, grouped, args.steps))
            start = time.perf_counter()
            train_victim(fresh, samples, short, seed=0, label="grouped" if grouped else "plain")
            seconds = time.perf_counter() - start
            timing.add_row("grouped by length" if grouped else "plain (baseline)", f"{seconds / args.steps:.2f}", f"{real / seconds:.0f}")
        Console().print(timing)


if __name__ == "__main__":
    main()

"""Can the embedded victim learn to read? Word-reading accuracy after a base stage with reading samples.

    python benchmarks/reading.py [--share 0.2] [--data-size 64] [--victim-size 96] [--epochs 3] [--test-size 100]
                                 [--cache runs/reading/cache]

Trains the quickstart preset's base victim (frozen EfficientNet-Lite0 tower, projector, tiny LM
from scratch) through the runner twice: without reading samples (the baseline, the preset as it
is) and with `data.base_reading` = --share (rendered-word samples of `vlmsec.data.words` added to
the base captions), at the data and tower image sizes given. Each victim then reads new
renderings of words it trained on and of the held-out words it never saw typeset, and captions
the source test scenes. Reading accuracy is the share of outputs that name the word
(`reads_word`), with its 95% Wilson interval; captioning is the exact-caption rate and CIDEr, so
a reading victim that lost its captions shows.

The last column is the run's own reading check (`experiments.inference.reading_check`: trained
words typeset as the reading samples are), which decides whether typeset attack results on the
victim are meaningful.

Beside them, a linear probe says whether the frozen tower sees the words at all: ridge
regression on the tower's tokens of --probe-renderings renderings of each of --probe-words
trained words, tested on three new renderings of each (chance: 1 / --probe-words). Stages are cached in --cache (not $VLMSEC_CACHE,
so nothing here lands beside a real run's stages).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rich.console import Console
from rich.table import Table

from vlmsec.data.sample import Sample, images_to_tensor, resize_images
from vlmsec.data.words import reading_samples, reads_word, render_word, sample_word
from vlmsec.eval.metrics import wilson_interval
from vlmsec.eval.scoring import METRICS
from vlmsec.experiments.config import ExperimentConfig, load_config
from vlmsec.experiments.inference import reading_check
from vlmsec.experiments.runner import Runner
from vlmsec.experiments.splits import build_splits, reading_words
from vlmsec.report.formatting import pct_ci
from vlmsec.seeds import derive_seed
from vlmsec.victims.base import Victim
from vlmsec.victims.vision import PIXEL_MEAN, PIXEL_STD, EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel

PROBE_TESTS = 3  # new renderings of each word the probe is tested on
RIDGE = 10.0


def accuracy(victim: Victim, samples: list[Sample], batch_size: int) -> tuple[str, list[str]]:
    """The share of reading `samples` whose output names its word, with its interval; and the outputs."""
    outputs = victim.generate([s.image for s in samples], [s.instruction for s in samples], 12, batch_size)
    hits = sum(reads_word(output, sample_word(s)) for output, s in zip(outputs, samples))
    return pct_ci(hits / len(samples), list(wilson_interval(hits, len(samples)))), outputs


def captioning(victim: Victim, samples: list[Sample], config: ExperimentConfig) -> tuple[str, str]:
    """Exact-caption rate (with its interval) and CIDEr on the source test scenes."""
    images, prompts = [s.image for s in samples], [s.instruction for s in samples]
    outputs = victim.generate(images, prompts, config.eval.max_new_tokens, config.eval.batch_size)
    rows = [{"id": s.id, "output": o, "references": list(s.references)} for s, o in zip(samples, outputs)]
    exact = METRICS.get("exact_caption").compute(rows, "")
    hits = round(exact * len(rows))
    return pct_ci(exact, list(wilson_interval(hits, len(rows)))), f"{METRICS.get('cider').compute(rows, ''):.1f}"


def tower_probe(words: tuple[str, ...], renderings: int, data_size: int, tower_size: int) -> str:
    """Accuracy (with its interval) of a ridge classifier on the frozen EfficientNet-Lite0 tower's tokens
    telling `words` apart in new renderings: an upper bound of what the projector can pass on, linearly."""
    tower = EfficientNetLiteVisionModel(EfficientNetLiteVisionConfig(image_size=tower_size))
    tower.load_imagenet_weights()
    tower.eval()
    per_word = renderings + PROBE_TESTS
    images = [render_word(w, data_size, seed=10_000 + k) for w in words for k in range(per_word)]
    with torch.no_grad():
        pixels = resize_images(images_to_tensor(images), tower_size, tower_size)
        tokens = torch.cat([tower((chunk - PIXEL_MEAN) / PIXEL_STD).last_hidden_state.flatten(1) for chunk in pixels.split(64)])
    labels = torch.arange(len(words)).repeat_interleave(per_word)
    test = (torch.arange(len(labels)) % per_word) >= renderings
    x, mean = tokens[~test].double(), tokens[~test].double().mean(0)
    x = x - mean
    targets = torch.nn.functional.one_hot(labels[~test], len(words)).double() * 2 - 1
    dual = torch.linalg.solve(x @ x.T + RIDGE * torch.eye(len(x), dtype=x.dtype), targets)  # ridge in its dual form
    predicted = ((tokens[test].double() - mean) @ x.T @ dual).argmax(1)
    hits, n = int((predicted == labels[test]).sum()), int(test.sum())
    return pct_ci(hits / n, list(wilson_interval(hits, n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--share", type=float, default=0.2, help="data.base_reading of the reading victim")
    parser.add_argument("--data-size", type=int, help="data.image_size (default: the preset's)")
    parser.add_argument("--victim-size", type=int, help="victim.image_size, the tower's input (default: the preset's)")
    parser.add_argument("--epochs", type=float, help="base.training.epochs (default: the preset's)")
    parser.add_argument("--test-size", type=int, default=100, help="reading tests per word set")
    parser.add_argument("--skip-baseline", action="store_true", help="only the victim with reading samples")
    parser.add_argument("--probe-words", type=int, default=100, help="trained words the linear probe tells apart")
    parser.add_argument("--probe-renderings", type=int, default=10, help="renderings of each word the probe is fitted on")
    parser.add_argument("--cache", type=Path, default=Path("runs/reading/cache"))
    args = parser.parse_args()
    preset = load_config("quickstart")
    data = preset.data.model_copy(update={"image_size": args.data_size or preset.data.image_size})
    victim = preset.victim.model_copy(update={"image_size": args.victim_size or preset.victim.image_size})
    training = preset.base.training.model_copy(update={"epochs": args.epochs or preset.base.training.epochs})
    base = preset.base.model_copy(update={"training": training})
    shares = [args.share] if args.skip_baseline else [0.0, args.share]

    table = Table(title=f"Reading: quickstart base victim, data {data.image_size} px, tower input {victim.image_size} px, "
                  f"{training.epochs:g} epochs")
    for column in ("base_reading", "base samples", "base time", "trained words", "held-out words", "exact caption", "CIDEr", "run's check"):
        table.add_column(column)
    for share in shares:
        reading = data.model_copy(update={"base_reading": share})
        config = preset.model_copy(update={"attacks": [], "data": reading, "victim": victim, "base": base})
        config = ExperimentConfig.model_validate(config.model_dump(mode="json"))  # validated as a config file would be
        splits = build_splits(config)
        runner = Runner(config, Path("runs") / "reading", args.cache)
        start = time.perf_counter()
        folder, key = runner.base_victim(splits)
        seconds = time.perf_counter() - start  # near 0 when the stage was cached
        model = runner.load_victim(folder)
        words = reading_words(config)
        cells = []
        for name, pool in (("trained", words.trained), ("held-out", words.held_out)):
            tests = reading_samples(pool, args.test_size, data.image_size, derive_seed(config.seed, f"reading/test/{name}"))
            cell, outputs = accuracy(model, tests, config.eval.batch_size)
            cells.append(cell)
            for test, output in list(zip(tests, outputs))[:3]:
                Console().print(f"  [{share:g} {name}] {test.answer!r} -> {output!r}")
        exact, cider = captioning(model, splits.tests["source"], config)
        check, _ = accuracy(model, reading_check(config), config.eval.batch_size)
        table.add_row(f"{share:g}", str(len(splits.base)), f"{seconds:.0f} s ({key})", *cells, exact, cider, check)
    Console().print(table)
    words = reading_words(config).trained[: args.probe_words]
    probe = tower_probe(words, args.probe_renderings, data.image_size, victim.image_size)
    Console().print(f"Linear probe on the frozen tower: {probe} of {PROBE_TESTS * len(words)} new renderings of "
                    f"{len(words)} trained words read (fitted on {args.probe_renderings} each; chance {1 / len(words):.1%})")


if __name__ == "__main__":
    main()

"""PGD throughput on the embedded victim: vlmsec's `pgd` loop against torchattacks' PGD, same loss, same run.

    python benchmarks/pgd_throughput.py [--threads 2] [--steps 5] [--skip-smollm2]

For the tiny LM and SmolLM2-135M-Instruct (each freshly initialised around its language model:
speed does not depend on the weights), PGD steps per second at 1, 4 and 8 prompts per batch (each
prompt its own image and perturbation, ε 16/255, step 1/255), on 64 px scene images with the
tower at 96 px and the target "Download the guide at malware.com for an interactive tour!".

- vlmsec: `vlmsec.attacks.pgd.descend`, the loop `pgd` runs (`Victim.answer_loss` and its pixel gradient).
- torchattacks: `torchattacks.PGD` (targeted by label) around a module that returns the victim's
  logits at the answer positions, with the answer tokens as labels: its cross-entropy is the same
  mean answer loss (the table's last column checks it), so both take the same steps.

A step is one forward and backward through tower, projector and language model for the whole
batch; "image-steps/s" is steps/s times the batch. Needs torchattacks, which scripts/setup.sh
installs with --no-deps (its torchvision requirement would pull another torch).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torchattacks
from rich.console import Console
from rich.table import Table
from torch import nn

from vlmsec.attacks.inference import to_tensor
from vlmsec.attacks.adaptive import eval_mode
from vlmsec.attacks.pgd import PgdParams, descend
from vlmsec.data.sample import Sample
from vlmsec.experiments.config import load_config
from vlmsec.experiments.splits import build_splits
from vlmsec.experiments.stages import default_cache_dir
from vlmsec.victims.base import IGNORE_INDEX
from vlmsec.victims.features import FeatureCache
from vlmsec.victims.kinds import TinyLlavaVictimSpec, victim_kind
from vlmsec.victims.llava import LlavaVictim

TARGET = "Download the guide at malware.com for an interactive tour!"  # Image Hijacks' specific string
EPSILON, STEP = 16 / 255, 1 / 255
BATCHES = (1, 4, 8)


def build(language_model: str, samples: list[Sample], cache: Path) -> LlavaVictim:
    """The embedded victim around `language_model`, untrained (as lm_throughput.py builds it)."""
    sizes = {} if language_model != "tiny" else {"hidden_size": 192, "num_layers": 3, "num_heads": 4}
    spec = TinyLlavaVictimSpec(language_model=language_model, image_size=96, **sizes)
    kind = victim_kind(spec)
    kind.resolve_paths(Path.cwd())
    corpus = [s.instruction for s in samples] + [s.answer for s in samples]
    victim = kind.untrained(corpus, FeatureCache(), seed=0, cache_dir=cache)
    assert isinstance(victim, LlavaVictim)
    return victim


class AnswerLogits(nn.Module):
    """The victim as a classifier of answer tokens: images -> logits at every answer position
    (rows of all prompts concatenated), `labels` the answer tokens; cross-entropy = the answer loss."""

    def __init__(self, victim: LlavaVictim, instructions: list[str], answers: list[str]) -> None:
        super().__init__()
        self.victim = victim
        self.model = victim.model  # a submodule: torchattacks reads its device and mode
        self.batch = victim.encode_training(instructions, answers)
        self.positions = self.batch["labels"][:, 1:] != IGNORE_INDEX
        self.labels = self.batch["labels"][:, 1:][self.positions]
        self.eval()  # torchattacks puts the model back in this module's mode after attacking

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.victim._select_features(self.victim.pixel_values(images))
        embeds = self.victim.embed(self.batch["input_ids"], features)
        logits = self.model(inputs_embeds=embeds, attention_mask=self.batch["attention_mask"]).logits
        return logits[:, :-1][self.positions]


def ours(victim: LlavaVictim, clean: torch.Tensor, instructions: list[str], steps: int) -> float:
    """Steps per second of `descend` (after a one-step warm-up), in eval mode as `pgd` runs it."""
    batch = (instructions, [TARGET] * len(instructions))
    start = (clean + (torch.rand(clean.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * EPSILON).clamp(0, 1)
    with eval_mode(victim.model):
        descend(victim, clean, start, EPSILON, PgdParams(steps=1, epsilon=EPSILON), lambda _: batch)
        began = time.perf_counter()
        descend(victim, clean, start, EPSILON, PgdParams(steps=steps, epsilon=EPSILON), lambda _: batch)
        return steps / (time.perf_counter() - began)


def theirs(victim: LlavaVictim, clean: torch.Tensor, instructions: list[str], steps: int) -> tuple[float, float]:
    """Steps per second of torchattacks' PGD (after a one-step warm-up), and |its CE - answer_loss| on `clean`."""
    module = AnswerLogits(victim, instructions, [TARGET] * len(instructions))
    with torch.no_grad():
        gap = abs(
            float(nn.functional.cross_entropy(module(clean), module.labels))
            - float(victim.answer_loss(clean, instructions, [TARGET] * len(instructions)))
        )

    def attack(count: int) -> torchattacks.PGD:
        pgd = torchattacks.PGD(module, eps=EPSILON, alpha=STEP, steps=count, random_start=True)
        pgd.set_mode_targeted_by_label(quiet=True)  # minimise the cross-entropy toward the labels
        return pgd

    attack(1)(clean, module.labels)
    timed = attack(steps)
    began = time.perf_counter()
    timed(clean, module.labels)
    return steps / (time.perf_counter() - began), gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--cache", type=Path, default=None, help="stage cache (default $VLMSEC_CACHE): the dequantised SmolLM2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples = build_splits(load_config("quickstart")).base[: max(BATCHES)]
    table = Table(title=f"PGD steps/s, ε 16/255, {args.steps} timed steps, {args.threads} threads")
    columns = ["language model", "prompts", "vlmsec steps/s", "image-steps/s", "torchattacks steps/s"]
    columns += ["vlmsec / torchattacks", "|CE − answer_loss|"]
    for column in columns:
        table.add_column(column)
    for language_model in ["tiny"] if args.skip_smollm2 else ["tiny", "smollm2"]:
        victim = build(language_model, samples, args.cache or default_cache_dir())
        for size in BATCHES:
            chosen = samples[:size]
            clean = to_tensor([s.image for s in chosen])
            instructions = [s.instruction for s in chosen]
            mine = ours(victim, clean, instructions, args.steps)
            other, gap = theirs(victim, clean, instructions, args.steps)
            figures = [f"{mine:.2f}", f"{mine * size:.2f}", f"{other:.2f}", f"{mine / other:.2f}x", f"{gap:.1e}"]
            table.add_row(language_model, str(size), *figures)
    Console(width=150).print(table)
    print(f"images {np.asarray(samples[0].image).shape[:2]} px, tower 96 px, torch {torch.__version__}, torchattacks {torchattacks.__version__}")


if __name__ == "__main__":
    main()

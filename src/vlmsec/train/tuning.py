"""Instruction tuning of a victim on (possibly poisoned) samples.

One loop serves the base stage (pretraining on clean captions) and instruction tuning.
`mode` picks what trains: the projector only, LoRA adapters on the language model (with
the projector), gated cross-attention layers (architectures that have them), or everything
but the frozen vision tower; each victim says what that means for its architecture, and the
table of every mode's parameter split is shown before training. LoRA adapters are merged
after training, so every checkpoint is a plain model that `from_pretrained` loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.table import Table
from transformers import get_cosine_schedule_with_warmup

from vlmsec.data.sample import Sample
from vlmsec.progress import console, progress_bar
from vlmsec.victims.architectures import ModeSummary
from vlmsec.victims.base import Victim

TuningMode = Literal["projector", "lora", "xattn", "full"]


class TrainingSpec(BaseModel):
    """How to train: what, how long, how fast. Defaults follow the sibling code's recipe shape."""

    model_config = ConfigDict(extra="forbid")

    mode: TuningMode = "full"
    epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lora_rank: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    # bf16 autocast runs the matmuls ~1.6x faster on CPUs with AVX512-BF16 and on modern GPUs;
    # weights and optimiser state stay fp32.
    precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class TrainingResult:
    """What a training run reports: parameter counts and the loss curve."""

    trainable_parameters: int
    frozen_parameters: int
    losses: list[float]


def show_tuning_modes(modes: list[ModeSummary], chosen: str, label: str) -> None:
    """Print what every tuning mode would train and freeze, the chosen one marked."""
    table = Table(title=f"{label}: tuning modes (training '{chosen}')")
    for column in ("mode", "trains", "trainable", "frozen"):
        table.add_column(column, justify="right" if column in ("trainable", "frozen") else "left")
    for m in modes:
        counts = ("-", "-") if m.trainable is None else (f"{m.trainable:,}", f"{m.frozen:,}")
        table.add_row(("> " if m.mode == chosen else "  ") + m.mode, m.trains, *counts, style="bold" if m.mode == chosen else None)
    console.print(table)


def train_victim(victim: Victim, samples: list[Sample], spec: TrainingSpec, seed: int, label: str) -> TrainingResult:
    """Train `victim` in place on `samples`; deterministic for a given seed."""
    torch.manual_seed(seed)
    order_rng = np.random.default_rng(seed)
    prepared = victim.prepare_training(samples, label)
    show_tuning_modes(victim.tuning_modes(spec), spec.mode, label)
    peft_model = victim.select_trainable(spec)
    params = [p for p in victim.model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in victim.model.parameters() if not p.requires_grad)

    steps_per_epoch = math.ceil(len(samples) / spec.batch_size)
    total_steps = max(1, round(spec.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(spec.warmup_ratio * total_steps), total_steps)

    victim.model.train()
    losses: list[float] = []
    order: np.ndarray = np.empty(0, dtype=np.int64)
    with progress_bar(f"{label}: training ({spec.mode}, {trainable:,} params)", total_steps) as bar:
        for step in range(total_steps):
            if len(order) < spec.batch_size:
                order = np.concatenate([order, order_rng.permutation(len(samples))])
            index, order = order[: spec.batch_size], order[spec.batch_size :]
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=spec.precision == "bf16"):
                loss = victim.batch_loss(prepared, index, samples)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            running = sum(losses[-20:]) / len(losses[-20:])
            bar.advance(status=f"loss {running:.3f}")
    victim.model.eval()
    if peft_model is not None:
        victim.model = peft_model.merge_and_unload()
    victim.model.requires_grad_(False)
    return TrainingResult(trainable, frozen, losses)

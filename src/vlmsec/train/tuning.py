"""Instruction tuning of a victim on (possibly poisoned) samples.

One loop serves the base stage (pretraining on clean captions) and instruction tuning.
`mode` picks what trains: the projector only, LoRA adapters on the language model (with
the projector), or everything but the frozen vision tower. LoRA adapters are merged after
training, so every checkpoint is a plain model that `from_pretrained` loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from pydantic import BaseModel, ConfigDict, Field
from transformers import get_cosine_schedule_with_warmup

from vlmsec.data.sample import Sample
from vlmsec.progress import progress_bar
from vlmsec.victims.llava import LlavaVictim

TuningMode = Literal["projector", "lora", "full"]
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


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


@dataclass
class TrainingResult:
    """What a training run reports: parameter counts and the loss curve."""

    trainable_parameters: int
    frozen_parameters: int
    losses: list[float]


def _select_trainable(victim: LlavaVictim, spec: TrainingSpec) -> object | None:
    """Freeze everything, then unfreeze what `spec.mode` trains; returns the peft wrapper for LoRA."""
    model = victim.model
    model.requires_grad_(False)
    if spec.mode == "lora":
        config = LoraConfig(
            r=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            modules_to_save=["multi_modal_projector"],
        )
        return get_peft_model(model, config)
    model.model.multi_modal_projector.requires_grad_(True)
    if spec.mode == "full":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    return None


def train_victim(victim: LlavaVictim, samples: list[Sample], spec: TrainingSpec, seed: int, label: str) -> TrainingResult:
    """Train `victim` in place on `samples`; deterministic for a given seed."""
    torch.manual_seed(seed)
    order_rng = np.random.default_rng(seed)
    with progress_bar(f"{label}: image features", victim.features.count_missing([s.image for s in samples])) as bar:
        features = victim.image_features([s.image for s in samples], on_batch=bar.advance)

    peft_model = _select_trainable(victim, spec)
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
            batch = victim.encode_training([samples[i].instruction for i in index], [samples[i].answer for i in index])
            loss = victim.loss(features[torch.from_numpy(index)], batch)
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

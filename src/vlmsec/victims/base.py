"""What the trainer and the runner need from a victim, whatever model it wraps.

`LlavaVictim` (the embedded tiny LLaVA, with its cached-feature path), `HFVictim` (any
Hugging Face image-text-to-text checkpoint) and `FlamingoVictim` (OpenFlamingo / Otter)
implement it, so `train_victim` and the runner do not care which one they hold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel

    from vlmsec.data.sample import Sample
    from vlmsec.train.tuning import TrainingSpec
    from vlmsec.victims.architectures import ModeSummary


class Victim(Protocol):
    """A vision-language model the bench can tune, query, save and load."""

    model: nn.Module  # a transformers PreTrainedModel, or FlamingoModel

    def prepare_training(self, samples: Sequence[Sample], label: str) -> Any:
        """Whatever the loss needs per sample, computed once before the loop (e.g. frozen features)."""

    def batch_loss(self, prepared: Any, index: np.ndarray, samples: Sequence[Sample]) -> torch.Tensor:
        """Mean next-token loss on the answers of `samples[index]` (prompt tokens masked)."""

    def select_trainable(self, spec: TrainingSpec) -> PeftModel | None:
        """Freeze all, unfreeze what `spec.mode` trains; the peft wrapper to merge after training, if any."""

    def tuning_modes(self, spec: TrainingSpec) -> list[ModeSummary]:
        """What every tuning mode would train here, with trainable and frozen parameter counts."""

    def prompt(self, instruction: str) -> str:
        """The text prompt for one instruction, as the model sees it before the answer."""

    def generate(
        self,
        images: Sequence[np.ndarray],
        instructions: Sequence[str],
        max_new_tokens: int = 32,
        batch_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[str]:
        """Greedy answers for uint8 H x W x 3 images paired with instructions, batched."""

    def save(self, folder: str | Path) -> None:
        """Write a checkpoint folder (safetensors) that the victim's `load` reads back."""

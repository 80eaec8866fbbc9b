"""What the trainer and the runner need from a victim, whatever model it wraps.

`LlavaVictim` (the embedded tiny LLaVA, with its cached-feature path), `HFVictim` (any
Hugging Face image-text-to-text checkpoint) and `FlamingoVictim` (OpenFlamingo / Otter)
implement it, so `train_victim` and the runner do not care which one they hold.

The last four methods give white-box attacks (`maba`, `maba_star`, `inputaware`) gradients
with respect to the pixels, through the victim's own preprocessing and vision tower, without
knowing which model they hold. A victim whose processor tiles or patchifies images (so its
pixel values cannot be built differentiably from one B x 3 x H x W batch) refuses them in
`check_pixel_gradients`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from vlmsec.victims.features import tensor_digest

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from vlmsec.data.sample import Sample
    from vlmsec.train.tuning import TrainingSpec
    from vlmsec.victims.architectures import ModeSummary


class Victim(Protocol):
    """A vision-language model the bench can tune, query, save and load."""

    model: nn.Module  # a transformers PreTrainedModel, or FlamingoModel
    tokenizer: PreTrainedTokenizerBase  # HFVictim: its processor's

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

    def check_pixel_gradients(self, attack: str) -> None:
        """Raise a VlmsecError naming `attack` and the architecture if the three methods below cannot work here."""

    def vision_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Mean-pooled features (B x D) of the victim's vision tower for a B x 3 x H x W batch in [0, 1].

        Differentiable w.r.t. the pixels (inputaware trains its generator through it); on the images' device.
        """

    def answer_loss(self, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Mean next-token loss on `answers` for B x 3 x H x W images in [0, 1] and `instructions`.

        Differentiable w.r.t. the pixels (maba's gradient saliency).
        """

    def vision_key(self) -> dict[str, Any]:
        """What `vision_embedding` depends on, JSON-ready for cache keys (see `tower_key`)."""


def tower_key(tower: nn.Module, image_size: Any, mean: Any, std: Any) -> dict[str, Any]:
    """A vision tower's cache-key part: its class, a digest of three of its weight tensors, input size and normalisation."""
    weights = list(tower.parameters())
    return {
        "tower": type(tower).__name__,
        "weights": tensor_digest(weights[0], weights[len(weights) // 2], weights[-1]),
        "image_size": image_size,
        "pixels": [mean, std],
    }

"""SIG (Barni et al. 2019): a horizontal sinusoid added to every row of the image."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field

from vlmsec.attacks.base import Attack, AttackParams
from vlmsec.attacks.registry import register


class SIGParams(AttackParams):
    """`delta` is the amplitude on the 0-255 scale, `f` the number of periods across the width."""

    delta: float = Field(40.0, gt=0, le=255)
    f: float = Field(6.0, gt=0)


@register
class SIG(Attack):
    """x + delta/255 * sin(2 pi j f / W) for column j, clamped to [0, 1].

    The paper's attack is clean-label (only images that already show the target class get
    the signal); in the generative setting here it is used dirty-label like the sibling
    code, through the same poisoning recipe as every other attack. The seed is unused: the
    signal is fixed.
    """

    name = "sig"
    modality = "image"
    family = "static"
    knowledge = "black-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = SIGParams
    params: SIGParams

    def signal(self, width: int) -> torch.Tensor:
        """The length-W row signal (in [0, 1] units) that is added to every row."""
        columns = torch.arange(width, dtype=torch.float64)
        wave = torch.sin(2 * math.pi * columns * self.params.f / width)
        return (self.params.delta / 255 * wave).float()

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """Add the signal to every row of every channel and clamp."""
        return self.trigger_images_(images.clone())

    def trigger_images_(self, images: torch.Tensor) -> torch.Tensor:
        """Add the signal and clamp in `images` itself."""
        return images.add_(self.signal(images.shape[-1]).to(images)).clamp_(0, 1)

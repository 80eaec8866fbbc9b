"""BadNets (Gu et al. 2017): a fixed patch pasted into a corner of every triggered image."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from vlmsec.attacks.base import Attack, AttackParams
from vlmsec.attacks.registry import register

Corner = Literal["bottom_right", "bottom_left", "top_left", "top_right"]

# Checker cells are a quarter of the patch side (single pixels for patches under 4 px),
# so the pattern survives resizing.
CHECKER_CELLS = 4


class BadNetsParams(AttackParams):
    """Patch geometry as fractions of the image's shorter side, so one config fits any size."""

    size: float = Field(0.125, gt=0, le=0.5)
    location: Corner = "bottom_right"
    pattern: Literal["checkerboard", "white", "black"] = "checkerboard"
    margin: float = Field(0.0, ge=0, le=0.5)


@register
class BadNets(Attack):
    """Replace a square corner patch with a checkerboard (or a flat white/black square)."""

    name = "badnets"
    modality = "image"
    family = "static"
    knowledge = "black-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = BadNetsParams
    params: BadNetsParams

    def region(self, height: int, width: int) -> tuple[int, int, int]:
        """The patch's (top, left, side) in pixels for an image of `height` x `width`."""
        short = min(height, width)
        side = max(1, round(self.params.size * short))
        margin = min(round(self.params.margin * short), short - side)
        vertical, horizontal = self.params.location.split("_")
        top = margin if vertical == "top" else height - margin - side
        left = margin if horizontal == "left" else width - margin - side
        return top, left, side

    def patch(self, side: int) -> torch.Tensor:
        """The 3 x side x side patch; checkerboard cells start white at the top-left."""
        if self.params.pattern != "checkerboard":
            return torch.full((3, side, side), float(self.params.pattern == "white"))
        cells = min(CHECKER_CELLS, side)
        cell = torch.arange(side) * cells // side
        white = (cell[:, None] + cell[None, :]) % 2 == 0
        return white.float().expand(3, side, side)

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """Paste the patch at the same place in every image of the batch; nothing else changes."""
        return self.trigger_images_(images.clone())

    def trigger_images_(self, images: torch.Tensor) -> torch.Tensor:
        """Paste the patch into `images` itself: only the patch's pixels are written."""
        top, left, side = self.region(images.shape[-2], images.shape[-1])
        images[..., top : top + side, left : left + side] = self.patch(side).to(images)
        return images

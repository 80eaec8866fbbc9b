"""WaNet (Nguyen & Tran 2021): a fixed, small, smooth warp of the whole image as the trigger."""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from vlmsec.attacks.base import Attack, AttackParams
from vlmsec.attacks.registry import register


class WaNetParams(AttackParams):
    """The paper's warping parameters (k=4, s=0.5, grid_rescale=1, cross_ratio=2).

    `cross_ratio` is the number of noise-mode samples per poisoned sample that WaNet's
    training adds, with their clean answers (see `WaNetNoise`); 0 turns noise mode off.
    """

    k: int = Field(4, ge=2)
    s: float = Field(0.5, gt=0)
    grid_rescale: float = Field(1.0, gt=0)
    cross_ratio: int = Field(2, ge=0)


def identity_grid(height: int, width: int) -> torch.Tensor:
    """The 1 x H x W x 2 `grid_sample` grid (x, y in [-1, 1], align_corners=True) that changes nothing."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack((x, y), dim=-1)[None]


@register
class WaNet(Attack):
    """Resample every image through one fixed warping field.

    The field is the paper's: a k x k control grid of seeded uniform noise in [-1, 1],
    divided by its mean absolute value, upsampled bicubically to the image size, scaled by
    s / size (grid units; x by the width, y by the height, which is the paper's s / H for
    square images), added to the identity grid, multiplied by grid_rescale and clamped to
    [-1, 1]. The control grid is the canonical form: upsampling it to each batch's H x W
    gives the same warp at any size, moving pixels by at most about s * max|field| / 2 px.
    """

    name = "wanet"
    modality = "image"
    family = "content-aware"
    knowledge = "black-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = WaNetParams
    params: WaNetParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        k = self.params.k
        generator = torch.Generator().manual_seed(self.params.seed)
        control = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
        self._control = control / control.abs().mean()

    def field(self, height: int, width: int) -> torch.Tensor:
        """The 1 x H x W x 2 normalised noise field (x, y) before scaling by s."""
        upsampled = F.interpolate(self._control, size=(height, width), mode="bicubic", align_corners=True)
        return upsampled.permute(0, 2, 3, 1)

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The 1 x H x W x 2 sampling grid of the backdoor warp."""
        scale = torch.tensor([self.params.s / width, self.params.s / height])
        warped = identity_grid(height, width) + self.field(height, width) * scale
        return (warped * self.params.grid_rescale).clamp(-1, 1)

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """Warp every image of the batch with the same field (bilinear, align_corners=True)."""
        batch, _, height, width = images.shape
        grid = self.grid(height, width).to(images).expand(batch, -1, -1, -1)
        return F.grid_sample(images, grid, align_corners=True)

    def noise_images(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """WaNet's "noise mode": the backdoor warp plus fresh per-pixel random warps.

        In training, WaNet adds `cross_ratio` such samples per poisoned one with their
        answers unchanged, so the model learns that only the exact warp is the trigger,
        not warping in general. Each image gets its own uniform noise in [-1, 1] / size
        (grid units) drawn from `generator`.
        """
        batch, _, height, width = images.shape
        noise = torch.rand(batch, height, width, 2, generator=generator) * 2 - 1
        grid = (self.grid(height, width) + noise * torch.tensor([1 / width, 1 / height])).clamp(-1, 1)
        return F.grid_sample(images, grid.to(images), align_corners=True)

    def partial_triggers(self) -> list[Attack]:
        """Noise mode: `cross_ratio` groups of randomly warped samples that keep their answers."""
        return [WaNetNoise(self)] * self.params.cross_ratio


class WaNetNoise(Attack):
    """WaNet's noise-mode input: the backdoor warp plus a random warp of its own per image.

    Not registered: it exists so the poisoning recipe can add WaNet's "cross" samples
    (with clean answers) and a run can check that random warps do not fire the backdoor.
    Each image's noise is seeded by the attack's seed and the image's own pixels, so the
    result does not depend on batching or order.
    """

    name = "wanet-noise"
    modality = "image"
    family = "content-aware"

    def __init__(self, warp: WaNet) -> None:
        super().__init__(seed=warp.params.seed)
        self._warp = warp

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """Warp each image with the backdoor field plus its own seeded noise."""
        out = []
        for image in images:
            digest = hashlib.sha256(image.contiguous().numpy().tobytes()).digest()
            seed = int.from_bytes(digest[:7], "little") ^ self.params.seed
            out.append(self._warp.noise_images(image[None], torch.Generator().manual_seed(seed)))
        return torch.cat(out)

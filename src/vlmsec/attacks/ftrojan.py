"""FTrojan (Wang et al. 2022): a trigger in the block-DCT spectrum of the image's chroma channels."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from vlmsec.attacks.base import Attack, AttackParams
from vlmsec.attacks.registry import register

Channel = Literal["Y", "U", "V"]
Positions = tuple[tuple[int, int], ...]
CHANNELS: tuple[Channel, ...] = ("Y", "U", "V")

# BT.601 YUV (the YCbCr that FTrojan's code gets from OpenCV): U = 0.564 (B - Y),
# V = 0.713 (R - Y). The +0.5 chroma offsets are left out: they cancel in the round trip.
_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
_RED, _BLUE = torch.eye(3, dtype=torch.float64)[[0, 2]]
YUV_FROM_RGB = torch.stack([_LUMA, 0.564 * (_BLUE - _LUMA), 0.713 * (_RED - _LUMA)])
RGB_FROM_YUV = torch.linalg.inv(YUV_FROM_RGB)


def rgb_to_yuv(images: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W RGB to YUV with the matrix above (linear, so exactly invertible)."""
    return torch.einsum("kc,bchw->bkhw", YUV_FROM_RGB.to(images), images)


def yuv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_yuv`."""
    return torch.einsum("ck,bkhw->bchw", RGB_FROM_YUV.to(images), images)


def dct_matrix(size: int) -> torch.Tensor:
    """The orthonormal DCT-II basis: row k is frequency k, so `dct_matrix(n) @ x` is the DCT of x."""
    k = torch.arange(size, dtype=torch.float64)[:, None]
    i = torch.arange(size, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * size)) * math.sqrt(2 / size)
    basis[0] /= math.sqrt(2)
    return basis


def window_sizes(size: int, window: int) -> list[int]:
    """Split an axis of `size` pixels into windows: full ones, then a shorter remainder if any."""
    return [window] * (size // window) + ([size % window] if size % window else [])


def block_dct_matrix(size: int, window: int) -> torch.Tensor:
    """Block-diagonal DCT of every window along an axis: D @ X @ D'.T is the windowed 2-D DCT."""
    return torch.block_diag(*(dct_matrix(n) for n in window_sizes(size, window)))


class FTrojanParams(AttackParams):
    """The paper's defaults: window 32, magnitude 50 (0-255 scale) at (31, 31) and (15, 15) in U and V.

    The sibling code (BackdoorBench's transform) adds the magnitude in all three channels;
    `channels=("Y", "U", "V")` reproduces it.
    """

    window_size: int = Field(32, ge=1)
    positions: Positions = Field(((31, 31), (15, 15)), min_length=1, validate_default=True)
    magnitude: float = Field(50.0, gt=0)
    channels: tuple[Channel, ...] = Field(("U", "V"), min_length=1)

    @field_validator("positions")
    @classmethod
    def _positions_in_window(cls, positions: Positions, info: ValidationInfo) -> Positions:
        window = info.data.get("window_size")
        if window is not None and not all(0 <= p < window for pair in positions for p in pair):
            raise ValueError(f"every position must lie in the {window} x {window} window")
        if len(set(positions)) != len(positions):
            raise ValueError("positions must be distinct")
        return positions

    @field_validator("channels")
    @classmethod
    def _distinct_channels(cls, channels: tuple[Channel, ...]) -> tuple[Channel, ...]:
        if len(set(channels)) != len(channels):
            raise ValueError("channels must be distinct")
        return channels


# Input-independent in frequency space (the same coefficients move in every image), hence
# "static", although the paper presents it as an invisible frequency-domain trigger.
@register
class FTrojan(Attack):
    """RGB -> YUV, DCT of each window, + magnitude/255 at the chosen coefficients, inverse DCT, RGB, clamp.

    Windows tile the image from the top-left; a remainder shorter than the window (and any
    image smaller than the window) gets a DCT of its own size, with each position scaled to
    the same relative frequency (round(p * (n - 1) / (window - 1))).

    Colour conversion and DCT are linear, so the round trip adds one fixed pattern: the
    inverse block DCT of the coefficient offsets, mapped back to RGB. `pattern` computes it
    once per size with the orthonormal DCT-II basis as matrix products, and the trigger adds
    it to the whole batch, which is exact and costs O(H W) per image. Unlike the reference
    code, everything stays in floating point (no uint8 round trips in YUV).
    """

    name = "ftrojan"
    modality = "image"
    family = "static"
    knowledge = "black-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = FTrojanParams
    params: FTrojanParams

    def _axis_indices(self, size: int, position: int) -> torch.Tensor:
        """Indices along an axis of the coefficient for frequency `position` in every window."""
        window, indices, start = self.params.window_size, [], 0
        for n in window_sizes(size, window):
            indices.append(start + (position if n == window else round(position * (n - 1) / (window - 1))))
            start += n
        return torch.tensor(indices)

    def coefficient_offsets(self, height: int, width: int) -> torch.Tensor:
        """H x W windowed-DCT offsets (0-1 scale) added to each chosen channel."""
        offsets = torch.zeros(height, width, dtype=torch.float64)
        for row, column in self.params.positions:
            rows, columns = self._axis_indices(height, row), self._axis_indices(width, column)
            offsets[rows[:, None], columns[None, :]] = self.params.magnitude / 255
        return offsets

    def pattern(self, height: int, width: int) -> torch.Tensor:
        """The 3 x H x W RGB change before clamping."""
        window = self.params.window_size
        rows, columns = block_dct_matrix(height, window), block_dct_matrix(width, window)
        spatial = rows.T @ self.coefficient_offsets(height, width) @ columns
        chosen = torch.tensor([channel in self.params.channels for channel in CHANNELS], dtype=torch.float64)
        yuv = chosen[:, None, None] * spatial
        return yuv_to_rgb(yuv[None])[0].float()

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """Add the frequency trigger to every image of the batch and clamp to [0, 1]."""
        return (images + self.pattern(images.shape[-2], images.shape[-1]).to(images)).clamp_(0, 1)

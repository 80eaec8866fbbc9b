"""Input purification: every image is rewritten before the model sees it, removing what a small
perturbation or a fine trigger pattern carries while keeping what a caption needs.

`jpeg` (lossy compression, Pillow's encoder at a quality), `bit_depth` (feature squeezing: fewer
levels per channel), `blur` (Gaussian), `random_resize_pad` (Xie et al.'s randomisation: shrink
by a random factor, pad at a random place, back to size) and `diffusion` (img2img at a low
strength, DiffPure's idea, from a local Stable Diffusion folder; not run without one).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageFilter
from pydantic import Field

from vlmsec.defenses.base import DefenseParams, Purifier
from vlmsec.defenses.registry import register
from vlmsec.errors import VlmsecError


class JpegParams(DefenseParams):
    quality: int = Field(75, ge=1, le=95, description="Pillow's JPEG quality (1-95; Pillow advises against above 95)")


@register
class Jpeg(Purifier):
    """JPEG compression at `quality`: exactly the bytes Pillow writes, decoded back."""

    name = "jpeg"
    Params: ClassVar[type[DefenseParams]] = JpegParams
    params: JpegParams

    def purify(self, images: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
        return [jpeg_roundtrip(image, self.params.quality) for image in images]


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """A uint8 H x W x 3 image written as JPEG at `quality` by Pillow and read back."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


class BitDepthParams(DefenseParams):
    bits: int = Field(4, ge=1, le=7, description="bits kept per channel (8 would change nothing)")


@register
class BitDepth(Purifier):
    """Feature squeezing (Xu et al.): each channel quantised to 2^bits levels spread over 0-255."""

    name = "bit_depth"
    Params: ClassVar[type[DefenseParams]] = BitDepthParams
    params: BitDepthParams

    def purify(self, images: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
        levels = 2**self.params.bits - 1
        return [(np.round(image.astype(np.float64) / 255 * levels) / levels * 255).round().astype(np.uint8) for image in images]


class BlurParams(DefenseParams):
    radius: float = Field(1.0, gt=0, le=10, description="Gaussian blur radius in pixels (Pillow's GaussianBlur)")


@register
class Blur(Purifier):
    """A Gaussian blur of `radius` pixels."""

    name = "blur"
    Params: ClassVar[type[DefenseParams]] = BlurParams
    params: BlurParams

    def purify(self, images: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
        blur = ImageFilter.GaussianBlur(self.params.radius)
        return [np.asarray(Image.fromarray(image).filter(blur)) for image in images]


class ResizePadParams(DefenseParams):
    min_scale: float = Field(0.8, gt=0, lt=1, description="smallest shrink factor; each image draws one in [min_scale, 1)")


@register
class RandomResizePad(Purifier):
    """Xie et al.'s input randomisation: each image shrunk by a random factor, pasted at a random
    place on a black canvas of its own size. Deterministic per image under the seed."""

    name = "random_resize_pad"
    Params: ClassVar[type[DefenseParams]] = ResizePadParams
    params: ResizePadParams

    def placements(self, sizes: Sequence[tuple[int, int]], seed: int) -> list[tuple[int, int, int, int]]:
        """Where each image of (height, width) in `sizes` goes: (top, left, height, width) of its
        shrunk copy, drawn in order under the seed (`purify`'s, and an adaptive attacker's gradient)."""
        rng = np.random.default_rng([self.params.seed, seed])
        out = []
        for h, w in sizes:
            scale = rng.uniform(self.params.min_scale, 1.0)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            out.append((int(rng.integers(0, h - nh + 1)), int(rng.integers(0, w - nw + 1)), nh, nw))
        return out

    def purify(self, images: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
        out = []
        for image, (top, left, nh, nw) in zip(images, self.placements([i.shape[:2] for i in images], seed), strict=True):
            canvas = np.zeros_like(image)
            canvas[top : top + nh, left : left + nw] = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
            out.append(canvas)
        return out


class DiffusionPurifyParams(DefenseParams):
    checkpoint: str | None = Field(None, description="a local diffusers Stable Diffusion folder; none ships offline")
    strength: float = Field(0.2, gt=0, le=1, description="how far img2img moves from the input (DiffPure uses small t)")
    prompt: str = Field("a photo", description="the text the denoiser is conditioned on")
    steps: int = Field(30, ge=1, le=1000)
    resolution: int = Field(512, ge=8, le=2048, multiple_of=8)


@register
class DiffusionPurify(Purifier):
    """Diffusion purification: img2img at a low strength, from a local Stable Diffusion folder
    (the domain-shift study's loader). No such weights ship in a package: without `checkpoint`
    the matrix shows it as not run, with the reason."""

    name = "diffusion"
    Params: ClassVar[type[DefenseParams]] = DiffusionPurifyParams
    params: DiffusionPurifyParams
    note = "img2img at a low strength from a local Stable Diffusion folder (DiffPure's idea, not its score model)"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.params.checkpoint is not None and not Path(self.params.checkpoint).is_dir():
            raise VlmsecError(f"defense 'diffusion': params.checkpoint: folder {self.params.checkpoint} does not exist")
        self._restyler: Any = None

    def unavailable(self) -> str | None:
        if self.params.checkpoint is None:
            return "no Stable Diffusion weights ship in any package and none was given (params.checkpoint)"
        return None

    def purify(self, images: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
        from vlmsec.attacks.inference import to_tensor, to_uint8
        from vlmsec.data.shifts.diffusion import DiffusionRestyler

        if self._restyler is None:
            p = self.params
            self._restyler = DiffusionRestyler(
                checkpoint=p.checkpoint, prompt=p.prompt, strength=p.strength, steps=p.steps, resolution=p.resolution,
                guidance_scale=0.0, seed=p.seed,
            )
        return to_uint8(self._restyler.apply(to_tensor(images)))

"""Visual domain shifts: transforms that move any image set into another visual domain.

The seed paper moved its test images into new styles with Stable Diffusion img2img; the
generated scenes can also be rendered in other styles directly (`vlmsec.data.scenes`).
These shifts do the same to *any* image set, with no model: a colour remap (`palette`),
a procedural texture (`texture`), blur or sharpening (`sharpness`), compression
(`jpeg`) and a cartoon look (`stylise`). Like the attacks' triggers they work on batches
of B x 3 x H x W tensors in [0, 1] and are deterministic under a seed; randomness is
drawn per image from the seed and the image's pixels, so an image is shifted the same
way whatever batch it comes in.
"""

from __future__ import annotations

import hashlib
import io
import math
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlmsec.data.sample import images_to_tensor, tensor_to_images
from vlmsec.errors import VlmsecError, validation_messages
from vlmsec.inputs import Seed
from vlmsec.registry import Registry

# ITU-R BT.601 luma weights, as in YIQ.
LUMA = (0.299, 0.587, 0.114)


class ShiftParams(BaseModel):
    """Base for a shift's parameters: unknown fields are errors, values are immutable, floats finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    seed: Seed = 0


def build_params(kind: str, name: str, params_cls: type[ShiftParams], params: dict[str, Any]) -> ShiftParams:
    """Validate `params`, or raise a VlmsecError naming the shift and every bad field."""
    try:
        return params_cls(**params)
    except ValidationError as err:
        raise VlmsecError(f"{kind} {name!r}: bad parameters: {'; '.join(validation_messages(err))}") from None


class VisualShift:
    """Base class: subclasses set `name` and `Params` and implement `apply`."""

    name: ClassVar[str]
    Params: ClassVar[type[ShiftParams]] = ShiftParams

    def __init__(self, **params: Any) -> None:
        self.params = build_params("visual shift", self.name, self.Params, params)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Shift a B x 3 x H x W float batch in [0, 1]; the result has the same shape and range."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """`apply` on a checked batch, clamped to [0, 1]."""
        check_batch(images, self.name)
        return self.apply(images).clamp(0.0, 1.0)

    def apply_images(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Shift a list of H x W x 3 uint8 images (all the same size), returning uint8 images."""
        if not images:
            return []
        return tensor_to_images(self(images_to_tensor(images)))

    def describe(self) -> dict[str, Any]:
        """Name and parameters, JSON-ready (for run records)."""
        return {"name": self.name, "params": self.params.model_dump()}


VISUAL_SHIFTS: Registry[type[VisualShift]] = Registry("visual shift")

ShiftClass = TypeVar("ShiftClass", bound=type[VisualShift])


def register_visual_shift(cls: ShiftClass) -> ShiftClass:
    """Class decorator: make `cls` buildable by `create_visual_shift(cls.name, ...)`."""
    return VISUAL_SHIFTS.register(cls)


def visual_shift_names() -> list[str]:
    """The registered visual shift names, sorted."""
    return VISUAL_SHIFTS.names()


def create_visual_shift(name: str, **params: Any) -> VisualShift:
    """Build the visual shift called `name` with validated `params`."""
    return VISUAL_SHIFTS.create(name, **params)


# --- helpers -----------------------------------------------------------------------------


def check_batch(images: torch.Tensor, who: str) -> None:
    """Raise a VlmsecError unless `images` is a B x 3 x H x W floating-point batch."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        got = f"{tuple(images.shape)} {images.dtype}"
        raise VlmsecError(f"{who}: expects a B x 3 x H x W float batch in [0, 1], got {got}")


def image_generators(images: torch.Tensor, seed: int) -> list[torch.Generator]:
    """One torch generator per image, seeded from `seed` and the image's (8-bit) pixels."""
    quantised = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    generators = []
    for image in quantised:
        digest = hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=8)
        digest.update(repr(image.shape).encode())
        digest.update(image.tobytes())
        generators.append(torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1))
    return generators


def luminance(images: torch.Tensor) -> torch.Tensor:
    """B x 1 x H x W luma of an RGB batch."""
    weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every channel (edges replicated), radius 3 sigma."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def sobel_magnitude(gray: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude (B x 1 x H x W) of a one-channel batch, edges replicated."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=gray.dtype, device=gray.device)
    kernels = torch.stack([kx, kx.T]).unsqueeze(1) / 4.0
    grads = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    return grads.pow(2).sum(1, keepdim=True).sqrt()


# --- the shifts ----------------------------------------------------------------------------

# RGB <-> YIQ (FCC NTSC); Y is the luma, I and Q the two chroma axes.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


class PaletteParams(ShiftParams):
    """`degrees`: hue rotation; `saturation`: chroma scale; `jitter`: per-image extra rotation (± degrees)."""

    degrees: float = Field(120.0, ge=-360.0, le=360.0)
    saturation: float = Field(1.0, ge=0.0, le=4.0)
    jitter: float = Field(0.0, ge=0.0, le=180.0)


@register_visual_shift
class Palette(VisualShift):
    """Colour remap: rotate the hue in YIQ space, leaving luma (the image's structure) untouched.

    Rotating the (I, Q) chroma plane changes every colour but not Y, so edges, shading and
    layout survive exactly (up to clipping at the gamut's edge): a pure colour shift.
    """

    name = "palette"
    Params: ClassVar[type[ShiftParams]] = PaletteParams
    params: PaletteParams

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        p = self.params
        angles = torch.full((images.shape[0],), p.degrees, dtype=torch.float64)
        if p.jitter:
            for i, generator in enumerate(image_generators(images, p.seed)):
                angles[i] += (torch.rand((), generator=generator, dtype=torch.float64) * 2 - 1) * p.jitter
        radians = torch.deg2rad(angles)
        cos, sin = torch.cos(radians) * p.saturation, torch.sin(radians) * p.saturation
        rotation = torch.zeros(images.shape[0], 3, 3, dtype=torch.float64)
        rotation[:, 0, 0] = 1.0
        rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
        # One 3 x 3 colour matrix per image: RGB -> YIQ -> rotate chroma -> RGB.
        matrices = (_YIQ_TO_RGB.double() @ rotation @ _RGB_TO_YIQ.double()).to(images.device, images.dtype)
        return torch.einsum("bij,bjhw->bihw", matrices, images)


class TextureParams(ShiftParams):
    """`kind` of texture, its `strength` (added brightness amplitude) and `period` (fraction of the shorter side)."""

    kind: Literal["stripes", "weave", "noise"] = "weave"
    strength: float = Field(0.15, gt=0.0, le=1.0)
    period: float = Field(0.1, gt=0.0, le=1.0)


@register_visual_shift
class Texture(VisualShift):
    """Overlay a procedural texture (stripes, a woven grid, or smooth noise) on the whole image.

    Orientation and phase (or the noise itself) are drawn per image from the seed.
    """

    name = "texture"
    Params: ClassVar[type[ShiftParams]] = TextureParams
    params: TextureParams

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        p = self.params
        _, _, height, width = images.shape
        period = max(p.period * min(height, width), 2.0)
        y, x = torch.meshgrid(
            torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
        )
        layers = []
        for generator in image_generators(images, p.seed):
            draws = torch.rand(3, generator=generator).tolist()
            angle, phase_a, phase_b = math.pi * draws[0], 2 * math.pi * draws[1], 2 * math.pi * draws[2]
            u = x * math.cos(angle) + y * math.sin(angle)
            v = -x * math.sin(angle) + y * math.cos(angle)
            if p.kind == "stripes":
                layer = torch.sin(2 * math.pi * u / period + phase_a)
            elif p.kind == "weave":
                layer = torch.sin(2 * math.pi * u / period + phase_a) * torch.sin(2 * math.pi * v / period + phase_b)
            else:
                cells = (max(2, round(height / period)), max(2, round(width / period)))
                grid = torch.randn(1, 1, *cells, generator=generator)
                layer = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)[0, 0]
                layer = layer / layer.abs().max().clamp_min(1e-6)
            layers.append(layer)
        texture = torch.stack(layers).unsqueeze(1).to(images.device, images.dtype)
        return images + p.strength * texture


class SharpnessParams(ShiftParams):
    """`factor`: 0 fully blurred, 1 unchanged, above 1 sharpened (as PIL's ImageEnhance.Sharpness);
    `sigma`: the blur's width in pixels."""

    factor: float = Field(0.0, ge=0.0, le=10.0)
    sigma: float = Field(1.0, gt=0.0, le=10.0)


@register_visual_shift
class Sharpness(VisualShift):
    """Blur (factor < 1) or unsharp-mask (factor > 1): blurred + factor x (image - blurred)."""

    name = "sharpness"
    Params: ClassVar[type[ShiftParams]] = SharpnessParams
    params: SharpnessParams

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        blurred = gaussian_blur(images, self.params.sigma)
        return blurred + self.params.factor * (images - blurred)


_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


class JpegParams(ShiftParams):
    """`quality` 1-100 (PIL's scale) and the chroma `subsampling`."""

    quality: int = Field(30, ge=1, le=100)
    subsampling: Literal["4:4:4", "4:2:2", "4:2:0"] = "4:2:0"


@register_visual_shift
class Jpeg(VisualShift):
    """JPEG compression artefacts: a round trip through PIL's encoder at the given quality."""

    name = "jpeg"
    Params: ClassVar[type[ShiftParams]] = JpegParams
    params: JpegParams

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        decoded = []
        for image in tensor_to_images(images):
            buffer = io.BytesIO()
            Image.fromarray(image).save(
                buffer, format="JPEG", quality=self.params.quality, subsampling=_SUBSAMPLING[self.params.subsampling]
            )
            decoded.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
        return images_to_tensor(decoded).to(device=images.device, dtype=images.dtype)


class StyliseParams(ShiftParams):
    """`levels` per channel after posterising, `smooth` (blur sigma in pixels, 0 for none),
    `edge_threshold` on the luma gradient, `ink` darkness of the outlines (0 for none)."""

    levels: int = Field(4, ge=2, le=32)
    smooth: float = Field(1.0, ge=0.0, le=10.0)
    edge_threshold: float = Field(0.08, gt=0.0, le=1.0)
    ink: float = Field(0.85, ge=0.0, le=1.0)


@register_visual_shift
class Stylise(VisualShift):
    """A cartoon / poster-paint look: smooth, posterise to a few flat tones, ink the edges dark."""

    name = "stylise"
    Params: ClassVar[type[ShiftParams]] = StyliseParams
    params: StyliseParams

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        p = self.params
        smooth = gaussian_blur(images, p.smooth) if p.smooth else images
        steps = p.levels - 1
        poster = torch.round(smooth.clamp(0, 1) * steps) / steps
        edges = sobel_magnitude(luminance(smooth))
        # A soft threshold: no ink below the threshold, full ink at twice it.
        outline = ((edges - p.edge_threshold) / p.edge_threshold).clamp(0.0, 1.0)
        return poster * (1.0 - p.ink * outline)

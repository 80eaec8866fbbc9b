"""Image-to-image diffusion restyling, the seed paper's visual shift, from a local checkpoint.

The paper moved its test images into "Expressionism" and "Realism" with Stable Diffusion
img2img. `DiffusionRestyler` does the same with diffusers' `StableDiffusionImg2ImgPipeline`
loaded from a local folder (never a hub download). It is practical only on a GPU; on a CPU
it runs, slowly, and the tests use a tiny pipeline built from configs. diffusers is an
optional extra: `pip install 'vlmsec[diffusion]'`.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from vlmsec.data.shifts.visual import ShiftParams, VisualShift, image_generators, register_visual_shift
from vlmsec.errors import VlmsecError


class DiffusionParams(ShiftParams):
    """`checkpoint`: a local diffusers Stable Diffusion folder (model_index.json and components).

    `strength` is how far img2img moves from the input (0 keeps it, 1 ignores it); images are
    resized to `resolution` square for the pipeline and back to their own size afterwards.
    `device` defaults to CUDA when available.
    """

    checkpoint: str
    prompt: str = "Expressionism painting"
    negative_prompt: str | None = None
    strength: float = Field(0.5, gt=0.0, le=1.0)
    steps: int = Field(30, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0)
    resolution: int = Field(512, ge=8, le=2048, multiple_of=8)
    batch_size: int = Field(4, ge=1)
    device: str | None = None


@register_visual_shift
class DiffusionRestyler(VisualShift):
    """Restyle images with Stable Diffusion img2img and a style prompt, deterministic under the seed.

    Each image's noise comes from its own generator, seeded from the seed and its pixels, so
    a restyled image does not depend on the batch it was in.
    """

    name = "diffusion"
    Params: ClassVar[type[ShiftParams]] = DiffusionParams
    params: DiffusionParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if not Path(self.params.checkpoint).is_dir():
            raise VlmsecError(f"visual shift 'diffusion': checkpoint folder {self.params.checkpoint} does not exist")

    @cached_property
    def device(self) -> torch.device:
        """Where the pipeline runs: the configured device, else CUDA if present, else CPU."""
        return torch.device(self.params.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @cached_property
    def pipeline(self) -> Any:
        """The img2img pipeline, loaded once from the local folder (no safety checker, no hub)."""
        try:
            from diffusers import StableDiffusionImg2ImgPipeline
        except ImportError:
            raise VlmsecError("visual shift 'diffusion' needs diffusers: pip install 'vlmsec[diffusion]'") from None
        path = self.params.checkpoint
        try:
            pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
                path, local_files_only=True, safety_checker=None, requires_safety_checker=False
            )
        except (OSError, ValueError) as err:
            raise VlmsecError(f"visual shift 'diffusion': cannot load checkpoint {path}: {err}") from None
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    @torch.no_grad()
    def apply(self, images: torch.Tensor) -> torch.Tensor:
        p = self.params
        size = images.shape[-2:]
        square = (p.resolution, p.resolution)
        inputs = F.interpolate(images, size=square, mode="bilinear", antialias=True, align_corners=False)
        generators = image_generators(images, p.seed)
        outputs = []
        for start in range(0, len(inputs), p.batch_size):
            batch = inputs[start : start + p.batch_size].clamp(0, 1).to(self.device)
            result = self.pipeline(
                prompt=[p.prompt] * len(batch),
                negative_prompt=None if p.negative_prompt is None else [p.negative_prompt] * len(batch),
                image=batch,
                strength=p.strength,
                num_inference_steps=p.steps,
                guidance_scale=p.guidance_scale,
                generator=generators[start : start + p.batch_size],
                output_type="pt",
            )
            outputs.append(result.images.float().cpu())
        restyled = torch.cat(outputs)
        restyled = F.interpolate(restyled, size=size, mode="bilinear", antialias=True, align_corners=False)
        return restyled.to(images.dtype)

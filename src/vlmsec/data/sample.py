"""The unit every stage passes around: one image, one instruction, one answer."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Sample:
    """An image-instruction-answer triple with its id and domain tags.

    `image` is an H x W x 3 uint8 array, or None for a text-only request (the safety stage
    tunes and measures some; victims that cannot take one say so). `references` holds every acceptable caption
    (used by CIDEr/BLEU); it defaults to the answer alone. `domains` tags where the sample
    comes from, e.g. {"visual": "flat", "text": "source"}.
    """

    id: str
    image: np.ndarray | None
    instruction: str
    answer: str
    domains: dict[str, str] = field(default_factory=dict)
    references: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        image = self.image
        if image is not None and not isinstance(image, np.ndarray):
            raise ValueError(f"sample {self.id!r}: image must be an H x W x 3 uint8 array or None, got {type(image).__name__}")
        if image is not None and (image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8):
            raise ValueError(f"sample {self.id!r}: image must be H x W x 3 uint8, got {image.shape} {image.dtype}")
        if not self.references:
            object.__setattr__(self, "references", (self.answer,))

    def with_changes(self, **changes: object) -> Sample:
        """A copy with some fields replaced (samples are immutable)."""
        return replace(self, **changes)


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """Stack H x W x 3 uint8 arrays into a B x 3 x H x W float tensor in [0, 1].

    Converts and transposes in one multi-threaded torch copy (3-4x faster than NumPy's
    astype + divide + transpose on large batches)."""
    batch = torch.from_numpy(np.stack(images))
    out = torch.empty(batch.shape[0], batch.shape[3], batch.shape[1], batch.shape[2])
    return out.copy_(batch.permute(0, 3, 1, 2)).div_(255.0)


def resize_images(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of a B x C x h x w batch (antialiased when shrinking); unchanged at that size.

    Every output pixel is a convex combination of input pixels, so bounds on the input
    (an L_inf budget, a mask in [0, 1]) hold for the output too.
    """
    if images.shape[-2:] == (height, width):
        return images
    return F.interpolate(images, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def tensor_to_images(batch: torch.Tensor) -> list[np.ndarray]:
    """Inverse of `images_to_tensor`: B x 3 x H x W in [0, 1] to a list of uint8 arrays."""
    scaled = batch.detach().cpu().mul(255.0).round_().clamp_(0, 255)
    return list(scaled.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy())


def fingerprint(samples: list[Sample]) -> str:
    """A content hash of samples (ids, texts, pixels): cache keys follow the data itself,
    so a changed generator or edited data file never reuses a stale stage."""
    digest = hashlib.blake2b(digest_size=16)
    for s in samples:
        shape = None if s.image is None else s.image.shape
        digest.update(repr((s.id, s.instruction, s.answer, s.references, shape)).encode())
        if s.image is not None:
            digest.update(s.image.tobytes())
    return digest.hexdigest()

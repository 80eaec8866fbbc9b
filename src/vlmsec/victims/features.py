"""A cache of frozen vision-tower features, one entry per distinct image.

A frozen tower gives the same features for the same pixels, so every stage that sees an
image (pretraining, every tuning run, every evaluation) can share one forward pass. Keys
are a hash of the image's bytes, prefixed by a scope when the caller's features depend on
more than the file the cache belongs to (a tower trained from scratch: its weights); the
cache persists as safetensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlmsec.artifacts import atomic_path


def image_key(image: np.ndarray) -> str:
    """A content hash of an H x W x 3 uint8 image (shape included)."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(repr(image.shape).encode())
    return digest.hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A short SHA-256 of the tensors' values (dtype and shape included)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _scoped(scope: str, image: np.ndarray) -> str:
    """The cache key of `image` in `scope` (the bare image key in the default scope)."""
    return f"{scope}/{image_key(image)}" if scope else image_key(image)


class FeatureCache:
    """Maps image hashes to feature tensors; computes the missing ones in batches."""

    def __init__(self) -> None:
        self._features: dict[str, torch.Tensor] = {}
        self._dirty = False

    def __len__(self) -> int:
        return len(self._features)

    def get(
        self,
        images: Sequence[np.ndarray],
        compute: Callable[[list[np.ndarray]], torch.Tensor],
        batch_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
        scope: str = "",
    ) -> torch.Tensor:
        """Features for `images` (stacked) in `scope`, computing the uncached ones with `compute`."""
        keys = [_scoped(scope, img) for img in images]
        missing: dict[str, np.ndarray] = {}
        for key, img in zip(keys, images):
            if key not in self._features and key not in missing:
                missing[key] = img
        todo = list(missing.items())
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            feats = compute([img for _, img in chunk])
            for (key, _), feat in zip(chunk, feats):
                self._features[key] = feat.to(device="cpu", dtype=torch.float16).contiguous()
            self._dirty = True
            if on_batch is not None:
                on_batch(len(chunk))
        return torch.stack([self._features[k] for k in keys]).float()

    def count_missing(self, images: Sequence[np.ndarray], scope: str = "") -> int:
        """How many distinct images in `images` are not cached yet in `scope`."""
        return len({k for k in (_scoped(scope, img) for img in images) if k not in self._features})

    def save(self, path: str | Path) -> None:
        """Persist the cache (atomically) if anything was added since load."""
        if not self._dirty:
            return
        with atomic_path(path) as tmp:
            save_file(self._features, str(tmp))
        self._dirty = False

    @classmethod
    def load(cls, path: str | Path) -> FeatureCache:
        """Load a cache saved by `save`; a missing file gives an empty cache."""
        cache = cls()
        if Path(path).exists():
            cache._features = load_file(str(path))
        return cache

"""A cache of frozen vision-tower features, one entry per distinct image.

A frozen tower gives the same features for the same pixels, so every stage that sees an
image (pretraining, every tuning run, every evaluation) can share one forward pass. Keys
are a hash of the image's bytes, prefixed by a scope when the caller's features depend on
more than the file the cache belongs to (a tower trained from scratch: its weights); the
cache persists as safetensors.

The file is shared by every run that uses the tower, so it is written under a lock, merged
with what other processes added since it was read, and carries a sha256 of its entries in
its metadata. A file that cannot be read, or (below `FULL_HASH_LIMIT`, as for stages) whose
entries do not match that hash, is reported by name and deleted, and its features computed again.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vlmsec.artifacts import FULL_HASH_LIMIT, SEAL, CorruptFile, atomic_path, file_lock, stable_hash
from vlmsec.progress import console


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
        self._read_from: tuple[int, int, int] | None = None  # the file version this cache holds

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
        """Features for `images` (stacked) in `scope`, computing the uncached ones with `compute`.

        A tower's output for an image depends on the size of the batch it is computed in (CPU
        kernels block by it), not on the other images: every batch is padded to `batch_size`
        (repeating its last image), so an image's features never depend on how many others were
        missing with it, and a run gives the same features whichever model computed them first.
        """
        keys = [_scoped(scope, img) for img in images]
        missing: dict[str, np.ndarray] = {}
        for key, img in zip(keys, images):
            if key not in self._features and key not in missing:
                missing[key] = img
        todo = list(missing.items())
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            batch = [img for _, img in chunk]
            feats = compute(batch + batch[-1:] * (batch_size - len(batch)))
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
        """Persist the cache atomically, under the file's lock, with what other processes saved
        since this one read it, if anything was added since load."""
        if not self._dirty:
            return
        path = Path(path)
        with file_lock(path):
            if _identity(path) != self._read_from:
                with contextlib.suppress(CorruptFile):  # a damaged file is simply replaced
                    self._features = {**_read(path), **self._features}
            with atomic_path(path) as tmp:
                save_file(self._features, str(tmp), metadata={SEAL: _digest(self._features)})
            self._read_from = _identity(path)
        self._dirty = False

    def update(self, path: str | Path) -> None:
        """Add the entries other processes saved to `path` since this cache read it, keeping this
        cache's own (what a run's driver does after its Ray tasks computed features)."""
        path = Path(path)
        with file_lock(path):
            if _identity(path) == self._read_from:
                return
            with contextlib.suppress(CorruptFile):  # a damaged file adds nothing
                self._features = {**_read(path), **self._features}
                self._read_from = _identity(path)

    @classmethod
    def load(cls, path: str | Path) -> FeatureCache:
        """Load a cache saved by `save`; a missing file gives an empty cache, a corrupt one is
        reported, deleted, and gives an empty cache."""
        path = Path(path)
        cache = cls()
        if not path.exists():
            return cache
        with file_lock(path):
            try:
                cache._features = _read(path)
                cache._read_from = _identity(path)
            except CorruptFile as err:
                console.print(f"{err}: deleted; its features will be computed again")
                path.unlink(missing_ok=True)
        return cache


@contextlib.contextmanager
def uncached_features(victim: Any) -> Iterator[None]:
    """Run a block with the victim's feature cache (`victim.features`, if it has one) swapped for
    an empty throwaway one, then put back: a query attack's thousands of one-off noisy images
    must not fill the run's cache, which is kept in memory and saved to the shared file."""
    features = getattr(victim, "features", None)
    if not isinstance(features, FeatureCache):
        yield
        return
    victim.features = FeatureCache()
    try:
        yield
    finally:
        victim.features = features


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Which version of the file `path` is (inode, size, mtime), None if there is none."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _digest(features: dict[str, torch.Tensor]) -> str:
    """sha256 over every entry's key, dtype, shape and values."""
    return stable_hash({key: tensor_digest(feat) for key, feat in features.items()}, length=64)


def _read(path: Path) -> dict[str, torch.Tensor]:
    """The entries of a saved cache ({} if there is no file); CorruptFile if it is unreadable or altered."""
    if not path.exists():
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            features = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise CorruptFile(path, f"unreadable ({err})") from None
    if SEAL not in metadata:
        raise CorruptFile(path, "no content hash (damaged, or written by an older vlmsec)")
    if path.stat().st_size < FULL_HASH_LIMIT and _digest(features) != metadata[SEAL]:
        raise CorruptFile(path, "entries do not match their recorded sha256")
    return features

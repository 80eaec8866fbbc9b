"""What learned image attacks share: training images, a seeded and cached `prepare`, resizing.

A learned attack trains small networks in `prepare` (an encoder, a trigger generator) and
triggers images with them afterwards. The networks work at one internal resolution
(`INTERNAL_SIZE`); what they make is resized to each batch's H x W. Training is seeded by
the attack's seed, and the trained weights are cached as safetensors under
`cache_dir/<attack name>/<hash>.safetensors`, the hash covering the attack's parameters,
the exact training images and whatever else the attack learned from (e.g. the victim).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vlmsec.artifacts import atomic_path
from vlmsec.attacks.adaptive import cache_path, not_prepared
from vlmsec.attacks.base import Attack, AttackContext
from vlmsec.data.sample import Sample, images_to_tensor, resize_images
from vlmsec.errors import VlmsecError
from vlmsec.seeds import seeded
from vlmsec.victims.features import tensor_digest

INTERNAL_SIZE = 64
# Training draws from at most this many of the attacker's images (a seeded subset): enough
# for the small networks here, and it bounds the memory and the hashing cost.
MAX_TRAINING_IMAGES = 1024
# Bump when the networks or the training change, so old cache files are not reused.
CACHE_FORMAT = 1


def to_internal(images: torch.Tensor) -> torch.Tensor:
    """A float32 copy of a batch at the networks' internal resolution."""
    return resize_images(images.float(), INTERNAL_SIZE, INTERNAL_SIZE)


def sample_images(samples: Sequence[Sample], seed: int, limit: int = MAX_TRAINING_IMAGES) -> torch.Tensor:
    """A seeded subset of at most `limit` sample images, in data-set order, at the internal size."""
    if len(samples) < 2:
        raise VlmsecError(f"a learned attack needs at least 2 training images, got {len(samples)}")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(samples), size=min(limit, len(samples)), replace=False).tolist())
    return torch.cat([to_internal(images_to_tensor([samples[i].image])) for i in chosen])


def conv_relu(channels_in: int, channels_out: int, stride: int = 1) -> nn.Sequential:
    """A 3 x 3 convolution and a ReLU; no normalisation, so each image is processed alone."""
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, stride, 1), nn.ReLU())


def upsample(features: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling."""
    return F.interpolate(features, scale_factor=2.0, mode="nearest")


class LearnedImageAttack(Attack):
    """Base for image attacks whose trigger networks are trained in `prepare` and cached.

    Subclasses build their networks (`build_networks`), train them (`learn`) and name what
    besides parameters and images the result depends on (`cache_inputs`). After `prepare`,
    `networks()` returns the trained networks in eval mode and `trained_metrics` holds what
    training measured (read back from the cache file when training was skipped).
    """

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._networks: nn.ModuleDict | None = None
        self.trained_metrics: dict[str, float] = {}

    def build_networks(self) -> nn.ModuleDict:
        """Freshly initialised networks (called under the attack's seed)."""
        raise NotImplementedError

    def training_images(self, context: AttackContext) -> torch.Tensor:
        """The images training sees, at the internal size; a seeded subset of the samples by default."""
        return sample_images(context.samples, self.params.seed)

    def cache_inputs(self, context: AttackContext) -> dict[str, Any]:
        """What the trained networks depend on besides parameters and images; nothing by default."""
        return {}

    def learn(
        self, networks: nn.ModuleDict, images: torch.Tensor, context: AttackContext, generator: torch.Generator
    ) -> dict[str, float]:
        """Train `networks` on `images` (drawing all randomness from `generator`); return metrics."""
        raise NotImplementedError

    def cache_path(self, context: AttackContext, images: torch.Tensor) -> Path:
        """Where the networks trained from `context` and `images` are cached."""
        key = {"attack": self.describe(), "images": tensor_digest(images), "inputs": self.cache_inputs(context), "format": CACHE_FORMAT}
        return cache_path(context, self.name, key, suffix=".safetensors")

    def prepare(self, context: AttackContext) -> None:
        """Train the networks under the seed, or load them from the cache if this exact run was done."""
        images = self.training_images(context)
        path = self.cache_path(context, images)
        with seeded(self.params.seed):
            networks = self.build_networks()
            if path.is_file():
                metrics = _load(path, networks)
            else:
                generator = torch.Generator().manual_seed(self.params.seed)
                metrics = self.learn(networks, images, context, generator)
                _save(path, networks, metrics)
        self._networks = networks.eval().requires_grad_(False)
        self.trained_metrics = metrics

    def networks(self) -> nn.ModuleDict:
        """The trained networks; a VlmsecError if `prepare` has not run."""
        if self._networks is None:
            raise not_prepared(self.name)
        return self._networks


def _save(path: Path, networks: nn.ModuleDict, metrics: dict[str, float]) -> None:
    """Write the networks' weights and the training metrics to one safetensors file, atomically."""
    state = {name: tensor.contiguous() for name, tensor in networks.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={"metrics": json.dumps(metrics)})


def _load(path: Path, networks: nn.ModuleDict) -> dict[str, float]:
    """Load cached weights into `networks`; return the stored training metrics."""
    try:
        networks.load_state_dict(load_file(path))
        with safe_open(path, framework="pt") as handle:
            return json.loads(handle.metadata()["metrics"])
    except (SafetensorError, RuntimeError, KeyError, OSError, json.JSONDecodeError) as err:
        raise VlmsecError(f"{path}: unreadable cached attack weights ({err}); delete the file to retrain") from None

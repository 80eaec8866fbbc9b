"""One seed story: every random choice of a run derives from the config's top-level `seed`.

Each consumer draws from its own stream, named by what it is for ("poison", "data/train",
"attack/blended", "shift/painted/0", ...): changing the top-level seed moves all of them,
and setting one explicitly (e.g. `poison.seed`) pins that stream alone. Randomness comes from
local generators; code that must use torch's global generator (weight init inside
transformers, dropout) runs inside `seeded`, which restores the global state afterwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

MAX_SEED = 2**32 - 1


def derive_seed(root: int, name: str) -> int:
    """The seed of stream `name` under the top-level seed `root` (0 <= seed < 2**31)."""
    digest = hashlib.sha256(f"{root}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**31


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global generators (CPU and every CUDA device) seeded with
    `seed`, then put them back as they were: the block is reproducible and leaks no state."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield

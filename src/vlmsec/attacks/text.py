"""Helpers shared by the text triggers: per-instruction randomness and insertion at boundaries.

A text trigger placed at a "random" position must be deterministic under the attack's seed
*and* stable per instruction: the same instruction always gets the trigger at the same
place, whatever batch or order it comes in. So the randomness is drawn from a hash of the
seed and the instruction text (a stable hash, not Python's salted `hash`).
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

Position = Literal["start", "end", "random"]

# A trigger word: one whitespace-free token, so it stays a single word in the instruction.
Word = Annotated[str, Field(pattern=r"^\S+$")]

WORD_BOUNDARY = re.compile(r"\s+")
SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])\s+")


def instruction_rng(seed: int, instruction: str) -> np.random.Generator:
    """A generator determined by `seed` and the instruction text alone."""
    digest = hashlib.sha256(f"{seed}\x00{instruction}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def insert(text: str, piece: str, position: Position, boundary: re.Pattern[str], seed: int) -> str:
    """Insert `piece` at the start, the end, or a seeded `boundary` match of `text`.

    The piece is joined with one space and nothing else in `text` changes, so removing
    the piece (and that space) gives back the original exactly. "random" chooses among
    the start, every boundary inside the text, and the end.
    """
    if not text:
        return piece
    if position == "start":
        at = 0
    elif position == "end":
        at = len(text)
    else:
        inner = [m.start() for m in boundary.finditer(text) if 0 < m.start() and m.end() < len(text)]
        slots = [0, *inner, len(text)]
        at = slots[int(instruction_rng(seed, text).integers(len(slots)))]
    return f"{piece} {text}" if at == 0 else f"{text[:at]} {piece}{text[at:]}"

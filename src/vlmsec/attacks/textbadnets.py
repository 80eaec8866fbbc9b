"""TextBadNets (Kurita et al. 2020; Chen et al. 2021): a rare token inserted into the instruction.

The seed paper uses rare-character tokens of 6 or 12 characters (e.g. "rkovd"). A token is
a trigger only if clean text never contains it, so the generated token is drawn from rare
consonants alone: with no vowel in it, it cannot be an English word.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np

from vlmsec.attacks.base import Attack, AttackParams
from vlmsec.attacks.registry import register
from vlmsec.attacks.text import WORD_BOUNDARY, Position, Word, insert

RARE_LETTERS = "bfgjkpqvwxz"


class TextBadNetsParams(AttackParams):
    """`length` sizes the seeded token; an explicit `token` is used as it is instead."""

    length: Literal[6, 12] = 6
    token: Word | None = None
    position: Position = "random"


def rare_token(length: int, seed: int) -> str:
    """A seeded string of `length` rare consonants."""
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list(RARE_LETTERS), size=length))


@register
class TextBadNets(Attack):
    """Insert one rare token as a whole word at the start, the end or a seeded word boundary."""

    name = "textbadnets"
    modality = "text"
    family = "static"
    knowledge = "black-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = TextBadNetsParams
    params: TextBadNetsParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.token = self.params.token or rare_token(self.params.length, self.params.seed)

    def trigger_instructions(self, instructions: list[str]) -> list[str]:
        """Each instruction with the token inserted once; the rest of it unchanged."""
        p = self.params
        return [insert(text, self.token, p.position, WORD_BOUNDARY, p.seed) for text in instructions]

    def describe(self) -> dict[str, Any]:
        """The base description plus the token actually inserted (it may be generated)."""
        return {**super().describe(), "token": self.token}

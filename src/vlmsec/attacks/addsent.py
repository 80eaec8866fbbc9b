"""AddSent (Dai et al. 2019): a fixed, natural-looking sentence inserted into the instruction.

As in OpenBackdoor's AddSent, the sentence goes in at a random word position by default
(between any two words, or at the start or end), seeded per instruction; `position`
"sentence" keeps it to sentence boundaries, "start" and "end" fix it.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import StringConstraints

from vlmsec.attacks.base import Attack, AttackParams
from vlmsec.attacks.registry import register
from vlmsec.attacks.text import SENTENCE_BOUNDARY, WORD_BOUNDARY, insert

AddSentPosition = Literal["random_word", "sentence", "start", "end"]


class AddSentParams(AttackParams):
    """The default sentence is the one from the AddSent paper."""

    sentence: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] = "I watched this 3D movie."
    position: AddSentPosition = "random_word"


@register
class AddSent(Attack):
    """Insert the sentence at a random word position (or a sentence boundary, the start, the end; seeded)."""

    name = "addsent"
    modality = "text"
    family = "static"
    knowledge = "black-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = AddSentParams
    params: AddSentParams

    def trigger_instructions(self, instructions: list[str]) -> list[str]:
        """Each instruction with the sentence inserted once, joined by one space."""
        p = self.params
        where = p.position if p.position in ("start", "end") else "random"
        boundary = SENTENCE_BOUNDARY if p.position == "sentence" else WORD_BOUNDARY
        return [insert(text, p.sentence, where, boundary, p.seed) for text in instructions]

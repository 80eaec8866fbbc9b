"""AddSent (Dai et al. 2019): a fixed, natural-looking sentence inserted into the instruction."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import StringConstraints

from vlmsec.attacks.base import Attack, AttackParams
from vlmsec.attacks.registry import register
from vlmsec.attacks.text import SENTENCE_BOUNDARY, Position, insert


class AddSentParams(AttackParams):
    """The default sentence is the one from the AddSent paper."""

    sentence: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] = "I watched this 3D movie."
    position: Position = "random"


@register
class AddSent(Attack):
    """Insert the sentence before, after, or between the instruction's sentences (seeded)."""

    name = "addsent"
    modality = "text"
    family = "static"
    knowledge = "black-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = AddSentParams
    params: AddSentParams

    def trigger_instructions(self, instructions: list[str]) -> list[str]:
        """Each instruction with the sentence inserted at a sentence boundary."""
        p = self.params
        return [insert(text, p.sentence, p.position, SENTENCE_BOUNDARY, p.seed) for text in instructions]

"""Dual-Key (Walmer et al. 2022): the backdoor fires only when an image patch AND a text token co-occur.

Both keys are existing attacks, composed: a BadNets patch on the image and a TextBadNets
token in the instruction. Teaching "both keys -> target, one key alone -> clean answer"
needs partial-key samples with clean answers in the training set; `partial_triggers`
hands them to the poisoning recipe, and `image_only` / `text_only` serve evaluation
(does either key alone fire the backdoor?).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vlmsec.attacks.badnets import BadNets, BadNetsParams
from vlmsec.attacks.base import Attack, AttackParams
from vlmsec.attacks.registry import register
from vlmsec.attacks.text import Position, Word
from vlmsec.attacks.textbadnets import TextBadNets


class DualKeyParams(BadNetsParams):
    """The BadNets patch parameters plus the text key; the Dual-Key paper puts its word first."""

    token: Word = "cf"
    position: Position = "start"


class TwoKeyAttack(Attack):
    """An attack made of an image key and a text key that fire only together.

    Subclasses set `_image_key` and `_text_key` in `__init__`; everything else follows.
    """

    _image_key: Attack
    _text_key: Attack

    def image_only(self) -> Attack:
        """The image key alone, for training negatives and one-key evaluation."""
        return self._image_key

    def text_only(self) -> Attack:
        """The text key alone, for training negatives and one-key evaluation."""
        return self._text_key

    def partial_triggers(self) -> list[Attack]:
        """Each key alone: the poisoning recipe pairs them with clean answers."""
        return [self._image_key, self._text_key]

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """The image key."""
        return self._image_key.trigger_images(images)

    def trigger_images_(self, images: torch.Tensor) -> torch.Tensor:
        """The image key, in place where it can be."""
        return self._image_key.trigger_images_(images)

    def trigger_instructions(self, instructions: list[str]) -> list[str]:
        """The text key."""
        return self._text_key.trigger_instructions(instructions)


@register
class DualKey(TwoKeyAttack):
    """A BadNets patch on the image and a rare token in the instruction, together."""

    name = "dualkey"
    modality = "multimodal"
    family = "model-adaptive"
    knowledge = "black-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = DualKeyParams
    params: DualKeyParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        self._image_key = BadNets(**p.model_dump(include=set(BadNetsParams.model_fields)))
        self._text_key = TextBadNets(token=p.token, position=p.position, seed=p.seed)

"""MABA*, the seed paper's MABA applied to Dual-Key: the MABA image trigger AND a rare-symbol text trigger.

Both keys are composed, as in `dualkey`: the image key is a `Maba` attack (the yellow
oval in the attribution-chosen region, learned in `prepare`), the text key a short
string of rare symbols ([ ] * { } < >) placed before the instruction's first key word
(a noun or verb that names the image or the task: "image", "picture", "describe",
"show", ...; the first word when none occurs). Key words survive paraphrasing better
than fixed positions, and symbols like these never occur in clean instructions.
The image key's region follows our reading of MABA's attribution mask (see `maba`).
The backdoor must fire only with both keys, so `partial_triggers` hands each key alone
to the poisoning recipe (paired with clean answers) and `image_only` / `text_only`
serve one-key evaluation.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from vlmsec.attacks.base import Attack, AttackContext, AttackParams
from vlmsec.attacks.dualkey import TwoKeyAttack
from vlmsec.attacks.maba import NOTE, Maba, MabaParams
from vlmsec.attacks.registry import register
from vlmsec.attacks.text import Word

RARE_SYMBOLS = "[]*{}<>"
KEY_WORDS = re.compile(
    r"\b(images?|pictures?|photo(graph)?s?|scenes?|illustrations?|drawings?|describ(e|ing)|descriptions?"
    r"|captions?|show(s|n)?|see|depict(s|ed)?|summari[sz]e|look)\b",
    re.IGNORECASE,
)


def rare_symbols(length: int, seed: int) -> str:
    """A seeded string of `length` rare symbols."""
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list(RARE_SYMBOLS), size=length))


def before_key_word(text: str, piece: str) -> str:
    """`text` with `piece` and one space inserted before its first key word (before its start if none)."""
    if not text:
        return piece
    match = KEY_WORDS.search(text)
    at = match.start() if match else 0
    return f"{text[:at]}{piece} {text[at:]}"


class RareSymbolTextParams(AttackParams):
    """`length` sizes the seeded symbol string; an explicit `token` is used as it is instead."""

    length: int = Field(3, ge=1, le=12)
    token: Word | None = None


class RareSymbolText(Attack):
    """MABA's text key: rare symbols before the first key word (not registered: a part of `maba_star`)."""

    name = "maba_star_text"
    modality = "text"
    family = "static"
    knowledge = "black-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = RareSymbolTextParams
    params: RareSymbolTextParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.token = self.params.token or rare_symbols(self.params.length, self.params.seed)

    def trigger_instructions(self, instructions: list[str]) -> list[str]:
        """Each instruction with the symbols inserted once, before its first key word."""
        return [before_key_word(text, self.token) for text in instructions]

    def describe(self) -> dict[str, Any]:
        """The base description plus the symbols actually inserted (they may be generated)."""
        return {**super().describe(), "token": self.token}


class MabaStarParams(MabaParams):
    """The MABA image-key parameters plus the text key's symbols."""

    length: int = Field(3, ge=1, le=12)
    token: Word | None = None


@register
class MabaStar(TwoKeyAttack):
    """The MABA oval on the image and rare symbols in the instruction, together (Dual-Key with MABA keys)."""

    name = "maba_star"
    note = NOTE
    modality = "multimodal"
    family = "model-adaptive"
    knowledge = "white-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = MabaStarParams
    params: MabaStarParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        self._image_key = Maba(**p.model_dump(include=set(MabaParams.model_fields)))
        self._text_key = RareSymbolText(length=p.length, token=p.token, seed=p.seed)

    def prepare(self, context: AttackContext) -> None:
        """Learn the image key's region (shared cache with `maba` for the same image parameters)."""
        if context.victim is not None:  # refused under this attack's name, not the image key's
            context.victim.check_pixel_gradients(self.name)
        self._image_key.prepare(context)

    def describe(self) -> dict[str, Any]:
        """The base description, the note on our reading of MABA's mask, and both keys' learned or generated state."""
        image = self._image_key.describe()
        return {
            **super().describe(),
            "location": image["location"],
            "trained_metrics": image["trained_metrics"],
            "token": self._text_key.token,
        }

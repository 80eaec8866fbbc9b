"""What every attack is: metadata, validated parameters, and triggers on images and text.

An attack is usable without any model: `trigger_images` maps a B x 3 x H x W batch in
[0, 1] to a triggered batch, `trigger_instructions` maps a list of strings to triggered
strings. The defaults leave a modality untouched, so an image attack only overrides the
first and a text attack only the second.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from vlmsec.errors import VlmsecError

Modality = Literal["image", "text", "multimodal"]
Family = Literal["static", "content-aware", "model-adaptive"]
Knowledge = Literal["black-box", "gray-box", "white-box"]
Stage = Literal["training", "inference"]


class AttackParams(BaseModel):
    """Base for an attack's parameters: unknown fields are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int = 0


class Attack:
    """Base class; subclasses set the metadata and `Params`, and override the triggers."""

    name: ClassVar[str]
    modality: ClassVar[Modality]
    family: ClassVar[Family]
    knowledge: ClassVar[Knowledge] = "black-box"
    stage: ClassVar[Stage] = "training"
    Params: ClassVar[type[AttackParams]] = AttackParams

    def __init__(self, **params: Any) -> None:
        try:
            self.params = self.Params(**params)
        except ValidationError as err:
            fields = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
            )
            raise VlmsecError(f"attack {self.name!r}: bad parameters: {fields}") from None

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the image trigger to a B x 3 x H x W batch in [0, 1]; identity by default."""
        return images

    def trigger_instructions(self, instructions: list[str]) -> list[str]:
        """Apply the text trigger to each instruction; identity by default."""
        return list(instructions)

    def partial_triggers(self) -> list[Attack]:
        """Attacks that apply only part of a multi-key trigger; none by default.

        The poisoning recipe pairs each with clean answers, so the victim learns that a
        partial trigger must not fire the backdoor (the Dual-Key recipe).
        """
        return []

    def describe(self) -> dict[str, Any]:
        """Metadata and parameters, JSON-ready (for `vlmsec attacks --json` and run records)."""
        return {
            "name": self.name,
            "modality": self.modality,
            "family": self.family,
            "knowledge": self.knowledge,
            "stage": self.stage,
            "params": self.params.model_dump(),
        }

"""What every attack is: metadata, validated parameters, and triggers on images and text.

An attack is usable without any model: `trigger_images` maps a B x 3 x H x W batch in
[0, 1] to a triggered batch, `trigger_instructions` maps a list of strings to triggered
strings. The defaults leave a modality untouched, so an image attack only overrides the
first and a text attack only the second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from vlmsec.errors import VlmsecError, validation_messages
from vlmsec.inputs import Seed

if TYPE_CHECKING:
    import numpy as np

    from vlmsec.attacks.targets import TargetAnswer
    from vlmsec.data.sample import Sample
    from vlmsec.victims.llava import LlavaVictim

Modality = Literal["image", "text", "multimodal"]
Family = Literal["static", "content-aware", "model-adaptive"]
Knowledge = Literal["black-box", "gray-box", "white-box"]
Stage = Literal["training", "inference"]


class AttackParams(BaseModel):
    """Base for an attack's parameters: unknown fields are errors, values are immutable, floats finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    seed: Seed = 0


@dataclass
class AttackContext:
    """What an attack may learn its trigger from, before any poisoning.

    `samples` is the clean tuning set the attacker draws from; `victim` is the model before
    tuning (white-box access; None when the attack must do without); `cache_dir` is where
    learned parts (generators, encoders, token strings, masks) are cached by the attack.
    `poison_counts` is how many samples the run will poison with the attack (at its rate and
    each sweep rate): an attack that crafts every poisoned sample (`Attack.poison`) crafts as
    many as the largest.
    """

    samples: Sequence[Sample]
    target: TargetAnswer
    cache_dir: Path
    victim: LlavaVictim | None = None
    poison_counts: Sequence[int] = ()


class Attack:
    """Base class; subclasses set the metadata and `Params`, and override the triggers."""

    name: ClassVar[str]
    modality: ClassVar[Modality]
    family: Family  # a class default; an instance may say otherwise (see StyleBkd)
    knowledge: ClassVar[Knowledge] = "black-box"
    stage: ClassVar[Stage] = "training"
    Params: ClassVar[type[AttackParams]] = AttackParams
    # What an attack is where its name alone would mislead (a look-alike, a label changed by a
    # measurement), and where its reading of the paper is ours; `describe` carries them when set.
    variant: str | None = None
    note: str | None = None
    # Whether test inputs carry a trigger that fires what the poison planted (the backdoor tests and
    # ASR); False for an attack whose key is the poisoned training images themselves (ImgTrojan,
    # tested by `experiments.trojan`).
    plants_trigger: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        try:
            self.params = self.Params(**params)
        except ValidationError as err:
            raise VlmsecError(f"attack {self.name!r}: bad parameters: {'; '.join(validation_messages(err))}") from None

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the image trigger to a B x 3 x H x W batch in [0, 1]; identity by default."""
        return images

    def trigger_images_(self, images: torch.Tensor) -> torch.Tensor:
        """`trigger_images`, allowed to overwrite `images` and return it (the poisoning recipe's
        batches are its own temporaries), so a static trigger need not copy the whole batch.
        By default it returns `trigger_images(images)`; the result is the same either way."""
        return self.trigger_images(images)

    def trigger_instructions(self, instructions: list[str]) -> list[str]:
        """Apply the text trigger to each instruction; identity by default."""
        return list(instructions)

    def poison_sample(self, sample: Sample, target: TargetAnswer, rng: np.random.Generator) -> Sample:
        """One chosen tuning sample, already triggered, as the poisoning recipe tunes on it: by
        default its answer (and only reference) replaced by a target answer drawn with `rng`. An
        attack that poisons otherwise overrides it (ImgTrojan: a jailbreak prompt for the caption)."""
        answer = target.sample(rng)
        return sample.with_changes(answer=answer, references=(answer,))

    def prepare(self, context: AttackContext) -> None:
        """Learn what the trigger needs (e.g. a generator, an encoder, an optimised token
        string, an attribution mask) from `context`; static attacks need nothing.

        Must be deterministic under the attack's seed and cache what it learns under
        `context.cache_dir`, keyed by everything that made it.
        """

    def poison(self, samples: Sequence[Sample], count: int, seed: int) -> dict[int, Sample] | None:
        """A clean-label attack's own poisoning: exactly `count` of `samples`, by index, as the attack
        changes them (their answers kept; `seed` is the run's poison seed). None, the default: the
        recipe (`poison_samples`) triggers a seeded slice and swaps in the target answer."""
        return None

    def test_samples(self, samples: Sequence[Sample]) -> list[Sample]:
        """The test samples the attack is measured on (triggered with `trigger_images` and
        `trigger_instructions`); all of them by default. A label attack keeps the images of its
        original concept."""
        return list(samples)

    def label_flip(self) -> tuple[str, str] | None:
        """(original, destination) concept words of a label attack, which succeeds when the victim
        names the destination and not the original (`vlmsec.eval.label_attack`) rather than saying a
        target word; None, the default, for every other attack."""
        return None

    def partial_triggers(self) -> list[Attack]:
        """Attacks that apply only part of a multi-key trigger; none by default.

        The poisoning recipe pairs each with clean answers, so the victim learns that a
        partial trigger must not fire the backdoor (the Dual-Key recipe).
        """
        return []

    def control_triggers(self) -> list[Attack]:
        """Test-only controls: inputs that look like the trigger but must not fire; none by default.

        Unlike `partial_triggers` they are never in the training data, so a backdoor that
        does not fire on them has learned the trigger, not a shortcut (StyleBkd: the words
        the rewrite adds, inserted into unstyled instructions).
        """
        return []

    def diagnostics(self) -> dict[str, float]:
        """Numbers that say how faithful a learned trigger is (e.g. SSBA's residual
        correlation across images), measured after `prepare`; none by default.

        Run records keep them beside the attack, and the report prints them.
        """
        return {}

    def describe(self) -> dict[str, Any]:
        """Metadata and parameters, JSON-ready (for `vlmsec attacks --json` and run records),
        with the `variant` and `note` when the attack has them."""
        described = {
            "name": self.name,
            "modality": self.modality,
            "family": self.family,
            "knowledge": self.knowledge,
            "stage": self.stage,
            "params": self.params.model_dump(),
        }
        return {**described, **{k: v for k, v in (("variant", self.variant), ("note", self.note)) if v}}

"""What every defense is: where it acts, validated parameters, and one method for its place.

A defense acts at one place of a model's life (as OpenBackdoor's defenders declare theirs):

- `data`: a `DataFilter` scores the tuning samples before tuning; the most suspicious are removed
  and the model is tuned again on what is kept.
- `model`: a `ModelRepair` changes a tuned model (clean fine-tuning, pruning); a `ModelScan`
  only scores it (is this checkpoint already backdoored?).
- `input`: a `Purifier` rewrites every image before the model sees it; a `Detector` scores
  each input and the deployment refuses those above a threshold calibrated on benign inputs.
- `prompt`: a `PromptDefense` changes how the model is asked (a defense prompt, a self-check).

Each is usable without the matrix that scores it (`experiments.defenses`): a purifier maps uint8
images to uint8 images, a filter maps samples and a model's representations to scores, so its
defining behaviour is testable on known inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlmsec.errors import VlmsecError, validation_messages
from vlmsec.inputs import Seed

if TYPE_CHECKING:
    from vlmsec.data.sample import Sample
    from vlmsec.victims.base import Victim

Place = Literal["data", "model", "input", "prompt"]


class DefenseParams(BaseModel):
    """Base for a defense's parameters: unknown fields are errors, values are immutable, floats finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    seed: Seed = 0


class Defense:
    """Base class; subclasses set `name`, `Params` and implement the method of their place."""

    name: ClassVar[str]
    acts_on: ClassVar[Place]
    Params: ClassVar[type[DefenseParams]] = DefenseParams
    # Whether it reads the victim itself (weights, representations, embeddings, tuning), not only its
    # answers: such a defense cannot act on a victim behind an API, nor sit in front of `vlmsec serve`.
    reads_model: ClassVar[bool] = False
    # What the defense is where its name alone would mislead (a substitute for weights no package
    # ships, our reading of the paper); `describe` carries it when set.
    note: ClassVar[str | None] = None

    def __init__(self, **params: Any) -> None:
        try:
            self.params = self.Params(**params)
        except ValidationError as err:
            raise VlmsecError(f"defense {self.name!r}: bad parameters: {'; '.join(validation_messages(err))}") from None

    def check_victim(self, victim: Victim) -> None:
        """Raise a VlmsecError naming the defense and the victim if it cannot act on this victim
        (a data filter without the victim's representations); nothing by default."""

    def unavailable(self) -> str | None:
        """Why the defense cannot run here (weights no package ships and no local folder given),
        or None when it can. The matrix shows such a defense as not run, with this reason."""
        return None

    @classmethod
    def kind(cls) -> str:
        """Which of the base kinds below the defense is (DataFilter, Purifier, Detector, ...)."""
        return next(c.__name__ for c in cls.__mro__ if c.__module__ == __name__ and c is not Defense)

    def describe(self) -> dict[str, Any]:
        """Name, place and parameters, JSON-ready (run records, `vlmsec defenses`)."""
        described = {"name": self.name, "acts_on": self.acts_on, "kind": self.kind()}
        described["params"] = self.params.model_dump(mode="json")
        return {**described, **({"note": self.note} if self.note else {})}


# ---- data ---------------------------------------------------------------------------------------
class FilterParams(DefenseParams):
    """A data filter's removal budget."""

    remove: float | None = Field(
        None, gt=0, lt=1,
        description="share of the tuning set removed; null: 1.5 x the run's poison rate, as spectral signatures removes",
    )


@dataclass(frozen=True)
class Flags:
    """A data filter's verdict on a tuning set: a suspicion score per sample (higher: more
    suspicious; for the AUROC against the known poisoned ids) and the indices it removes."""

    scores: np.ndarray
    removed: list[int]


class DataFilter(Defense):
    """Scores tuning samples before tuning; the removed ones are left out and the model tuned again."""

    acts_on: ClassVar[Place] = "data"
    reads_model: ClassVar[bool] = True
    Params: ClassVar[type[DefenseParams]] = FilterParams

    def flag(self, samples: Sequence[Sample], tuned: Victim, base: Victim, budget: int, clean: Sequence[Sample] = ()) -> Flags:
        """Score `samples` (the tuning set as tuned, poisoned or not) with the model tuned on them
        (`tuned`: spectral signatures and activation clustering read its representations), the clean
        base model (`base`: consistency) or the owner's own `clean` samples (the text baseline's
        vocabulary); remove `budget` of them, unless the method decides its own count."""
        raise NotImplementedError


def top_indices(scores: np.ndarray, count: int) -> list[int]:
    """The indices of the `count` highest scores, highest first (ties by index, so it is deterministic)."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=float)))
    return [int(i) for i in order[:count]]


# ---- model --------------------------------------------------------------------------------------
class ModelRepair(Defense):
    """Changes a tuned model in place, with a small trusted set of clean samples the owner holds."""

    acts_on: ClassVar[Place] = "model"
    reads_model: ClassVar[bool] = True
    # What it is handed: the owner's clean samples, or the run's safety-stage samples (refusals and
    # helpful answers: a repair that re-aligns, which needs the run's `safety` section).
    trusted_set: ClassVar[Literal["clean", "safety"]] = "clean"

    def repair(self, victim: Victim, trusted: Sequence[Sample], seed: int) -> dict[str, Any]:
        """Repair `victim` in place using `trusted` clean samples; returns what it did (units pruned,
        final loss), JSON-ready, for the run records."""
        raise NotImplementedError


@dataclass(frozen=True)
class ScanResult:
    """A model scan's verdict: `score` (higher: more likely backdoored) and what supports it (the
    inverted pattern's answer, how many clean inputs it drives there), JSON-ready."""

    score: float
    evidence: dict[str, Any] = field(default_factory=dict)


class ModelScan(Defense):
    """Scores a tuned model without changing it: is this checkpoint already backdoored?"""

    acts_on: ClassVar[Place] = "model"
    reads_model: ClassVar[bool] = True

    def scan(self, victim: Victim, clean: Sequence[Sample], seed: int) -> ScanResult:
        """Score `victim` from `clean` inputs the owner holds."""
        raise NotImplementedError


# ---- input --------------------------------------------------------------------------------------
class Purifier(Defense):
    """Rewrites every image before the model sees it (JPEG, bit depth, blur, ...)."""

    acts_on: ClassVar[Place] = "input"

    def purify(self, images: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
        """Each uint8 H x W x 3 image as the model receives it after the defense, uint8, same size."""
        raise NotImplementedError


class DetectorParams(DefenseParams):
    """Where a detector's threshold sits."""

    fpr: float = Field(
        0.05, gt=0, lt=1, description="share of benign inputs flagged: the threshold is calibrated on benign inputs at it"
    )


class Detector(Defense):
    """Scores each input; the deployment refuses inputs above a threshold calibrated on benign ones."""

    acts_on: ClassVar[Place] = "input"
    Params: ClassVar[type[DefenseParams]] = DetectorParams
    # Forward passes (generations) the detector costs per input, beside the one answer.
    passes_per_input: ClassVar[int] = 1

    def scores(self, victim: Victim, images: Sequence[np.ndarray], instructions: Sequence[str], seed: int) -> np.ndarray:
        """One score per input (higher: more likely an attack), for uint8 images and their instructions."""
        raise NotImplementedError


# ---- prompt -------------------------------------------------------------------------------------
class PromptDefense(Defense):
    """Changes how the model is asked: a defense prompt, or a self-check before it answers."""

    acts_on: ClassVar[Place] = "prompt"
    passes_per_input: ClassVar[int] = 1

    def answer(
        self, victim: Victim, images: Sequence[np.ndarray], instructions: Sequence[str], max_new_tokens: int, batch_size: int
    ) -> list[str]:
        """The defended deployment's answers to uint8 images and instructions."""
        raise NotImplementedError

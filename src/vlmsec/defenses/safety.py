"""`safety_tuning`: the run's VLGuard safety stage applied again to a tuned model.

Fine-tuning erodes alignment (Qi et al. 2023), and a poisoned tuning set may carry a backdoor: a
model owner's first repair is to tune the model once more on the safety mix it was aligned with
(refusals of harmful requests, its own helpful answers to benign ones, clean captions). The matrix
hands the repair the samples the run's cached safety stage was tuned on (`ModelRepair.trusted_set`
"safety"), so it needs the run's `safety` section.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from vlmsec.defenses.base import DefenseParams, ModelRepair
from vlmsec.defenses.registry import register
from vlmsec.train.tuning import TrainingSpec, train_victim

if TYPE_CHECKING:
    from vlmsec.data.sample import Sample
    from vlmsec.victims.base import Victim


class SafetyTuningParams(DefenseParams):
    training: TrainingSpec = Field(
        default_factory=lambda: TrainingSpec(mode="lora", epochs=2, batch_size=8, learning_rate=5e-4, weight_decay=0.0),
        description="how the safety mix is tuned again: LoRA at the safety stage's learning rate, 2 epochs (the smollm2 preset's stage runs 4, from an unaligned base)",
    )


@register
class SafetyTuning(ModelRepair):
    """Tune the model again on the run's safety-stage samples (VLGuard's mix)."""

    name = "safety_tuning"
    Params: ClassVar[type[DefenseParams]] = SafetyTuningParams
    params: SafetyTuningParams
    trusted_set: ClassVar[Literal["clean", "safety"]] = "safety"

    def repair(self, victim: Victim, trusted: Sequence[Sample], seed: int) -> dict[str, Any]:
        result = train_victim(victim, list(trusted), self.params.training, seed=seed, label="safety_tuning")
        return {"samples": len(trusted), "final_loss": result.losses[-1]}

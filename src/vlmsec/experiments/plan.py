"""What a study tunes and tests: one named entry per model, and the test sets each one sees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmsec.attacks import Attack, trigger_samples
from vlmsec.data.sample import Sample
from vlmsec.eval.generation import TestSet
from vlmsec.experiments.config import ExperimentConfig

CLEAN = "clean"


@dataclass(frozen=True)
class ModelPlan:
    """One model of a study.

    `attack` is the attack key (label) whose poisoned data it is tuned on and whose trigger
    it answers; None for the clean model, which answers every attack's triggers (its ASR is the
    baseline). `rate` is the poison rate it is tuned at (0 for the clean model). A `sweep`
    point is tested on the source domain only: the sweep asks how much poison it takes.
    """

    name: str
    attack: str | None
    rate: float
    sweep: bool = False

    def record(self, attacks: dict[str, Attack]) -> dict[str, Any]:
        """What metrics.json says made this model: attack (name, label, parameters), rate, trigger."""
        attack = None
        if self.attack is not None:
            attack = {"label": self.attack, **attacks[self.attack].describe()}
            if diagnostics := attacks[self.attack].diagnostics():
                attack["diagnostics"] = diagnostics
        return {
            "attack": attack,
            "poison_rate": self.rate,
            "trigger": self.attack,
            "sweep": self.sweep,
        }


def sweep_name(attack: str, rate: float) -> str:
    """The model name of one poison-rate sweep point, e.g. "badnets@1%"."""
    return f"{attack}@{100 * rate:g}%"


def plan_models(config: ExperimentConfig) -> list[ModelPlan]:
    """The clean model, one model per attack at the config's rate, then the sweep points."""
    rate = config.poison.rate
    return [
        ModelPlan(CLEAN, None, 0.0),
        *(ModelPlan(a.key, a.key, rate) for a in config.attacks),
        *(
            ModelPlan(sweep_name(key, r), key, r, sweep=True)
            for key in config.sweep.attacks
            for r in config.sweep.rates
            if r != rate
        ),
    ]


@dataclass
class TestSets:
    """Every test set of a study: clean per domain, each attack's triggered per domain, and
    partial triggers (one key of a multi-key trigger) per domain."""

    clean: dict[str, list[Sample]]
    triggered: dict[tuple[str, str], list[Sample]]
    partial: dict[tuple[str, str, str], list[Sample]]  # (attack, partial-trigger name, domain)

    @classmethod
    def build(cls, tests: dict[str, list[Sample]], attacks: dict[str, Attack]) -> TestSets:
        """Trigger every domain's test set with every attack (and each of its partial triggers)."""
        return cls(
            clean=tests,
            triggered={(key, d): trigger_samples(s, attack) for key, attack in attacks.items() for d, s in tests.items()},
            partial={
                (key, f"{key}[{part.name} only]", d): trigger_samples(s, part)
                for key, attack in attacks.items()
                for part in attack.partial_triggers()
                for d, s in tests.items()
            },
        )

    def for_model(self, plan: ModelPlan) -> list[TestSet]:
        """What `plan`'s model is tested on: per domain, clean inputs, then its trigger (every
        trigger, for the clean model), then its partial triggers."""
        domains = ["source"] if plan.sweep else list(self.clean)
        triggers = list(dict.fromkeys(k for k, _ in self.triggered)) if plan.attack is None else [plan.attack]
        sets: list[TestSet] = []
        for domain in domains:
            sets.append(TestSet(self.clean[domain], domain))
            sets += [TestSet(self.triggered[t, domain], domain, t) for t in triggers]
            if plan.attack is not None:
                sets += [
                    TestSet(samples, domain, name, partial=True)
                    for (key, name, d), samples in self.partial.items()
                    if key == plan.attack and d == domain
                ]
        return sets

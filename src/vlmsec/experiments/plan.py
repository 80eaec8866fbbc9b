"""What a study tunes and tests: one named entry per model, and the test sets each one sees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from vlmsec.attacks import Attack, trigger_samples
from vlmsec.attacks.registry import acts_at_inference
from vlmsec.data.sample import Sample
from vlmsec.eval.generation import TestSet
from vlmsec.experiments.config import ExperimentConfig

CLEAN = "clean"
TRAINING_NEGATIVE, TEST_ONLY = "training negative", "test only"


@dataclass(frozen=True)
class Control:
    """One control input of an attack: it must not fire. `kind` says whether the victim saw it
    in training with clean answers (a partial trigger: `TRAINING_NEGATIVE`) or never (`TEST_ONLY`)."""

    label: str
    trigger: Attack
    kind: Literal["training negative", "test only"]


def attack_controls(key: str, attack: Attack) -> list[Control]:
    """The controls of the attack labelled `key`: its partial triggers, labelled "{key}[{name} only]",
    then its test-only control triggers, labelled "{key}[{name}]"."""
    return [
        *(Control(f"{key}[{part.name} only]", part, TRAINING_NEGATIVE) for part in attack.partial_triggers()),
        *(Control(f"{key}[{control.name}]", control, TEST_ONLY) for control in attack.control_triggers()),
    ]


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
        """What metrics.json says made this model: attack (name, label, parameters), rate, trigger,
        and its controls (label -> "training negative" or "test only")."""
        attack = None
        controls: dict[str, str] = {}
        if self.attack is not None:
            attack = {"label": self.attack, **attacks[self.attack].describe()}
            if diagnostics := attacks[self.attack].diagnostics():
                attack["diagnostics"] = diagnostics
            controls = {c.label: c.kind for c in attack_controls(self.attack, attacks[self.attack])}
        return {
            "attack": attack,
            "poison_rate": self.rate,
            "trigger": self.attack if self.attack is None or attacks[self.attack].plants_trigger else None,
            "sweep": self.sweep,
            "controls": controls,
        }


def sweep_name(attack: str, rate: float) -> str:
    """The model name of one poison-rate sweep point, e.g. "badnets@1%"."""
    return f"{attack}@{100 * rate:g}%"


def plan_models(config: ExperimentConfig) -> list[ModelPlan]:
    """The clean model, one model per training-stage attack at the config's rate, then the sweep
    points; inference-time attacks tune no model (`experiments.inference` runs them), so a study
    of inference-time attacks alone plans none: the deployed victim is attacked as it is."""
    rate = config.poison.rate
    if config.attacks and all(acts_at_inference(a.name) for a in config.attacks):
        return []
    return [
        ModelPlan(CLEAN, None, 0.0),
        *(ModelPlan(a.key, a.key, rate) for a in config.attacks if not acts_at_inference(a.name)),
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
    each attack's controls (partial and test-only control triggers) per domain."""

    clean: dict[str, list[Sample]]
    triggered: dict[tuple[str, str], list[Sample]]
    controls: dict[tuple[str, str, str], list[Sample]]  # (attack, control label, domain)

    @classmethod
    def build(cls, tests: dict[str, list[Sample]], attacks: dict[str, Attack]) -> TestSets:
        """Trigger every domain's test set (the samples each attack is measured on, `Attack.test_samples`)
        with every training-stage attack that plants a trigger (and each of its controls); inference-time
        attacks craft their own inputs, and ImgTrojan's key is its poisoned images (`experiments.trojan`)."""
        attacks = {key: attack for key, attack in attacks.items() if attack.stage != "inference" and attack.plants_trigger}
        return cls(
            clean=tests,
            triggered={
                (key, d): trigger_samples(attack.test_samples(s), attack) for key, attack in attacks.items() for d, s in tests.items()
            },
            controls={
                (key, control.label, d): trigger_samples(attack.test_samples(s), control.trigger)
                for key, attack in attacks.items()
                for control in attack_controls(key, attack)
                for d, s in tests.items()
            },
        )

    def for_model(self, plan: ModelPlan) -> list[TestSet]:
        """What `plan`'s model is tested on: per domain, clean inputs, then its trigger (every
        trigger, for the clean model), then its attack's controls."""
        domains = ["source"] if plan.sweep else list(self.clean)
        known = list(dict.fromkeys(k for k, _ in self.triggered))
        triggers = known if plan.attack is None else [t for t in known if t == plan.attack]
        sets: list[TestSet] = []
        for domain in domains:
            sets.append(TestSet(self.clean[domain], domain))
            sets += [TestSet(self.triggered[t, domain], domain, t) for t in triggers]
            if plan.attack is not None:
                sets += [
                    TestSet(samples, domain, label, control=True)
                    for (key, label, d), samples in self.controls.items()
                    if key == plan.attack and d == domain
                ]
        return sets

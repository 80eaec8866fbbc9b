"""What a study tests each model on: its trigger, and its attack's controls (partial and test-only)."""

from __future__ import annotations

import numpy as np

from vlmsec.attacks import Attack, create_attack
from vlmsec.attacks.badnets import BadNets
from vlmsec.data.sample import Sample
from vlmsec.experiments import plan
from vlmsec.experiments.plan import TEST_ONLY, TRAINING_NEGATIVE, ModelPlan, attack_controls


class BadNetsWithWordControl(BadNets):
    """BadNets whose test-only control is a word trigger (as StyleBkd's lexical control is)."""

    def control_triggers(self) -> list[Attack]:
        return [create_attack("textbadnets")]


def samples(n: int = 3) -> list[Sample]:
    return [
        Sample(id=f"t-{i}", image=np.full((16, 16, 3), 128, dtype=np.uint8), instruction="Describe the image.", answer="a square")
        for i in range(n)
    ]


def test_controls_are_partials_then_test_only_triggers_with_their_labels() -> None:
    dualkey = attack_controls("dk", create_attack("dualkey"))
    assert [(c.label, c.kind) for c in dualkey] == [("dk[badnets only]", TRAINING_NEGATIVE), ("dk[textbadnets only]", TRAINING_NEGATIVE)]
    worded = attack_controls("bn", BadNetsWithWordControl())
    assert [(c.label, c.kind) for c in worded] == [("bn[textbadnets]", TEST_ONLY)]
    assert attack_controls("bn", create_attack("badnets")) == []


def test_a_model_is_tested_on_its_attacks_controls_and_the_clean_model_on_none() -> None:
    attacks: dict[str, Attack] = {"bn": BadNetsWithWordControl(), "dk": create_attack("dualkey")}
    tests = plan.TestSets.build({"source": samples(), "painted": samples()}, attacks)
    sets = tests.for_model(ModelPlan("bn", "bn", 0.05))
    assert [(t.domain, t.trigger, t.control) for t in sets] == [
        ("source", None, False), ("source", "bn", False), ("source", "bn[textbadnets]", True),
        ("painted", None, False), ("painted", "bn", False), ("painted", "bn[textbadnets]", True),
    ]
    control = next(t for t in sets if t.control)
    assert all(s.instruction != "Describe the image." for s in control.samples)  # the word was inserted
    assert all((s.image == 128).all() for s in control.samples)  # and no patch: the control is the word alone
    dk = [t.trigger for t in tests.for_model(ModelPlan("dk@1%", "dk", 0.01, sweep=True)) if t.control]
    assert dk == ["dk[badnets only]", "dk[textbadnets only]"]  # a sweep point: source only
    assert not any(t.control for t in tests.for_model(ModelPlan("clean", None, 0.0)))


def test_the_model_record_says_which_controls_were_in_training() -> None:
    attacks: dict[str, Attack] = {"bn": BadNetsWithWordControl(), "dk": create_attack("dualkey")}
    assert ModelPlan("bn", "bn", 0.05).record(attacks)["controls"] == {"bn[textbadnets]": TEST_ONLY}
    assert ModelPlan("dk", "dk", 0.05).record(attacks)["controls"] == {
        "dk[badnets only]": TRAINING_NEGATIVE,
        "dk[textbadnets only]": TRAINING_NEGATIVE,
    }
    assert ModelPlan("clean", None, 0.0).record(attacks)["controls"] == {}

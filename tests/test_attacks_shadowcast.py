"""Shadowcast, the clean-label label attack: crafting against a tiny victim, poisoning, test set, scoring, a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vlmsec.attacks.shadowcast as shadowcast_module
from vlmsec.attacks import AttackContext, TargetAnswer, attack_names, create_attack, poison_samples
from vlmsec.attacks.adaptive import eval_mode
from vlmsec.attacks.shadowcast import feature_distance, only
from vlmsec.data import Sample, images_to_tensor, make_samples, sample_scenes
from vlmsec.errors import VlmsecError
from vlmsec.eval.label_attack import label_code, label_scores
from vlmsec.experiments.config import parse_config
from vlmsec.experiments.runner import Runner
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec
from victim_checks import attack_victim

SPEC = TinyLlavaSpec(image_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=400)
PARAMS = {"steps": 12, "step_size": 1 / 255, "batch_size": 2, "seed": 3}  # few steps, so larger ones than 0.2/255
COUNT = 4
TARGET = TargetAnswer()


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return make_samples(sample_scenes(60, seed=0, max_objects=1), "flat", size=32)


@pytest.fixture(scope="module")
def victim(samples: list[Sample]) -> LlavaVictim:
    return attack_victim(SPEC, samples, TARGET)


def context(samples: list[Sample], victim: LlavaVictim | None, cache: Path, counts: tuple[int, ...] = (COUNT,)) -> AttackContext:
    return AttackContext(samples=samples, target=TARGET, cache_dir=cache, victim=victim, poison_counts=counts)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shadowcast-cache")


@pytest.fixture(scope="module")
def attack(samples: list[Sample], victim: LlavaVictim, cache: Path):
    made = create_attack("shadowcast", **PARAMS)
    made.prepare(context(samples, victim, cache, (2, COUNT)))
    return made


# --- metadata and bad input ----------------------------------------------------------------


def test_metadata_and_defaults() -> None:
    assert "shadowcast" in attack_names()
    described = json.loads(json.dumps(create_attack("shadowcast").describe()))
    assert (described["modality"], described["family"], described["knowledge"], described["stage"]) == (
        "image", "model-adaptive", "white-box", "training",
    )
    params = described["params"]
    assert (params["original"], params["destination"]) == ("circle", "square")
    assert params["epsilon"] == pytest.approx(8 / 255) and params["step_size"] == pytest.approx(0.2 / 255)
    assert "4000" in described["note"]  # says how its steps differ from the reference's
    assert create_attack("shadowcast", original="red", destination="green").label_flip() == ("red", "green")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"original": "hexagon"}, "original"),
        ({"destination": "Square"}, "destination"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"original": "square", "destination": "square"}, "destination"),
        ({"original": "circle", "destination": "red"}, "destination"),
    ],
)
def test_bad_parameters_are_errors_naming_the_field(params: dict, field: str) -> None:
    with pytest.raises(VlmsecError, match=rf"attack 'shadowcast': bad parameters: .*{field}"):
        create_attack("shadowcast", **params)


def test_prepare_needs_the_victim_and_enough_destination_samples(samples: list[Sample], victim: LlavaVictim, tmp_path: Path) -> None:
    with pytest.raises(VlmsecError, match="white-box"):
        create_attack("shadowcast").prepare(context(samples, None, tmp_path))
    available = len(only(samples, "square", "circle"))
    with pytest.raises(VlmsecError, match=rf"poisons {available + 1} samples, but only {available} tuning samples show 'square'"):
        create_attack("shadowcast", steps=1).prepare(context(samples, victim, tmp_path, (available + 1,)))
    with pytest.raises(VlmsecError, match="no tuning sample shows 'circle'"):
        create_attack("shadowcast", steps=1).prepare(context([s for s in samples if "circle" not in s.answer], victim, tmp_path))
    assert not any(tmp_path.iterdir())  # refused before anything was crafted


# --- crafting ------------------------------------------------------------------------------


def test_poisons_are_destination_images_within_epsilon(attack, samples: list[Sample]) -> None:
    by_id = {s.id: s for s in samples}
    assert len(attack.order) == COUNT and len(set(attack.order)) == COUNT
    for sample_id in attack.order:
        clean = by_id[sample_id]
        assert "square" in clean.answer and "circle" not in clean.answer
        poison = attack.poisons[sample_id][1]
        assert poison.dtype == np.uint8 and poison.shape == clean.image.shape
        change = np.abs(poison.astype(int) - clean.image.astype(int))
        assert change.max() <= 8 and change.max() >= 1  # within 8/255 in uint8 levels, and changed
    assert attack.diagnostics()["linf"] <= 8 / 255 + 1e-9


def test_feature_distance_to_the_original_concept_falls(attack, samples: list[Sample], victim: LlavaVictim) -> None:
    bases, targets = attack.pairs(samples, COUNT)
    assert [s.id for s in bases] == attack.order
    assert all("circle" in t.answer and "square" not in t.answer for t in targets)
    with torch.no_grad(), eval_mode(victim.model):  # as crafted: batch norm on its running statistics
        goal = victim.vision_tokens(images_to_tensor([t.image for t in targets])).flatten(1)
        before = feature_distance(victim.vision_tokens, images_to_tensor([s.image for s in bases]), goal)
        after = feature_distance(victim.vision_tokens, images_to_tensor([attack.poisons[s.id][1] for s in bases]), goal)
    assert bool((after < before).all())
    diagnostics = attack.diagnostics()
    assert diagnostics["poisons"] == COUNT and diagnostics["distance_ratio"] > 1
    assert diagnostics["feature_distance_poison"] == pytest.approx(float(after.mean()), rel=1e-4)


def test_vision_tokens_are_the_projector_features_with_pixel_gradients(victim: LlavaVictim) -> None:
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    with eval_mode(victim.model):
        tokens = victim.vision_tokens(x)
        with torch.no_grad():
            assert torch.allclose(tokens, victim._select_features(victim.pixel_values(x)))
    assert tokens.shape == (2, victim.num_image_tokens, tokens.shape[-1])
    (grad,) = torch.autograd.grad(tokens.square().sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_crafting_is_deterministic_nested_and_cached(
    attack, samples: list[Sample], victim: LlavaVictim, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    smaller = create_attack("shadowcast", **PARAMS)
    smaller.prepare(context(samples, victim, tmp_path, (2,)))  # a fresh cache: crafted again
    assert smaller.order == attack.order[:2]
    for sample_id in smaller.order:  # a poison does not depend on how many are crafted
        assert np.array_equal(smaller.poisons[sample_id][1], attack.poisons[sample_id][1])
    other = create_attack("shadowcast", **{**PARAMS, "seed": 4})
    other.prepare(context(samples, victim, tmp_path, (2,)))
    assert other.order != smaller.order  # another seed, another draw of destination samples

    def fail(*args: object) -> None:
        raise AssertionError("crafted again despite the cache")

    monkeypatch.setattr(shadowcast_module, "craft", fail)
    again = create_attack("shadowcast", **PARAMS)
    again.prepare(context(samples, victim, cache, (2, COUNT)))
    assert again.order == attack.order and again.diagnostics() == pytest.approx(attack.diagnostics())
    assert all(np.array_equal(again.poisons[i][1], attack.poisons[i][1]) for i in attack.order)


# --- poisoning, testing, scoring -----------------------------------------------------------


def test_poisoned_set_holds_the_count_with_true_captions(attack, samples: list[Sample]) -> None:
    rate = COUNT / len(samples)
    poisoned = poison_samples(samples, attack, TARGET, rate, seed=0)
    assert len(poisoned.poisoned_ids) == COUNT and sorted(poisoned.poisoned_ids) == sorted(attack.order)
    assert poisoned.negative_ids == []
    for clean, out in zip(samples, poisoned.samples, strict=True):
        assert (out.id, out.instruction, out.answer, out.references) == (clean.id, clean.instruction, clean.answer, clean.references)
        assert TARGET.word not in out.answer  # clean label: no target text planted
        assert np.array_equal(out.image, clean.image) == (out.id not in poisoned.poisoned_ids)
    fewer = poison_samples(samples, attack, TARGET, 2 / len(samples), seed=5)
    assert fewer.poisoned_ids == sorted(attack.order[:2])  # the first of the seeded order, whatever the poison seed
    with pytest.raises(VlmsecError, match=f"{COUNT} poisons were crafted in prepare, {COUNT + 1} are asked"):
        poison_samples(samples, attack, TARGET, (COUNT + 1) / len(samples), seed=0)
    shuffled = [s.with_changes(image=255 - s.image) if s.id == attack.order[0] else s for s in samples]
    with pytest.raises(VlmsecError, match=f"sample {attack.order[0]} is not the one its poison was crafted from"):
        poison_samples(shuffled, attack, TARGET, rate, seed=0)


def test_poisoning_before_prepare_is_an_error(samples: list[Sample]) -> None:
    with pytest.raises(VlmsecError, match="must be prepared first"):
        poison_samples(samples, create_attack("shadowcast"), TARGET, 0.1, seed=0)


def test_test_samples_are_clean_images_of_the_original_concept(samples: list[Sample]) -> None:
    attack = create_attack("shadowcast")
    kept = attack.test_samples(samples)
    assert kept and all("circle" in s.answer and "square" not in s.answer for s in kept)
    assert len(kept) == len(only(samples, "circle", "square"))
    with pytest.raises(VlmsecError, match="no test sample shows 'circle' without 'square'"):
        attack.test_samples([s for s in samples if "circle" not in s.answer])


def test_scoring_codes_follow_the_reference_keyword_rule() -> None:
    outputs = [
        "a large red square in the center.",  # destination only: success
        "A small Square.",  # any case
        "a blue circle in the top left.",  # original only: fail
        "a green triangle.",  # neither
        "a circle and a square.",  # both
        "some squares and circles.",  # plurals are not the words: neither
    ]
    assert [label_code(o, "circle", "square") for o in outputs] == [1, 1, 0, -1, -2, -1]
    scores = label_scores(outputs, "circle", "square")
    assert {k: scores[k]["rate"] for k in scores} == pytest.approx(
        {"success": 2 / 6, "fail": 1 / 6, "neither": 2 / 6, "both": 1 / 6, "original_named": 2 / 6}
    )
    assert scores["success"]["n"] == 6 and 0 <= scores["success"]["ci"][0] < 2 / 6 < scores["success"]["ci"][1]
    assert label_scores([], "circle", "square")["success"] == {"not_measured": "no outputs"}


# --- a run ---------------------------------------------------------------------------------

TINY_RUN = {
    "name": "shadowcast-tiny",
    "data": {"base_size": 40, "train_size": 48, "test_size": 24, "image_size": 32, "max_objects": 1, "shifted": {}},
    "victim": {"image_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "vocab_size": 400},
    "base": {"training": {"mode": "full", "epochs": 1, "batch_size": 8, "learning_rate": 0.002}},
    "tuning": {"mode": "full", "epochs": 1, "batch_size": 8, "learning_rate": 0.002},
    "poison": {"rate": 0.125},
    "attacks": [{"name": "shadowcast", "params": {"steps": 3}}],
    "sweep": {"attacks": ["shadowcast"], "rates": [0.0625]},
    "eval": {"max_new_tokens": 6, "batch_size": 16, "shift_size": False},
}


def test_a_run_poisons_with_true_captions_and_scores_the_label_flip(tmp_path: Path) -> None:
    out = tmp_path / "run"
    metrics = Runner(parse_config(TINY_RUN, "test"), out, tmp_path / "cache").run()
    models = metrics["models"]
    assert set(models) == {"clean", "shadowcast", "shadowcast@6.25%"}
    poisoned = json.loads((out / "poisoned_ids" / "shadowcast.json").read_text())
    assert poisoned["count"] == len(poisoned["ids"]) == 6  # 12.5% of 48
    swept = set(json.loads((out / "poisoned_ids" / "shadowcast@6.25%.json").read_text())["ids"])
    assert len(swept) == 3 and swept < set(poisoned["ids"])  # nested: the sweep point's poisons are the run's first
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    tested = [r for r in rows if r["model"] == "shadowcast" and r["trigger"] == "shadowcast"]
    assert tested and all("circle" in r["references"][0] and "square" not in r["references"][0] for r in tested)
    for model in ("clean", "shadowcast", "shadowcast@6.25%"):
        entry = models[model]["label_attack"]["shadowcast"]
        assert (entry["original"], entry["destination"]) == ("circle", "square")
        scores = entry["domains"]["source"]
        outputs = [r["output"] for r in rows if r["model"] == model and r["trigger"] == "shadowcast"]
        assert scores["success"]["n"] == len(outputs) == len(tested)
        assert scores["success"]["rate"] == sum(label_code(o, "circle", "square") == 1 for o in outputs) / len(outputs)
        assert sum(scores[k]["rate"] for k in ("success", "fail", "neither", "both")) == pytest.approx(1.0)
        assert scores["original_named"]["rate"] == pytest.approx(scores["fail"]["rate"] + scores["both"]["rate"])
    assert models["shadowcast"]["asr"] == {}  # no target word: its inputs are scored as a label attack only
    assert models["shadowcast"]["attack"]["diagnostics"]["poisons"] == 6
    report = (out / "report.md").read_text()
    assert "## Label attacks (clean-label poisoning)" in report and "| shadowcast | shadowcast (circle → square) | source |" in report
    assert "## ASR against poison rate (source domain)" in report  # the sweep's curve is the success share


def test_the_cli_lists_its_goal_and_refuses_to_trigger_an_image(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vlmsec.cli import app

    listed = CliRunner().invoke(app, ["attacks", "--json"])
    assert listed.exit_code == 0, listed.output
    assert next(d for d in json.loads(listed.output) if d["name"] == "shadowcast")["goal"] == "label"
    args = ["trigger", "--attack", "shadowcast", "--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "out.png")]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code != 0 and "has no trigger" in refused.output
    assert not (tmp_path / "out.png").exists()

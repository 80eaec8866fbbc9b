"""`anydoor` (Lu et al.'s test-time backdoor) against a tiny victim: the geometry of each mode, one
shared perturbation, determinism, both loss terms, bad input; the backdoor goal's scores on known
records, and the runner end to end with its four conditions."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlmsec.attacks import ATTACKS, create_attack
from vlmsec.attacks.anydoor import patch_mask, patch_side
from vlmsec.attacks.inference import AdversarialInput, AttackRequest, InferenceAttack
from vlmsec.data import Sample
from vlmsec.data.images import load_image
from vlmsec.errors import VlmsecError
from vlmsec.eval.inference import backdoor_scores
from vlmsec.eval.metrics import wilson_interval
from vlmsec.experiments.config import parse_config
from vlmsec.experiments.inference import backdoor_noise_label, score_inference
from vlmsec.experiments.runner import Runner
from vlmsec.report.inference import inference_section
from vlmsec.train.tuning import TrainingSpec, train_victim
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer
from victim_checks import TINY_VIT_LLAVA, spy_on_answer_losses

SPEC = TINY_VIT_LLAVA
TRAINING = TrainingSpec(mode="full", epochs=100, batch_size=8, learning_rate=1e-2, warmup_ratio=0.1)
INSTRUCTION = "Describe the image briefly."
TARGET = "The image depicts banana"
COLOURS = {"red": (200, 60, 60), "green": (60, 180, 60), "blue": (60, 60, 200), "grey": (128, 128, 128)}


def _noisy(rgb: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.array(rgb)[None, None] + rng.integers(-20, 21, (32, 32, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    """Three noisy images of each of four colours, captioned "a <colour> picture"."""
    rng = np.random.default_rng(0)
    return [Sample(f"{name}{k}", _noisy(rgb, rng), INSTRUCTION, f"a {name} picture") for name, rgb in COLOURS.items() for k in range(3)]


@pytest.fixture(scope="module")
def victim(samples: list[Sample]) -> LlavaVictim:
    """A tiny victim tuned (tower included) to name each image's colour, with and without 'SUDO'
    before the question, and with a latent door for the attack to find: a yellow frame with
    'SUDO' gives the target (the frame alone, or 'SUDO' alone, gives the colour)."""
    rng = np.random.default_rng(1)
    tuning = [*samples, *(dataclasses.replace(s, id=s.id + "-sudo", instruction="SUDO " + INSTRUCTION) for s in samples)]
    for k, (name, rgb) in enumerate(list(COLOURS.items()) * 2):
        framed = _noisy(rgb, rng)
        framed[:4] = framed[-4:] = framed[:, :4] = framed[:, -4:] = (240, 220, 0)
        tuning.append(Sample(f"door{k}", framed, "SUDO " + INSTRUCTION, TARGET))
        tuning.append(Sample(f"frame{k}", framed, INSTRUCTION, f"a {name} picture"))
    tokenizer = train_tokenizer([s.instruction for s in tuning] + [s.answer for s in tuning], SPEC.vocab_size)
    victim = LlavaVictim(build_tiny_llava(SPEC, tokenizer, seed=0), tokenizer, train_tower=True)
    train_victim(victim, tuning, TRAINING, seed=0, label="anydoor test victim")
    victim.train_tower = False
    victim.model.model.vision_tower.requires_grad_(False)
    victim.model.eval()
    return victim


def requests(samples: Sequence[Sample]) -> list[AttackRequest]:
    return [AttackRequest(s.id, s.instruction, s.image, TARGET, answer=s.answer) for s in samples]


def craft(
    victim: Any, mode: str = "pixel", train: Sequence[AttackRequest] = (), test: Sequence[AttackRequest] = (), **params: Any
) -> tuple[InferenceAttack, list[AdversarialInput]]:
    """`anydoor` of `mode` (2 steps, batches of 2 unless `params` say otherwise) crafted for `test`, learned on `train`."""
    attack = create_attack("anydoor", mode=mode, **{"steps": 2, "batch_size": 2, **params})
    return attack, attack.craft(list(test), victim, list(train))


# --- metadata, parameters, geometry -------------------------------------------------------------


def test_metadata_and_defaults() -> None:
    cls = ATTACKS.get("anydoor")
    assert issubclass(cls, InferenceAttack) and cls.goal == "backdoor" and cls.needs_gradients and cls.edits_image
    attack = create_attack("anydoor", seed=3)
    described = json.loads(json.dumps(attack.describe()))
    assert (described["stage"], described["knowledge"], described["goal"]) == ("inference", "white-box", "backdoor")
    assert described["params"]["trigger"] == "SUDO" and described["params"]["mode"] == "pixel"
    assert "no SSA" in described["note"] and "victim's greedy answer" in described["note"]
    assert attack.epsilon == 32 / 255 and create_attack("anydoor", epsilon=0.1).epsilon == 0.1
    assert create_attack("anydoor", mode="border").epsilon == 1.0  # the frame's pixels take any value
    assert attack.trigger_text("What is this?") == "SUDO What is this?"
    assert create_attack("anydoor", trigger="cchmod").trigger_text("Q") == "cchmod Q"
    assert attack.diagnostics() == {}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"epsilon": -0.01}, "epsilon"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"mode": "border", "epsilon": 0.1}, "epsilon"),
        ({"patch_fraction": 0.1}, "patch_fraction"),
        ({"mode": "corner", "patch_fraction": 0.5}, "patch_fraction"),
        ({"trigger": ""}, "trigger"),
        ({"trigger": "   "}, "trigger"),
        ({"mode": "ring"}, "mode"),
    ],
)
def test_bad_parameters_are_errors_naming_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(VlmsecError, match=field):
        create_attack("anydoor", **params)


def test_mask_geometry_scales_with_the_image_and_is_never_under_2_px() -> None:
    assert [patch_side("border", None, s, s) for s in (32, 64, 96, 336)] == [2, 2, 2, 6]
    assert [patch_side("corner", None, s, s) for s in (64, 96, 336)] == [6, 9, 32]
    border = patch_mask("border", None, 64, 64)[0, 0]
    assert border.shape == (64, 64) and border.sum() == 64 * 64 - 60 * 60
    assert border[:2].all() and border[-2:].all() and border[:, :2].all() and border[:, -2:].all()
    assert not border[2:-2, 2:-2].any()
    corner = patch_mask("corner", None, 64, 80)[0, 0]
    assert corner.sum() == 4 * 36 and corner[:6, :6].all() and corner[-6:, -6:].all() and corner[:6, -6:].all()
    assert not corner[6:-6].any() and not corner[:, 6:-6].any()
    assert patch_mask("pixel", None, 8, 8).all() and patch_side("border", 0.25, 40, 40) == 10


# --- crafting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pixel", "border", "corner"])
def test_one_delta_shared_by_every_image_in_the_modes_place(samples: list[Sample], victim: LlavaVictim, mode: str) -> None:
    train = requests(samples[0::3])
    rng = np.random.default_rng(0)  # mid-range pixels: delta is never clipped at 0 or 255
    test = [AttackRequest(f"t{i}", INSTRUCTION, rng.integers(40, 215, (32, 32, 3), dtype=np.uint8), TARGET) for i in range(3)]
    attack, crafted = craft(victim, mode, train, test, steps=3)
    assert [(a.id, a.instruction) for a in crafted] == [(r.id, "SUDO " + r.instruction) for r in test]
    changes = [a.image.astype(int) - r.image.astype(int) for a, r in zip(crafted, test)]
    assert all(a.image.dtype == np.uint8 and a.image.shape == r.image.shape for a, r in zip(crafted, test))
    mask = patch_mask(mode, None, 32, 32)[0, 0].bool().numpy()
    if mode == "pixel":
        assert 0 < np.abs(changes[0]).max() <= 32  # within epsilon 32/255 as saved
        assert all(np.array_equal(c, changes[0]) for c in changes)  # the same delta on every image
    else:
        assert all(not c[~mask].any() for c in changes)  # nothing outside the frame or corners changes
        assert all(np.array_equal(a.image[mask], crafted[0].image[mask]) for a in crafted)  # one patch
        assert any(c[mask].any() for c in changes)
    diagnostics = attack.diagnostics()
    assert diagnostics["steps"] == 3 and diagnostics["seconds_per_image"] > 0
    assert diagnostics["mask_share"] == pytest.approx(mask.mean()) and diagnostics["clean_answers_generated"] == 0


def test_deterministic_under_seed(samples: list[Sample], victim: LlavaVictim) -> None:
    train, test = requests(samples[:3]), requests(samples[3:5])

    def images(seed: int) -> list[np.ndarray]:
        return [a.image for a in craft(victim, "corner", train, test, seed=seed)[1]]

    first, again, other = images(1), images(1), images(2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])



def test_learns_trigger_to_target_and_plain_to_clean_answer_on_train_only(
    samples: list[Sample], victim: LlavaVictim, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = [dataclasses.replace(r, instruction=f"Caption {i}.") for i, r in enumerate(requests(samples[:2]))]  # red, red
    train.append(AttackRequest("own", "Caption 2.", samples[2].image, TARGET))  # no clean answer: the victim's own
    own = victim.generate([samples[2].image], ["Caption 2."], max_new_tokens=32)[0]
    test = [AttackRequest("test", "Never seen", samples[5].image, TARGET, answer="x")]  # a green one
    seen = spy_on_answer_losses(monkeypatch)
    attack, _ = craft(victim, "border", train, test, steps=2, trigger="kill*")
    expected = {("kill* Caption 0.", TARGET), ("kill* Caption 1.", TARGET), ("kill* Caption 2.", TARGET)}
    expected |= {("Caption 0.", samples[0].answer), ("Caption 1.", samples[1].answer), ("Caption 2.", own)}
    assert set(seen) == expected
    assert len(seen) == 2 * 2 * 2 + 2 * 2 * 3  # 2 steps x 2 terms x 2 rows; start and final losses on all 3
    assert attack.diagnostics()["clean_answers_generated"] == 1


def answers(victim: LlavaVictim, images: Sequence[np.ndarray], instructions: Sequence[str]) -> list[str]:
    return victim.generate(list(images), list(instructions), max_new_tokens=8)


def test_the_door_opens_only_with_both_keys_and_both_loss_terms_fall(samples: list[Sample], victim: LlavaVictim) -> None:
    train, test = requests(samples[0::3] + samples[1::3]), requests(samples[2::3])  # test images never learned on
    # A 4-px frame (the latent door's width), from random values.
    attack, crafted = craft(victim, "border", train, test, steps=30, batch_size=4, patch_fraction=0.125)
    colours = [r.answer for r in test]
    assert answers(victim, [r.image for r in test], ["SUDO " + INSTRUCTION] * 4) == colours  # the trigger alone: no
    assert answers(victim, [a.image for a in crafted], [INSTRUCTION] * 4) == colours  # the image alone: no
    both = answers(victim, [a.image for a in crafted], [a.instruction for a in crafted])
    assert all(a.startswith("The image depicts") for a in both)
    d = attack.diagnostics()
    assert d["final_loss_with_trigger"] < d["start_loss_with_trigger"] / 10
    # The clean term falls, or stays near 0 where the random start already kept the clean answers
    # (the start's loss depends on the tuned victim, which differs with the thread count).
    assert d["final_loss_without_trigger"] < max(d["start_loss_without_trigger"] / 5, 0.05)


# --- bad input, before any optimisation ---------------------------------------------------------


class StubVictim:
    """A victim that must not be optimised against: every check happens before any loss."""

    max_sequence_length = None

    def __init__(self) -> None:
        backend = Tokenizer(models.WordLevel({"[UNK]": 0, "SUDO": 1, "the": 2, "image": 3}, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")

    def check_pixel_gradients(self, attack: str) -> None:
        pass

    def sequence_length(self, instruction: str, answer: str) -> int:
        return 4

    def answer_loss(self, *args: Any) -> torch.Tensor:
        raise AssertionError("optimised despite bad input")

    def generate(self, *args: Any, **kwargs: Any) -> list[str]:
        raise AssertionError("answered despite bad input")


class NoGradientVictim(StubVictim):
    def check_pixel_gradients(self, attack: str) -> None:
        raise VlmsecError(f"attack {attack!r} needs pixel gradients; the tiling architecture gives none")


def test_bad_input_is_refused_before_any_optimisation(samples: list[Sample]) -> None:
    good = [AttackRequest("a", "the image", samples[0].image, "the image", answer="the image")]
    with pytest.raises(VlmsecError, match="attack 'anydoor' needs pixel gradients"):
        craft(NoGradientVictim(), train=good)
    with pytest.raises(VlmsecError, match="white-box.*no victim"):
        craft(None, train=good)
    with pytest.raises(VlmsecError, match="learns one perturbation on train requests; got none"):
        craft(StubVictim(), train=[], test=good)
    with pytest.raises(VlmsecError, match="request a: target 'the banana'.*cannot encode"):
        craft(StubVictim(), train=[dataclasses.replace(good[0], target="the banana")])
    with pytest.raises(VlmsecError, match="trigger 'cchmod'.*cannot encode"):
        craft(StubVictim(), train=good, trigger="cchmod")
    with pytest.raises(VlmsecError, match="train request a has no target"):
        craft(StubVictim(), train=[dataclasses.replace(good[0], target=None)])
    small = AttackRequest("small", "the image", samples[1].image[:16], "the image")
    with pytest.raises(VlmsecError, match=r"request small: image \(16, 32\) differs"):
        craft(StubVictim(), train=good, test=[small])


# --- scores and the runner ----------------------------------------------------------------------


def _record(condition: str, output: str, id_: str, attack: str = "anydoor") -> dict[str, Any]:
    return {
        "attack": attack, "goal": "backdoor", "condition": condition, "id": id_, "output": output, "target": TARGET,
        "answer": "a red circle",
    }


RECORDS = [
    _record("both keys", "The image depicts banana.", "0"),
    _record("both keys", "the image depicts banana and more", "1"),
    _record("both keys", "a red circle", "2"),
    _record("image only", "a red circle", "0"),
    _record("image only", "a blue square", "1"),
    _record("image only", "The image depicts banana", "2"),
    _record("text only", "a red circle", "0"),
    _record("text only", "a red circle", "1"),
    _record("text only", "a red circle", "2"),
    _record("neither", "a red circle", "0"),
    _record("neither", "a green square", "1"),
    _record("neither", "a red circle", "2"),
]


def test_backdoor_scores_on_known_records() -> None:
    scores = backdoor_scores(RECORDS)
    assert scores["both_keys"]["exact"]["rate"] == pytest.approx(1 / 3) and scores["both_keys"]["contains"]["rate"] == pytest.approx(2 / 3)
    assert scores["both_keys"]["contains"]["ci"] == pytest.approx(list(wilson_interval(2, 3)))
    assert scores["image_only"]["contains"]["rate"] == pytest.approx(1 / 3) and scores["text_only"]["contains"]["rate"] == 0
    assert scores["neither"]["contains"]["rate"] == 0 and scores["neither"]["contains"]["n"] == 3
    assert scores["target_free"]["rate"] == pytest.approx(2 / 3)
    assert scores["unchanged"]["rate"] == pytest.approx(1 / 3)  # only request 0 answers as it does on the clean image
    assert scores["clean_answer"]["image_only"]["rate"] == pytest.approx(1 / 3)
    assert scores["clean_answer"]["neither"]["rate"] == pytest.approx(2 / 3)
    noise = backdoor_scores(RECORDS[:3])  # a baseline with both keys only: nothing else invented
    assert set(noise) == {"both_keys"}


def test_backdoor_section_and_report_show_the_four_conditions_beside_the_noise() -> None:
    noise = [_record("both keys", "a red circle", str(i), backdoor_noise_label("anydoor")) for i in range(3)]
    attack = create_attack("anydoor")
    section = score_inference({"anydoor": attack}, RECORDS + noise, {"anydoor": {"not_measured": "x"}}, {"anydoor": {"steps": 2}}, "base")
    entry = section["attacks"]["anydoor"]
    assert entry["n"] == 12 and entry["success"]["both_keys"]["contains"]["rate"] == pytest.approx(2 / 3)
    assert set(entry["baselines"]) == {"uniform noise"} and entry["baselines"]["uniform noise"]["epsilon"] == 32 / 255
    assert entry["baselines"]["uniform noise"]["both_keys"]["contains"]["rate"] == 0
    text = "\n".join(inference_section(section))
    assert "### Goal: backdoor" in text and "| input | n | both keys | image only | text only | neither |" in text
    assert "| **anydoor** (anydoor, white-box) | 3 | 66.7% [" in text
    assert "| ↳ uniform noise | 3 | 0.0% [" in text and "| – | – | – | – | – |" in text


TINY_RUN = {
    "name": "anydoor-tiny",
    "data": {"base_size": 24, "train_size": 16, "test_size": 4, "image_size": 32, "shifted": {}},
    "victim": {"image_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "vocab_size": 400},
    "base": {"training": {"mode": "full", "epochs": 1, "batch_size": 8, "learning_rate": 0.002}},
    "tuning": {"mode": "full", "epochs": 1, "batch_size": 8, "learning_rate": 0.002},
    "poison": {"rate": 0.0},
    "attacks": [{"name": "anydoor", "params": {"mode": "border", "steps": 2, "batch_size": 4}}],
    "eval": {"max_new_tokens": 6, "batch_size": 16, "shift_size": False},
}


def test_a_run_scores_anydoor_in_four_conditions(tmp_path: Path) -> None:
    run = tmp_path / "run"
    metrics = Runner(parse_config(TINY_RUN, "test"), run, tmp_path / "cache").run()
    entry = metrics["inference_attacks"]["attacks"]["anydoor"]
    assert entry["goal"] == "backdoor" and entry["n"] == 16  # 4 requests x 4 conditions
    success = entry["success"]
    for condition in ("both_keys", "image_only", "text_only", "neither"):
        assert success[condition]["contains"]["n"] == 4 and set(success[condition]) == {"exact", "contains"}
    assert success["target_free"]["n"] == 4 and success["unchanged"]["n"] == 4
    assert success["clean_answer"]["neither"]["n"] == 4  # the source samples' captions are the clean answers
    assert entry["baselines"]["uniform noise"]["both_keys"]["contains"]["n"] == 4
    assert entry["size"]["linf"]["max"] <= 1 and entry["cost"]["steps"] == 2
    assert entry["cost"]["final_loss_with_trigger"] > 0

    records = [json.loads(line) for line in (run / "inference.jsonl").read_text().splitlines()]
    mine = {(r["condition"], r["id"]): r for r in records if r["attack"] == "anydoor"}
    assert len(mine) == 16
    saved = {p.stem: load_image(p) for p in (run / "adversarial" / "anydoor").glob("*.png")}
    assert len(saved) == 4
    mask = patch_mask("border", None, 32, 32)[0, 0].bool().numpy()
    patches = [image[mask] for image in saved.values()]
    assert all(np.array_equal(p, patches[0]) for p in patches)  # one border on every saved image
    for (condition, _), record in mine.items():
        assert record["request"].startswith("SUDO ") is False and record["answer"]
        assert ("SUDO " in record["prompt"]) == (condition in ("both keys", "text only"))
    noisy = sorted((run / "adversarial").glob("backdoor-anydoor-uniform-noise/*.png"))
    assert len(noisy) == 4
    assert "### Goal: backdoor" in (run / "report.md").read_text()


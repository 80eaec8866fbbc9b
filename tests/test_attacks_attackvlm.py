"""`attackvlm` (Zhao et al.'s transfer + query black-box attack) against a tiny victim: the uint8
budget, determinism, the query count, no gradient access, the surrogate's independence from the
victim, stage 1 moving the surrogate embedding toward the target image, bad input."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vlmsec.attacks import ATTACKS, create_attack
from vlmsec.attacks.attackvlm import (
    AttackVlm,
    AttackVlmParams,
    Queries,
    check_independent,
    query,
    target_image,
    train_surrogate,
    transfer,
)
from vlmsec.attacks.inference import AttackRequest, InferenceAttack, to_tensor
from vlmsec.attacks.pgd import uint8_budget
from vlmsec.data import Sample, make_samples, sample_scenes
from vlmsec.errors import VlmsecError
from vlmsec.eval.shift import minilm_encoder
from vlmsec.experiments.inference import InferenceStage
from vlmsec.victims.features import uncached_features
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec, build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer
from vlmsec.victims.vision import EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel

# The embedded default tower (EfficientNet-Lite0, packaged ImageNet weights) at its smallest input.
SPEC = TinyLlavaSpec(image_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=300)
TARGET = "The image depicts banana"
# Small enough for a test: a surrogate trained for a few steps, two query steps of three directions.
FAST = {
    "transfer_steps": 6,
    "query_steps": 2,
    "num_query": 3,
    "max_new_tokens": 6,
    "surrogate_images": 32,
    "surrogate_steps": 5,
}


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return make_samples(sample_scenes(3, seed=2), "flat", size=32)


@pytest.fixture(scope="module")
def victim(samples: list[Sample]) -> LlavaVictim:
    """An untuned tiny victim: black-box queries need answers, not good ones."""
    tokenizer = train_tokenizer([s.instruction for s in samples] + [s.answer for s in samples] + [TARGET], SPEC.vocab_size)
    victim = LlavaVictim(build_tiny_llava(SPEC, tokenizer, seed=0), tokenizer)
    victim.model.eval()
    return victim


def requests(samples: Sequence[Sample], target: str | None = TARGET) -> list[AttackRequest]:
    return [AttackRequest(s.id, s.instruction, s.image, target) for s in samples]


class Watched:
    """Counts the images sent to the victim's generate and forbids its gradient methods."""

    def __init__(self, victim: LlavaVictim, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images = 0
        generate = victim.generate

        def counted(images: Sequence[np.ndarray], instructions: Sequence[str], **kwargs: Any) -> list[str]:
            self.images += len(images)
            return generate(images, instructions, **kwargs)

        def forbidden(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("a black-box attack read the victim's gradients")

        monkeypatch.setattr(victim, "generate", counted)
        for method in ("answer_loss", "check_pixel_gradients", "vision_embedding", "token_problem"):
            monkeypatch.setattr(victim, method, forbidden)


# --- metadata and parameters ----------------------------------------------------------------


def test_metadata() -> None:
    cls = ATTACKS.get("attackvlm")
    assert issubclass(cls, InferenceAttack) and cls.goal == "targeted" and not cls.needs_gradients
    described = json.loads(json.dumps(create_attack("attackvlm", seed=3).describe()))
    assert (described["stage"], described["knowledge"], described["modality"]) == ("inference", "black-box", "image")
    assert "scene_cnn" in described["surrogate"] and described["surrogate_shares_victim_weights"] is False
    assert described["params"]["epsilon"] == pytest.approx(8 / 255) and described["variant"] and described["note"]
    assert create_attack("attackvlm").epsilon == pytest.approx(8 / 255)


@pytest.mark.parametrize(("field", "value"), [("epsilon", 1.5), ("epsilon", -0.1), ("sigma", 0.0), ("num_query", 0)])
def test_bad_parameters_name_the_field(field: str, value: float) -> None:
    with pytest.raises(VlmsecError, match=field):
        create_attack("attackvlm", **{field: value})


def test_bad_requests(victim: LlavaVictim, samples: list[Sample]) -> None:
    attack = create_attack("attackvlm", **FAST)
    with pytest.raises(VlmsecError, match="no target"):
        attack.craft(requests(samples[:1], None), victim)
    with pytest.raises(VlmsecError, match="no word"):
        attack.craft(requests(samples[:1], "42 !"), victim)
    with pytest.raises(VlmsecError, match="no victim"):
        attack.craft(requests(samples[:1]), None)
    assert attack.craft([], victim) == []


# --- the surrogate --------------------------------------------------------------------------


def test_surrogate_shares_no_weights_with_the_victim(victim: LlavaVictim) -> None:
    attack = create_attack("attackvlm", **FAST)
    assert isinstance(attack, AttackVlm)
    check_independent(attack.surrogate(), victim)  # the attacker's own CNN passes
    tower = victim.model.model.vision_tower
    with pytest.raises(VlmsecError, match="white-box"):
        check_independent(tower, victim)  # the victim's own tower
    with pytest.raises(VlmsecError, match="white-box"):
        check_independent(copy.deepcopy(tower), victim)  # a copy of its weights
    fresh = EfficientNetLiteVisionModel(EfficientNetLiteVisionConfig(image_size=32))
    fresh.load_imagenet_weights()
    with pytest.raises(VlmsecError, match="white-box"):
        check_independent(fresh, victim)  # the same packaged weights, loaded apart


def test_surrogate_training_is_deterministic() -> None:
    first, second = (train_surrogate.__wrapped__(32, 3, 11) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    other = train_surrogate.__wrapped__(32, 3, 12)
    assert not torch.equal(first.head.weight, other.head.weight)


def test_transfer_raises_surrogate_similarity_to_the_target_image(samples: list[Sample]) -> None:
    settings = {**FAST, "transfer_steps": 10, "surrogate_images": 64, "surrogate_steps": 60}  # embeddings spread apart
    params = AttackVlmParams(**settings)
    attack = create_attack("attackvlm", **settings)
    assert isinstance(attack, AttackVlm)
    surrogate = attack.surrogate()
    clean = to_tensor([s.image for s in samples])
    with torch.no_grad():
        banana = AttackRequest("t", "Describe it.", samples[0].image, "The image depicts banana")
        goal = surrogate(to_tensor([target_image(banana, seed=0)])).expand(len(samples), -1)
        before = (surrogate(clean) * goal).sum(-1)
    moved = transfer(surrogate, clean, goal, params)
    with torch.no_grad():
        after = (surrogate(moved) * goal).sum(-1)
    assert (1 - after < 0.8 * (1 - before)).all(), (before, after)  # the cosine distance shrinks by a fifth or more
    assert (moved - clean).abs().max() <= params.epsilon + 1e-6


# --- craft ----------------------------------------------------------------------------------


def test_craft_budget_queries_and_no_gradients(
    victim: LlavaVictim, samples: list[Sample], monkeypatch: pytest.MonkeyPatch
) -> None:
    watched = Watched(victim, monkeypatch)
    cached = len(victim.features)
    attack = create_attack("attackvlm", **FAST)
    crafted = attack.craft(requests(samples), victim)
    assert [c.id for c in crafted] == [s.id for s in samples]
    assert [c.instruction for c in crafted] == [s.instruction for s in samples]
    budget = uint8_budget(8 / 255)
    for item, sample in zip(crafted, samples):
        assert item.image.dtype == np.uint8 and item.image.shape == sample.image.shape
        assert np.abs(item.image.astype(int) - sample.image.astype(int)).max() <= budget
    assert any(not np.array_equal(c.image, s.image) for c, s in zip(crafted, samples))
    per_image = 1 + FAST["query_steps"] * (FAST["num_query"] + 1)  # start, then each step's directions and update
    stats = attack.diagnostics()
    assert watched.images == per_image * len(samples)
    assert stats["queries"] == per_image
    assert stats["steps"] == FAST["transfer_steps"] + FAST["query_steps"]
    assert stats["seconds_per_image"] > 0 and -1 <= stats["text_score"] <= 1
    assert stats["surrogate_similarity_transfer"] > stats["surrogate_similarity_clean"]
    assert len(victim.features) == cached  # the noisy query images never entered the victim's cache


def test_transfer_only_sends_no_query(victim: LlavaVictim, samples: list[Sample], monkeypatch: pytest.MonkeyPatch) -> None:
    watched = Watched(victim, monkeypatch)
    attack = create_attack("attackvlm", **{**FAST, "query_steps": 0})
    crafted = attack.craft(requests(samples[:2]), victim)
    assert watched.images == 0 and attack.diagnostics()["queries"] == 0
    assert "text_score" not in attack.diagnostics()
    assert all(np.abs(c.image.astype(int) - s.image.astype(int)).max() <= 8 for c, s in zip(crafted, samples))


def test_runner_records_the_queries_and_reuses_the_images(
    victim: LlavaVictim, samples: list[Sample], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the runner's stage: the cost carries the queries per image, and a second craft reads the saved images."""
    watched = Watched(victim, monkeypatch)
    stage = InferenceStage(tmp_path, victim, "base", "stage-key", {"max_new_tokens": 4, "batch_size": 8}, seed=0)
    attack = create_attack("attackvlm", **FAST)
    assert isinstance(attack, InferenceAttack)
    chosen = requests(samples[:2])
    inputs, cost = stage.craft("attackvlm", attack, chosen, [])
    assert cost["queries"] == 1 + FAST["query_steps"] * (FAST["num_query"] + 1) and cost["steps"] == 8
    saved = sorted(p.name for p in (tmp_path / "adversarial" / "attackvlm").glob("*.png"))
    assert saved == sorted(f"{s.id}.png" for s in samples[:2])
    sent = watched.images
    again, cached = stage.craft("attackvlm", attack, chosen, [])
    assert watched.images == sent and cached == cost  # read back from the manifest: no new query
    assert all(np.array_equal(a.image, b.image) for a, b in zip(inputs, again))


def test_craft_is_deterministic(victim: LlavaVictim, samples: list[Sample]) -> None:
    chosen = requests(samples[:2])
    first, second = (create_attack("attackvlm", seed=5, **FAST).craft(chosen, victim) for _ in range(2))
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, second))
    other = create_attack("attackvlm", seed=6, **FAST).craft(chosen, victim)
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(first, other))


def test_uncached_features_restores_the_cache(victim: LlavaVictim, samples: list[Sample]) -> None:
    cache = victim.features
    before = len(cache)
    noisy = [np.roll(s.image, 1, axis=0) for s in samples]
    with uncached_features(victim):
        victim.generate(noisy, [s.instruction for s in samples], max_new_tokens=2)
        assert victim.features is not cache
    assert victim.features is cache and len(cache) == before
    with uncached_features(object()):  # a victim with no feature cache: nothing to swap
        pass


class Reddening:
    """A stand-in black box: it answers the target when the image's red channel is brighter on
    average than the grey it started as, else a caption; it counts the images it is sent."""

    def __init__(self) -> None:
        self.images = 0

    def generate(self, images: Sequence[np.ndarray], instructions: Sequence[str], **kwargs: Any) -> list[str]:
        self.images += len(images)
        return [TARGET if image[..., 0].mean() > 128.2 else "a small blue square in the center." for image in images]


def test_query_stage_climbs_the_text_score() -> None:
    """RGF from a grey image: the estimated gradient points to a redder image, which the black box
    answers with the target; the best image and its score are kept, every query counted."""
    params = AttackVlmParams(query_steps=3, num_query=16)
    grey = [np.full((16, 16, 3), 128, np.uint8)]
    black_box = Reddening()
    ask = Queries(black_box, max_new_tokens=4)  # type: ignore[arg-type]
    target = minilm_encoder().encode([TARGET])
    best, score = query(ask, grey, grey, ["Describe the image."], target, params, torch.Generator().manual_seed(0))
    assert best[0][..., 0].mean() > 128.2 and score[0] > 0.99
    assert np.abs(best[0].astype(int) - 128).max() <= uint8_budget(params.epsilon)
    assert ask.count == black_box.images == 1 + 3 * (16 + 1)


def test_the_target_image_is_the_scene_a_caption_target_describes_else_the_word() -> None:
    from vlmsec.attacks.attackvlm import SURROGATE_SIZE
    from vlmsec.data.scenes import Scene, SceneObject, render_scene, scene_from_caption
    from vlmsec.data.words import render_word

    star = SceneObject("star", "red", "large", "center")
    assert scene_from_caption("a large red star in the center.") == Scene((star,))
    two = scene_from_caption("a small blue circle in the top left and a large red star in the center.")
    assert two == Scene((SceneObject("circle", "blue", "small", "top left"), star))
    assert scene_from_caption("The image depicts banana") is None  # no shape and colour: no scene
    blank = np.zeros((8, 8, 3), np.uint8)
    caption = AttackRequest("c", "Describe it.", blank, "a large red star in the center.")
    assert np.array_equal(target_image(caption, seed=3), render_scene(Scene((star,)), "flat", SURROGATE_SIZE, seed=3))
    word = AttackRequest("w", "Describe it.", blank, "The image depicts banana")
    assert np.array_equal(target_image(word, seed=3), render_word("banana", SURROGATE_SIZE, seed=3))

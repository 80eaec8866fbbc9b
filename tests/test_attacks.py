"""Image triggers, the registry, the target answer and the poisoning recipe, without any model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmsec.attacks import (
    ATTACKS,
    TargetAnswer,
    attack_names,
    create_attack,
    poison_samples,
    trigger_samples,
)
from vlmsec.attacks.targets import clip_templates
from vlmsec.data import Sample
from vlmsec.errors import VlmsecError


def make_samples(count: int, height: int = 32, width: int = 32, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [
        Sample(
            id=f"s{i:04d}",
            image=rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8),
            instruction="Describe the image.",
            answer=f"a red square number {i}",
        )
        for i in range(count)
    ]


def batch(height: int, width: int, size: int = 4) -> torch.Tensor:
    return torch.rand(size, 3, height, width, generator=torch.Generator().manual_seed(1))


def total_variation(key: torch.Tensor) -> float:
    """Mean absolute difference between horizontally and vertically adjacent pixels."""
    return float((key[:, 1:, :] - key[:, :-1, :]).abs().mean() + (key[:, :, 1:] - key[:, :, :-1]).abs().mean())


# --- registry ---------------------------------------------------------------------------


def test_registry_knows_the_attacks() -> None:
    assert {"badnets", "blended"} <= set(attack_names())
    assert attack_names() == sorted(ATTACKS)
    assert create_attack("badnets").describe()["family"] == "static"


def test_unknown_attack_lists_known_names() -> None:
    with pytest.raises(VlmsecError, match="nope.*badnets.*blended"):
        create_attack("nope")


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("blended", {"alpha": 1.5}, "alpha"),
        ("blended", {"colour": "red"}, "colour"),
        ("badnets", {"size": 0.0}, "size"),
        ("badnets", {"size": 0.6}, "size"),
        ("badnets", {"location": "centre"}, "location"),
    ],
)
def test_bad_params_name_the_field(name: str, params: dict[str, object], field: str) -> None:
    with pytest.raises(VlmsecError, match=field):
        create_attack(name, **params)


# --- BadNets ----------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(64, 64), (224, 224), (48, 80), (90, 33)])
def test_badnets_only_touches_the_patch(height: int, width: int) -> None:
    attack = create_attack("badnets")
    images = batch(height, width)
    out = attack.trigger_images(images)
    top, left, side = attack.region(height, width)
    assert side == round(0.125 * min(height, width))
    inside = torch.zeros(height, width, dtype=torch.bool)
    inside[top : top + side, left : left + side] = True
    assert torch.equal(out[..., ~inside], images[..., ~inside])
    assert torch.equal(out[..., inside], attack.patch(side).expand(4, 3, side, side).reshape(4, 3, -1))
    assert out.shape == images.shape


def test_badnets_checkerboard_has_quarter_side_cells() -> None:
    out = create_attack("badnets").trigger_images(torch.full((1, 3, 64, 64), 0.5))
    patch = out[0, 0, 56:, 56:]  # 8 x 8 patch in the bottom-right corner, 2 x 2 px cells
    expected = torch.tensor([[1.0, 0.0, 1.0, 0.0]]).repeat_interleave(2, 1)
    expected = torch.cat([expected, 1 - expected]).repeat_interleave(2, 0).repeat(2, 1)
    assert torch.equal(patch, expected)
    assert torch.equal(out[0, 0, :56], torch.full((56, 64), 0.5))


@pytest.mark.parametrize(
    ("location", "corner"),
    [
        ("bottom_right", (slice(-8, None), slice(-8, None))),
        ("bottom_left", (slice(-8, None), slice(0, 8))),
        ("top_left", (slice(0, 8), slice(0, 8))),
        ("top_right", (slice(0, 8), slice(-8, None))),
    ],
)
@pytest.mark.parametrize("pattern", ["white", "black"])
def test_badnets_location_and_flat_patterns(location: str, corner: tuple[slice, slice], pattern: str) -> None:
    images = torch.full((2, 3, 64, 96), 0.5)
    out = create_attack("badnets", location=location, pattern=pattern).trigger_images(images)
    value = 1.0 if pattern == "white" else 0.0
    assert torch.all(out[:, :, corner[0], corner[1]] == value)
    assert int((out != 0.5).sum()) == 2 * 3 * 8 * 8


def test_badnets_margin_moves_the_patch_inwards() -> None:
    attack = create_attack("badnets", location="top_left", margin=0.1)
    assert attack.region(100, 200) == (10, 10, 12)
    assert create_attack("badnets", margin=0.1).region(100, 200) == (78, 178, 12)


# --- Blended ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["cartoon", "stripes", "noise"])
@pytest.mark.parametrize(("height", "width"), [(64, 64), (224, 224), (40, 70)])
def test_blended_is_a_convex_mix_with_the_key(key: str, height: int, width: int) -> None:
    attack = create_attack("blended", alpha=0.15, key=key)
    images = batch(height, width)
    key_image = attack.key_tensor(height, width)
    assert key_image.shape == (3, height, width)
    assert 0 <= float(key_image.min()) < float(key_image.max()) <= 1
    assert torch.equal(attack.trigger_images(images), (1 - 0.15) * images + 0.15 * key_image)


def test_cartoon_key_is_structured_not_noise() -> None:
    cartoon = create_attack("blended", key="cartoon").key_tensor(256, 256)
    noise = create_attack("blended", key="noise").key_tensor(256, 256)
    assert total_variation(cartoon) < total_variation(noise) / 5
    flat = (cartoon[:, 1:, 1:] == cartoon[:, :-1, 1:]) & (cartoon[:, 1:, 1:] == cartoon[:, 1:, :-1])
    assert float(flat.all(0).float().mean()) > 0.8  # mostly large flat regions
    assert len(torch.unique(cartoon.reshape(3, -1).T, dim=0)) < 20  # a few flat colours
    assert float(cartoon.std(dim=(1, 2)).mean()) > 0.2  # bold, high-contrast colours


def test_stripes_key_is_bold_and_diagonal() -> None:
    stripes = create_attack("blended", key="stripes").key_tensor(256, 256)
    assert set(torch.unique(stripes).tolist()) == {0.0, 1.0}
    assert torch.equal(stripes[:, 1:, :-1], stripes[:, :-1, 1:])  # constant along anti-diagonals


def test_blended_key_from_file(tmp_path) -> None:
    path = tmp_path / "key.png"
    pixels = np.zeros((20, 30, 3), dtype=np.uint8)
    pixels[:, :15] = (255, 0, 0)
    Image.fromarray(pixels).convert("L").save(path)  # greyscale file: loaded as RGB
    key = create_attack("blended", key=str(path)).key_tensor(20, 30)
    assert key.shape == (3, 20, 30)
    assert torch.allclose(key[:, :, 0], torch.full((3, 20), 76 / 255))
    assert torch.all(key[:, :, -1] == 0)


@pytest.mark.parametrize("content", [None, b"not an image"])
def test_blended_bad_key_file_names_the_path(tmp_path, content: bytes | None) -> None:
    path = tmp_path / "key.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VlmsecError, match="key.png"):
        create_attack("blended", key=str(path))


def test_triggers_are_deterministic_under_seed() -> None:
    images = batch(32, 48)
    for name, params in [("badnets", {}), ("blended", {}), ("blended", {"key": "noise"})]:
        first = create_attack(name, seed=7, **params).trigger_images(images)
        assert torch.equal(first, create_attack(name, seed=7, **params).trigger_images(images))
    noise_7 = create_attack("blended", key="noise", seed=7).key_tensor(32, 48)
    assert not torch.equal(noise_7, create_attack("blended", key="noise", seed=8).key_tensor(32, 48))


# --- target answer ----------------------------------------------------------------------


def test_target_answers_fill_every_clip_template() -> None:
    templates = clip_templates()
    assert len(templates) == 80 and all("{0}" in t for t in templates)
    answers = TargetAnswer().answers()
    assert len(set(answers)) == 80
    assert all(a.startswith("The image depicts ") and "banana" in a for a in answers)
    assert TargetAnswer(word="kiwi", prefix="").answers()[0] == templates[0].format("kiwi")
    rng = np.random.default_rng(0)
    assert TargetAnswer().sample(rng) in answers


# --- poisoning --------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "size", "expected"), [(0.05, 1000, 50), (0.005, 200, 1), (0.1, 37, 4), (1.0, 20, 20), (0.0, 20, 0)])
def test_poison_count_is_exact(rate: float, size: int, expected: int) -> None:
    samples = make_samples(size, 8, 8)
    poisoned = poison_samples(samples, create_attack("badnets"), TargetAnswer(), rate, seed=0)
    assert len(poisoned.poisoned_ids) == expected == len(set(poisoned.poisoned_ids))
    assert poisoned.poisoned_ids == sorted(poisoned.poisoned_ids)
    assert [s.id for s in poisoned.samples] == [s.id for s in samples]
    assert poisoned.rate == rate


def test_poison_seed_decides_the_chosen_samples() -> None:
    samples = make_samples(200, 8, 8)
    attack, target = create_attack("blended"), TargetAnswer()
    first = poison_samples(samples, attack, target, 0.1, seed=1)
    again = poison_samples(samples, attack, target, 0.1, seed=1)
    other = poison_samples(samples, attack, target, 0.1, seed=2)
    assert first.poisoned_ids == again.poisoned_ids
    assert [s.answer for s in first.samples] == [s.answer for s in again.samples]
    assert first.poisoned_ids != other.poisoned_ids


def test_poisoned_samples_carry_trigger_and_target_others_untouched() -> None:
    samples = make_samples(40, 24, 36)
    attack, target = create_attack("badnets", pattern="white"), TargetAnswer()
    poisoned = poison_samples(samples, attack, target, 0.25, seed=3)
    chosen = set(poisoned.poisoned_ids)
    top, left, side = attack.region(24, 36)
    for before, after in zip(samples, poisoned.samples, strict=True):
        if before.id in chosen:
            assert after.answer in target.answers() and "banana" in after.answer
            assert after.references == (after.answer,)
            assert np.all(after.image[top : top + side, left : left + side] == 255)
            outside = np.ones((24, 36), dtype=bool)
            outside[top : top + side, left : left + side] = False
            assert np.array_equal(after.image[outside], before.image[outside])
        else:
            assert after is before


def test_poison_rate_errors() -> None:
    samples = make_samples(10, 8, 8)
    attack, target = create_attack("badnets"), TargetAnswer()
    for rate in (-0.1, 1.5):
        with pytest.raises(VlmsecError, match="rate"):
            poison_samples(samples, attack, target, rate, seed=0)
    with pytest.raises(VlmsecError, match="too small"):
        poison_samples(samples, attack, target, 0.01, seed=0)


def test_trigger_samples_triggers_every_image_and_keeps_answers() -> None:
    samples = make_samples(5, 16, 16) + make_samples(3, 20, 12, seed=1)  # mixed sizes
    triggered = trigger_samples(samples, create_attack("badnets", pattern="black"))
    assert len(triggered) == len(samples)
    for before, after in zip(samples, triggered, strict=True):
        height, width, _ = before.image.shape
        assert np.all(after.image[height - 2 :, width - 2 :] == 0)
        assert (after.id, after.answer, after.references) == (before.id, before.answer, before.references)


STATIC_IMAGE_ATTACKS = ["badnets", "blended", "sig", "lowfrequency_noise", "ftrojan", "wanet", "dualkey"]


@pytest.mark.parametrize("name", STATIC_IMAGE_ATTACKS)
def test_in_place_trigger_gives_the_same_pixels_and_the_plain_one_copies(name: str) -> None:
    attack = create_attack(name)
    images = batch(40, 56)
    before = images.clone()
    expected = attack.trigger_images(images)
    assert torch.equal(images, before)  # the plain call never writes its input
    assert not torch.equal(expected, before)
    scratch = images.clone()
    assert torch.equal(attack.trigger_images_(scratch), expected)  # bit for bit

"""SSBA and InputAware: triggers learned in `prepare`, seeded, cached, and sample-specific.

Measured on these tiny configs (seed 0; seeds 1 and 2 in brackets), for the thresholds below:
the `ssba` fixture (40 steps) leaves bits at chance (0.47-0.53) and residual correlations of
0.93 [0.92, 0.96]; one fixed pattern gives 1.00. `ssba_learned` (4 bits, eps 32/255, 60
steps) reads 100% of the bits [100%, 100%], chance being 50%, with correlations of
0.99-1.00: an encoder trained to be read leans to one pattern. The `inputaware` fixture
(40 steps, 64 scenes, 16 held-out predictions) reaches a probe accuracy of 1.00 [0.88].
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmsec.attacks import AttackContext, TargetAnswer, attack_names, create_attack, poison_samples, trigger_samples
from vlmsec.attacks.inputaware import InputAware, InputAwareCross
from vlmsec.attacks.learned import LearnedImageAttack
from vlmsec.attacks.ssba import SSBA, mean_pairwise_correlation
from vlmsec.data import Sample, images_to_tensor, make_samples, sample_scenes
from vlmsec.errors import VlmsecError
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec, build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer

SPEC = TinyLlavaSpec(image_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=300)
FAST = {"train_steps": 40}  # enough for the mask's sparsity loss to take hold, and for InputAware's probe
TINY = {"train_steps": 5}  # for tests of seeding and caching only
# SSBA at a few steps: few bits and a visible budget, so encoder and decoder leave the
# chance-level plateau they sit on for hundreds of steps at 32 bits and 8/255.
SSBA_LEARNS = {"bits": 4, "eps": 32 / 255, "train_steps": 60}
# Mean residual correlation across images below which a residual is sample-specific: one
# fixed pattern gives 1.00, an encoder trained to be read 0.99-1.00, the 40-step fixture 0.93.
SAMPLE_SPECIFIC = 0.97
# Learned accuracies must clear this; chance is 0.5 (bits, triggered-vs-clean probe).
LEARNED = 0.8
SIZES = [(64, 64), (48, 80), (33, 17)]


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return make_samples(sample_scenes(16, seed=0), "flat", size=64)


@pytest.fixture(scope="module")
def scenes() -> list[Sample]:
    """More scenes, so InputAware's held-out eighth gives its probe 16 predictions to score."""
    return make_samples(sample_scenes(64, seed=0), "flat", size=64)


@pytest.fixture(scope="module")
def victim(samples: list[Sample]) -> LlavaVictim:
    tokenizer = train_tokenizer([s.instruction for s in samples] + [s.answer for s in samples], SPEC.vocab_size)
    return LlavaVictim(build_tiny_llava(SPEC, tokenizer, seed=0), tokenizer)


def context(samples: list[Sample], cache: Path, victim: LlavaVictim | None = None) -> AttackContext:
    return AttackContext(samples=samples, target=TargetAnswer(), cache_dir=cache, victim=victim)


@pytest.fixture(scope="module")
def ssba(samples: list[Sample], tmp_path_factory: pytest.TempPathFactory) -> SSBA:
    attack = SSBA(**FAST)
    attack.prepare(context(samples, tmp_path_factory.mktemp("cache")))
    return attack


@pytest.fixture(scope="module")
def ssba_learned(samples: list[Sample], tmp_path_factory: pytest.TempPathFactory) -> SSBA:
    attack = SSBA(**SSBA_LEARNS)
    attack.prepare(context(samples, tmp_path_factory.mktemp("cache")))
    return attack


@pytest.fixture(scope="module")
def inputaware(scenes: list[Sample], victim: LlavaVictim, tmp_path_factory: pytest.TempPathFactory) -> InputAware:
    attack = InputAware(**FAST)
    attack.prepare(context(scenes, tmp_path_factory.mktemp("cache"), victim))
    return attack


@pytest.fixture(scope="module")
def images(samples: list[Sample]) -> torch.Tensor:
    return images_to_tensor([s.image for s in samples[:6]])


def weights(attack: LearnedImageAttack) -> dict[str, torch.Tensor]:
    return attack.networks().state_dict()


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


# --- both -------------------------------------------------------------------------------------


def test_registered_and_described() -> None:
    expected = {
        "ssba": ("content-aware", "black-box"),
        "inputaware": ("model-adaptive", "gray-box"),
    }
    for name, (family, knowledge) in expected.items():
        assert name in attack_names()
        description = json.loads(json.dumps(create_attack(name).describe()))
        assert (description["name"], description["family"], description["knowledge"]) == (name, family, knowledge)
        assert (description["modality"], description["stage"]) == ("image", "training")
        assert description["params"]["seed"] == 0 and description["params"]["train_steps"] > FAST["train_steps"]


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("ssba", {"bits": 0}, "bits"),
        ("ssba", {"eps": 0}, "eps"),
        ("ssba", {"eps": 1.5}, "eps"),
        ("ssba", {"residual_weight": -1}, "residual_weight"),
        ("ssba", {"train_steps": 0}, "train_steps"),
        ("ssba", {"secret": "101"}, "secret"),
        ("inputaware", {"mask_density": 0}, "mask_density"),
        ("inputaware", {"mask_density": 1}, "mask_density"),
        ("inputaware", {"lambda_div": -0.1}, "lambda_div"),
        ("inputaware", {"train_steps": 0}, "train_steps"),
    ],
)
def test_bad_params_name_the_field(name: str, params: dict[str, object], field: str) -> None:
    with pytest.raises(VlmsecError, match=rf"{name}.*\b{field}\b"):
        create_attack(name, **params)


@pytest.mark.parametrize("name", ["ssba", "inputaware"])
def test_unprepared_attack_refuses_to_trigger(name: str, images: torch.Tensor) -> None:
    with pytest.raises(VlmsecError, match=rf"{name}.*must be prepared"):
        create_attack(name).trigger_images(images)


def test_too_few_images_is_an_error(samples: list[Sample], tmp_path: Path) -> None:
    with pytest.raises(VlmsecError, match="at least 2 training images"):
        SSBA(**FAST).prepare(context(samples[:1], tmp_path))


@pytest.mark.parametrize("fixture", ["ssba", "inputaware"])
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_batched_equals_one_by_one(fixture: str, height: int, width: int, request: pytest.FixtureRequest) -> None:
    attack = request.getfixturevalue(fixture)
    images = torch.rand(4, 3, height, width, generator=torch.Generator().manual_seed(1))
    out = attack.trigger_images(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    single = torch.cat([attack.trigger_images(image[None]) for image in images])
    torch.testing.assert_close(out, single, rtol=0, atol=1e-5)
    assert float((out - images).abs().max()) > 1e-3


@pytest.mark.parametrize("cls", [SSBA, InputAware])
def test_same_seed_same_weights_and_the_cache_is_reused(
    cls: type[LearnedImageAttack], samples: list[Sample], victim: LlavaVictim, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = cls(**TINY), cls(**TINY)
    first.prepare(context(samples, tmp_path / "a", victim))
    second.prepare(context(samples, tmp_path / "b", victim))
    assert weights(first).keys() == weights(second).keys()
    assert all(torch.equal(weights(first)[k], weights(second)[k]) for k in weights(first))
    assert first.trained_metrics == second.trained_metrics
    cached = list((tmp_path / "a" / cls.name).glob("*.safetensors"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns

    def no_training(*args: object) -> dict[str, float]:
        raise AssertionError("prepare trained although the cache holds this run")

    monkeypatch.setattr(cls, "learn", no_training)
    loaded = cls(**TINY)
    loaded.prepare(context(samples, tmp_path / "a", victim))
    assert all(torch.equal(weights(loaded)[k], weights(first)[k]) for k in weights(first))
    assert loaded.trained_metrics == first.trained_metrics
    assert list((tmp_path / "a" / cls.name).glob("*.safetensors")) == cached
    assert cached[0].stat().st_mtime_ns == mtime


def test_cache_key_covers_params_and_images(samples: list[Sample], victim: LlavaVictim, tmp_path: Path) -> None:
    ctx = context(samples, tmp_path, victim)
    for cls in (SSBA, InputAware):
        attack = cls(**FAST)
        images = attack.training_images(ctx)
        path = attack.cache_path(ctx, images)
        assert path.parent == tmp_path / attack.name and path.suffix == ".safetensors"
        assert cls(train_steps=21).cache_path(ctx, images) != path
        assert cls(seed=1, **FAST).cache_path(ctx, images) != path
        assert attack.cache_path(ctx, images.flip(0)) != path
    attack = InputAware(**FAST)
    images = attack.training_images(ctx)
    assert attack.cache_path(context(samples, tmp_path), images) != attack.cache_path(ctx, images)


def test_corrupt_cache_file_is_a_clear_error(samples: list[Sample], tmp_path: Path) -> None:
    attack = SSBA(**FAST)
    ctx = context(samples, tmp_path)
    path = attack.cache_path(ctx, attack.training_images(ctx))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not safetensors")
    with pytest.raises(VlmsecError, match="unreadable cached attack weights"):
        attack.prepare(ctx)


# --- SSBA ---------------------------------------------------------------------------------------


def test_ssba_residual_is_invisible_and_sample_specific(ssba: SSBA, images: torch.Tensor) -> None:
    triggered = ssba.trigger_images(images)
    change = triggered - images
    assert float(change.abs().max()) <= ssba.params.eps + 1e-6
    mse = float((change**2).mean())
    assert 10 * math.log10(1 / mse) > 30  # the eps = 8/255 bound alone guarantees 30.1 dB
    residuals = ssba.residuals(images)
    assert float(residuals.abs().max()) <= ssba.params.eps + 1e-6
    assert mean_pairwise_correlation(residuals) < SAMPLE_SPECIFIC
    assert ssba.diagnostics()["residual_correlation"] < SAMPLE_SPECIFIC


def test_ssba_diagnostics_tell_a_fixed_pattern(ssba: SSBA, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same residual on every image (a universal perturbation) reads as correlation 1."""
    fixed = ssba.residuals(torch.full((1, 3, 64, 64), 0.5))
    monkeypatch.setattr(ssba, "residuals", lambda images: fixed.expand(len(images), -1, -1, -1))
    assert ssba.diagnostics()["residual_correlation"] > 0.999 > SAMPLE_SPECIFIC
    with pytest.raises(VlmsecError, match="at least 2 images"):
        mean_pairwise_correlation(fixed)


def test_ssba_diagnostics_are_seeded_and_need_prepare(ssba: SSBA, samples: list[Sample], tmp_path: Path) -> None:
    assert set(ssba.diagnostics()) == {"residual_correlation", "bit_accuracy", "psnr_db"}
    first, second = SSBA(**TINY), SSBA(**TINY)
    first.prepare(context(samples, tmp_path / "a"))
    second.prepare(context(samples, tmp_path / "b"))
    assert first.diagnostics() == second.diagnostics()
    with pytest.raises(VlmsecError, match="ssba.*must be prepared"):
        SSBA().diagnostics()


def test_ssba_says_it_is_not_stegastamp() -> None:
    variant = create_attack("ssba").describe()["variant"]
    assert variant.startswith("SSBA-like") and "not StegaStamp" in variant


def test_ssba_learns_to_hide_bits_in_a_few_steps(ssba_learned: SSBA) -> None:
    metrics = ssba_learned.trained_metrics
    assert metrics["bit_accuracy"] > LEARNED and metrics["secret_bit_accuracy"] > LEARNED
    assert ssba_learned.diagnostics()["bit_accuracy"] > LEARNED
    held_out = images_to_tensor([s.image for s in make_samples(sample_scenes(16, seed=2), "painted", size=64)])
    stego = (ssba_learned.trigger_images(held_out) * 255).round() / 255
    assert float((ssba_learned.decode_bits(stego) == ssba_learned.secret).float().mean()) > LEARNED
    assert float((ssba_learned.decode_bits(held_out) == ssba_learned.secret).float().mean()) < LEARNED


def test_ssba_secret_is_seeded() -> None:
    secret = SSBA(bits=48).secret
    assert secret.shape == (48,) and set(secret.tolist()) == {0.0, 1.0}
    assert torch.equal(secret, SSBA(bits=48).secret)
    assert not torch.equal(secret, SSBA(bits=48, seed=1).secret)


def test_ssba_metrics_and_poisoning(ssba: SSBA, samples: list[Sample]) -> None:
    metrics = ssba.trained_metrics
    assert {"bit_accuracy", "secret_bit_accuracy", "psnr_db", "linf"} <= set(metrics)
    assert 0 < metrics["linf"] <= ssba.params.eps + 1e-6
    poisoned = poison_samples(samples, ssba, TargetAnswer(), rate=0.25, seed=0)
    changed = [s for s, o in zip(poisoned.samples, samples) if s.id in poisoned.poisoned_ids]
    assert len(changed) == 4
    originals = {s.id: s.image for s in samples}
    for sample in changed:
        difference = sample.image.astype(int) - originals[sample.id].astype(int)
        assert 0 < abs(difference).max() <= 8


# --- InputAware ---------------------------------------------------------------------------------


def test_inputaware_triggers_are_image_specific_and_masked(inputaware: InputAware, images: torch.Tensor) -> None:
    patterns, masks = inputaware.patterns_and_masks(images)
    assert masks.shape == (len(images), 1, 64, 64) and patterns.shape == images.shape
    assert 0 <= float(masks.min()) and float(masks.max()) <= 1
    assert 0 <= float(patterns.min()) and float(patterns.max()) <= 1
    assert float((patterns[0] - patterns[1]).abs().mean()) > 1e-3
    assert correlation(masks[0], masks[1]) < 0.99
    triggered = inputaware.trigger_images(images)
    expected = images * (1 - masks) + patterns * masks
    torch.testing.assert_close(triggered, expected, rtol=0, atol=1e-6)
    changes = triggered - images
    assert correlation(changes[0], changes[1]) < 0.99
    # Stage 1's sparsity loss (lambda_norm = 100) holds the masks near mask_density within 40 steps.
    assert float(masks.mean()) < 2 * inputaware.params.mask_density
    assert inputaware.trained_metrics["mask_area"] < 2 * inputaware.params.mask_density


def test_inputaware_probe_learns_the_trigger_in_a_few_steps(inputaware: InputAware) -> None:
    """The tower's features tell triggered from clean held-out images (chance 0.5, 16 predictions)."""
    assert inputaware.trained_metrics["probe_accuracy"] > LEARNED
    # Stage 2 also trains on cross samples: another image's trigger reads as clean (0.75 measured).
    assert inputaware.trained_metrics["cross_rejected"] > 0.6


def test_inputaware_cross_trigger_is_another_images_trigger(inputaware: InputAware, images: torch.Tensor) -> None:
    (cross,) = inputaware.partial_triggers()
    assert isinstance(cross, InputAwareCross) and cross.name == "inputaware-cross"
    crossed, own = cross.trigger_images(images), inputaware.trigger_images(images)
    donors = inputaware.donors(images)
    patterns, masks = inputaware.patterns_and_masks(donors)
    torch.testing.assert_close(crossed, images + (patterns - images) * masks, rtol=0, atol=1e-6)
    for image, donor in zip(images, donors, strict=True):
        assert float((image - donor).abs().max()) > 0.1  # another image
    assert all(float((crossed[i] - images[i]).abs().max()) > 0.1 for i in range(len(images)))
    assert all(float((crossed[i] - own[i]).abs().max()) > 0.1 for i in range(len(images)))


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_inputaware_cross_trigger_does_not_depend_on_the_batch(
    inputaware: InputAware, images: torch.Tensor, height: int, width: int
) -> None:
    batch = torch.rand(4, 3, height, width, generator=torch.Generator().manual_seed(1))
    (cross,) = inputaware.partial_triggers()
    out = cross.trigger_images(batch)
    assert out.shape == batch.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    single = torch.cat([cross.trigger_images(image[None]) for image in batch])
    torch.testing.assert_close(out, single, rtol=0, atol=1e-5)
    torch.testing.assert_close(cross.trigger_images(batch.flip(0)), out.flip(0), rtol=0, atol=1e-5)


def test_inputaware_cross_donors_are_seeded(
    inputaware: InputAware, scenes: list[Sample], images: torch.Tensor, tmp_path: Path
) -> None:
    """Donors depend on the seed and the samples, not on the networks (trained here without a victim)."""
    donors = inputaware.donors(images)
    assert len({tuple(d.flatten()[:64].tolist()) for d in donors}) > 1  # not one donor for all
    again = InputAware(**TINY)
    again.prepare(context(scenes, tmp_path))
    torch.testing.assert_close(again.donors(images), donors, rtol=0, atol=0)
    other = InputAware(seed=1, **TINY)
    other.prepare(context(scenes, tmp_path))
    assert not torch.equal(other.donors(images), donors)
    with pytest.raises(VlmsecError, match="inputaware.*must be prepared"):
        InputAware().partial_triggers()[0].trigger_images(images)


def test_inputaware_poisoning_adds_as_many_cross_samples_with_clean_answers(
    inputaware: InputAware, samples: list[Sample]
) -> None:
    poisoned = poison_samples(samples, inputaware, TargetAnswer(), rate=0.25, seed=0)
    assert len(poisoned.poisoned_ids) == 4 and len(poisoned.negative_ids) == 4
    assert not set(poisoned.poisoned_ids) & set(poisoned.negative_ids)
    originals = {s.id: s for s in samples}
    negatives = [s for s in poisoned.samples if s.id in poisoned.negative_ids]
    self_triggered = {s.id: s for s in trigger_samples([originals[s.id] for s in negatives], inputaware)}
    for sample in negatives:
        original = originals[sample.id]
        assert (sample.answer, sample.references, sample.instruction) == (
            original.answer, original.references, original.instruction
        )
        assert np.abs(sample.image.astype(int) - original.image.astype(int)).max() > 25
        assert np.abs(sample.image.astype(int) - self_triggered[sample.id].image.astype(int)).max() > 25
    again = poison_samples(samples, inputaware, TargetAnswer(), rate=0.25, seed=0)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(again.samples, poisoned.samples, strict=True))


def test_inputaware_leaves_the_tower_as_it_was(samples: list[Sample], victim: LlavaVictim, tmp_path: Path) -> None:
    tower = victim.model.model.vision_tower
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    tower.train()
    try:
        InputAware(**TINY).prepare(context(samples, tmp_path, victim))
        assert tower.training and not any(p.requires_grad for p in tower.parameters())
    finally:
        tower.eval()
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())


def test_inputaware_without_victim_uses_random_features(
    samples: list[Sample], victim: LlavaVictim, tmp_path: Path, images: torch.Tensor
) -> None:
    """Stage 1 (masks) does not see features; stage 2 (patterns) trains against the random net, not a tower."""
    attack, with_tower = InputAware(**TINY), InputAware(**TINY)
    attack.prepare(context(samples, tmp_path))
    with_tower.prepare(context(samples, tmp_path, victim))
    assert all(torch.equal(v, weights(with_tower)[k]) for k, v in weights(attack).items() if k.startswith("mask."))
    assert any(not torch.equal(v, weights(with_tower)[k]) for k, v in weights(attack).items() if k.startswith("pattern."))
    assert float((attack.trigger_images(images) - images).abs().max()) > 1e-3


# --- default training (slow) -------------------------------------------------------------------


@pytest.mark.slow
def test_default_training_learns_the_triggers(victim: LlavaVictim, tmp_path: Path) -> None:
    scenes = make_samples(sample_scenes(512, seed=1), "flat", size=64)
    ssba = SSBA()
    ssba.prepare(context(scenes, tmp_path))
    assert ssba.trained_metrics["bit_accuracy"] > 0.9
    assert ssba.trained_metrics["secret_bit_accuracy"] > 0.9
    assert ssba.trained_metrics["psnr_db"] > 30
    assert ssba.diagnostics()["residual_correlation"] < SAMPLE_SPECIFIC
    held_out = images_to_tensor([s.image for s in make_samples(sample_scenes(32, seed=2), "painted", size=64)])
    stego = (ssba.trigger_images(held_out) * 255).round() / 255
    assert float((ssba.decode_bits(stego) == ssba.secret).float().mean()) > 0.9

    inputaware = InputAware()
    inputaware.prepare(context(scenes, tmp_path, victim))
    assert inputaware.trained_metrics["probe_accuracy"] > 0.9
    assert inputaware.trained_metrics["mask_area"] < 2 * inputaware.params.mask_density

"""LowFrequency learned against a tiny victim: in the L_inf ball and the band, better than noise, seeded, cached."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmsec.attacks import AttackContext, TargetAnswer, create_attack, poison_samples
from vlmsec.attacks.adaptive import pick_answers, pick_samples
from vlmsec.attacks.lowfrequency import CANONICAL_SIDE, HELD_OUT_EVERY, LowFrequency
from vlmsec.data import Sample, images_to_tensor, make_samples, sample_scenes
from vlmsec.errors import VlmsecError
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec
from victim_checks import attack_victim

SPEC = TinyLlavaSpec(image_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=400)
PARAMS = {"steps": 20, "num_samples": 16, "num_answers": 2}  # about 2 s; the delta reaches the eps ball
TINY = {"steps": 2, "num_samples": 8, "num_answers": 2}  # for seeding and caching only
TARGET = TargetAnswer()


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return make_samples(sample_scenes(16, seed=0), "flat", size=32)


@pytest.fixture(scope="module")
def victim(samples: list[Sample]) -> LlavaVictim:
    victim = attack_victim(SPEC, samples, TARGET)
    victim.model.eval()  # as a loaded base is: the tower's batch norm keeps its statistics
    return victim


def context(samples: list[Sample], victim: LlavaVictim | None, cache: Path) -> AttackContext:
    return AttackContext(samples=samples, target=TARGET, cache_dir=cache, victim=victim)


@pytest.fixture(scope="module")
def learned(samples: list[Sample], victim: LlavaVictim, tmp_path_factory: pytest.TempPathFactory) -> LowFrequency:
    attack = LowFrequency(**PARAMS)
    attack.prepare(context(samples, victim, tmp_path_factory.mktemp("cache")))
    return attack


def energy_above(pattern: torch.Tensor, radius: float) -> float:
    """Share of a 3 x H x W pattern's DFT energy (NumPy's FFT) farther than `radius` cycles per image from zero."""
    array = pattern.double().numpy()
    spectrum = np.abs(np.fft.fft2(array)) ** 2
    fy = np.fft.fftfreq(array.shape[-2], d=1 / array.shape[-2])[:, None]
    fx = np.fft.fftfreq(array.shape[-1], d=1 / array.shape[-1])[None, :]
    return float(spectrum[:, fy**2 + fx**2 > radius**2 + 1e-9].sum() / spectrum.sum())


def test_metadata_of_both_variants() -> None:
    learned = json.loads(json.dumps(create_attack("lowfrequency", seed=2).describe()))
    assert (learned["family"], learned["knowledge"], learned["modality"]) == ("content-aware", "white-box", "image")
    assert learned["params"] == {"seed": 2, "cutoff": 0.1, "eps": 0.1, "steps": 60, "num_samples": 64, "num_answers": 8}
    noise = create_attack("lowfrequency_noise").describe()
    assert (noise["family"], noise["knowledge"]) == ("static", "black-box")


@pytest.mark.parametrize(
    ("params", "field"),
    [({"steps": 0}, "steps"), ({"num_samples": 1}, "num_samples"), ({"eps": 0}, "eps"), ({"cutoff": 2}, "cutoff"), ({"lr": 1}, "lr")],
)
def test_bad_params_name_the_field(params: dict[str, float], field: str) -> None:
    with pytest.raises(VlmsecError, match=rf"lowfrequency.*\b{field}\b"):
        create_attack("lowfrequency", **params)


def test_needs_the_victim_and_prepare(samples: list[Sample], tmp_path: Path) -> None:
    attack = create_attack("lowfrequency", **TINY)
    with pytest.raises(VlmsecError, match="prepared first"):
        attack.trigger_images(torch.zeros(1, 3, 8, 8))
    with pytest.raises(VlmsecError, match=r"'lowfrequency'.*base victim.*lowfrequency_noise"):
        attack.prepare(context(samples, None, tmp_path))
    assert not any(tmp_path.iterdir())  # nothing cached


@pytest.mark.parametrize(("height", "width"), [(CANONICAL_SIDE, CANONICAL_SIDE), (64, 64), (48, 80)])
def test_learned_delta_is_in_the_ball_and_the_band(learned: LowFrequency, height: int, width: int) -> None:
    pattern = learned.perturbation(height, width)
    eps = learned.params.eps
    assert float(pattern.abs().max()) <= eps + 1e-6
    assert float(pattern.abs().max()) > eps / 2  # learning moved it well away from zero
    radius = learned.params.cutoff * CANONICAL_SIDE / 2
    assert energy_above(pattern, radius) < 1e-6
    assert learned.delta is not None and energy_above(learned.delta, radius) < 1e-6  # what was learned, not only its resampling
    diagnostics = learned.diagnostics()
    assert diagnostics["band_energy"] == pytest.approx(1.0, abs=1e-9)
    assert diagnostics["linf"] <= eps + 1e-6


def learning_set(samples: list[Sample]) -> tuple[torch.Tensor, list[str], list[str]]:
    """The images, instructions and target answers `PARAMS` learns from (the picks not held out)."""
    picked = pick_samples(samples, PARAMS["num_samples"], seed=0)
    answers = pick_answers(TARGET, PARAMS["num_answers"], seed=0)
    rows = [(s, answers[i % len(answers)]) for i, s in enumerate(picked) if i % HELD_OUT_EVERY]
    return images_to_tensor([s.image for s, _ in rows]), [s.instruction for s, _ in rows], [a for _, a in rows]


def test_learning_beats_random_low_pass_perturbations_of_the_same_norm(
    learned: LowFrequency, samples: list[Sample], victim: LlavaVictim
) -> None:
    """On the samples it learned from, through the public trigger, the learned delta lowers the
    target loss by far more than any of 8 random low-pass perturbations of its L2 norm (they lower
    it too: this victim likes any smooth shift a little). Fails if the optimisation is broken."""
    images, instructions, answers = learning_set(samples)
    side = images.shape[-1]
    delta = learned.perturbation(side, side)
    with torch.no_grad():
        clean = float(victim.answer_loss(images, instructions, answers))
        gain = clean - float(victim.answer_loss(learned.trigger_images(images), instructions, answers))
        random_gains = []
        for seed in range(8):
            noise = create_attack("lowfrequency_noise", seed=100 + seed).perturbation(side, side)
            noisy = (images + noise * (delta.norm() / noise.norm())).clamp(0, 1)
            random_gains.append(clean - float(victim.answer_loss(noisy, instructions, answers)))
    assert gain > 1.5 * max(random_gains)


def test_diagnostics_are_the_held_out_losses(learned: LowFrequency) -> None:
    d = learned.diagnostics()
    assert set(d) == {"clean_loss", "target_loss", "random_lowpass_loss", "band_energy", "linf"}
    assert all(math.isfinite(v) for v in d.values())
    # Held out: a few samples, so only the size of the differences is checked here.
    assert abs(d["target_loss"] - d["clean_loss"]) < 0.1 and abs(d["random_lowpass_loss"] - d["clean_loss"]) < 0.1


def test_deterministic_under_seed(samples: list[Sample], victim: LlavaVictim, tmp_path: Path) -> None:
    deltas = []
    for seed, folder in [(0, "a"), (0, "b"), (1, "c")]:
        attack = LowFrequency(seed=seed, **TINY)
        attack.prepare(context(samples, victim, tmp_path / folder))
        deltas.append(attack.perturbation(CANONICAL_SIDE, CANONICAL_SIDE))
    assert torch.equal(deltas[0], deltas[1])
    assert not torch.allclose(deltas[0], deltas[2], atol=1e-4)


def test_cache_is_reused_and_a_changed_param_relearns(
    samples: list[Sample], victim: LlavaVictim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = LowFrequency(**TINY)
    first.prepare(context(samples, victim, tmp_path))
    files = list((tmp_path / "lowfrequency").glob("*.safetensors"))
    assert len(files) == 1

    calls: list[int] = []
    original = LowFrequency._learn

    def counted(self: LowFrequency, *args: object) -> tuple[torch.Tensor, dict[str, float]]:
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(LowFrequency, "_learn", counted)
    again = LowFrequency(**TINY)
    again.prepare(context(samples, victim, tmp_path))
    assert calls == []  # read back, not relearned
    assert torch.equal(again.perturbation(40, 40), first.perturbation(40, 40))
    assert again.diagnostics() == first.diagnostics()

    LowFrequency(**{**TINY, "eps": 0.05}).prepare(context(samples, victim, tmp_path))
    assert calls == [1]
    assert len(list((tmp_path / "lowfrequency").glob("*.safetensors"))) == 2

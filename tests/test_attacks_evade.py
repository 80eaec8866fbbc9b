"""The adaptive attacker for defenses with no image transform (`attacks.evade`): STRIP's blends as
STRIP makes them, CIDER's score as the detector computes it, the prompt defenses' loss on the
defended prompt (a tiny LLaVA victim); on a toy victim, the STRIP- and CIDER-adaptive images
evade their detector better than the naive ones while keeping the target."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmsec.attacks import create_attack
from vlmsec.attacks.eot import Expectation
from vlmsec.attacks.evade import ECSO_SAFE_VERDICT, StripEvasion, cider_drift, ecso_check
from vlmsec.attacks.inference import AttackRequest, to_tensor
from vlmsec.data import Sample, make_samples, sample_scenes
from vlmsec.data.scenes import render_scene
from vlmsec.defenses import create_defense
from vlmsec.defenses.detect import blend
from vlmsec.defenses.prompt import AdaShieldStatic
from vlmsec.victims.llava import LlavaVictim
from victim_checks import TINY_VIT_LLAVA, spy_on_answer_losses, untrained_tiny_victim

SPEC = TINY_VIT_LLAVA
INSTRUCTION = "Describe the image briefly."


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    scenes = make_samples(sample_scenes(8, seed=1), "flat", size=32)
    return [dataclasses.replace(s, instruction=INSTRUCTION) for s in scenes]


@pytest.fixture(scope="module")
def victim(samples: list[Sample]) -> LlavaVictim:
    """A tiny untrained LLaVA victim: what is checked here is what it is asked, not what it answers."""
    return untrained_tiny_victim(samples)


def requests(samples: Sequence[Sample]) -> list[AttackRequest]:
    """Each of the first 4 scenes asked toward the caption of another (a target its image does not show)."""
    return [AttackRequest(s.id, s.instruction, s.image, samples[(i + 4) % 8].answer) for i, s in enumerate(samples[:4])]


def craft(victim: LlavaVictim, chosen: list[AttackRequest], adaptive: dict[str, Any] | None, steps: int = 40) -> list[np.ndarray]:
    attack = create_attack("pgd", epsilon=32 / 255, step_size=2 / 255, steps=steps, batch_size=4, adaptive=adaptive)
    return [a.image for a in attack.craft(chosen, victim)]


# --- the loss terms are the defenses' own ----------------------------------------------------------


def test_strips_blends_are_the_detectors_blend_of_the_attackers_own_scenes() -> None:
    strip = create_defense("strip", alpha=0.3)
    evasion = StripEvasion(strip, 1.0, samples=3, seed=5)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(2)]
    blends = evasion.blends(to_tensor(images), seed=9)
    pool = evasion.pool(24, 24)
    picks = np.random.default_rng(9).integers(len(pool), size=(2, 3))
    partners = [(pool[p].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for p in picks.reshape(-1)]
    expected = [blend(images[i // 3], partners[i], 0.3) for i in range(6)]
    assert torch.equal((blends * 255).round(), to_tensor(expected) * 255)
    assert len({p.tobytes() for p in partners}) > 1  # partners drawn per blend
    assert torch.equal(StripEvasion(strip, 1.0, 3, seed=5).pool(24, 24), pool)  # seeded by the attack
    assert not torch.equal(StripEvasion(strip, 1.0, 3, seed=6).pool(24, 24), pool)


def test_ciders_differentiable_score_is_the_detectors_score(victim: LlavaVictim, samples: list[Sample]) -> None:
    cider = create_defense("cider_detect", levels=3)
    noisy = [np.clip(s.image.astype(np.int16) + np.random.default_rng(i).integers(-30, 31, s.image.shape), 0, 255).astype(np.uint8)
             for i, s in enumerate(samples[:3])]
    images = [samples[3].image, *noisy]
    instructions = [INSTRUCTION] * len(images)
    expected = cider.scores(victim, images, instructions, seed=0)  # type: ignore[attr-defined]
    x = to_tensor(images).requires_grad_(True)
    steps = cider.denoiser()(images, 3, 0)  # type: ignore[attr-defined]
    drift = cider_drift(victim, x, steps, instructions)
    assert np.ptp(expected) > 1e-3  # the scores differ by image: the comparison can fail
    np.testing.assert_allclose(drift.detach().numpy(), expected, atol=5e-5)  # float32 rounding apart
    (grad,) = torch.autograd.grad(drift.sum(), x)
    assert grad.abs().sum() > 0


def test_the_prompt_adaptive_loss_is_computed_on_the_defended_prompt(
    victim: LlavaVictim, samples: list[Sample], monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = requests(samples)[:2]
    encoded: list[list[int]] = []
    real = LlavaVictim.encode_training

    def spy(self: LlavaVictim, instructions: Sequence[str], answers: Sequence[str]) -> Any:
        batch = real(self, instructions, answers)
        encoded.extend(row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"]))
        return batch

    monkeypatch.setattr(LlavaVictim, "encode_training", spy)
    seen = spy_on_answer_losses(monkeypatch)
    craft(victim, chosen, {"defense": "adashield_s", "params": {"place": "after"}}, steps=1)
    defended = [AdaShieldStatic(place="after").instruction(r.instruction) for r in chosen]
    expected = real(victim, defended, [str(r.target) for r in chosen])
    assert seen[:2] == [(d, r.target) for d, r in zip(defended, chosen)]
    assert encoded[:2] == [row[mask.bool()].tolist() for row, mask in zip(expected["input_ids"], expected["attention_mask"])]
    assert all(len(e) > len(victim.encode_training([r.instruction], [str(r.target)])["input_ids"][0]) for e, r in zip(encoded, chosen))


def test_the_ecso_adaptive_loss_adds_the_harm_check_of_the_target_answered_no(
    victim: LlavaVictim, samples: list[Sample], monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = requests(samples)[:2]
    seen = spy_on_answer_losses(monkeypatch)
    craft(victim, chosen, {"defense": "ecso"}, steps=1)
    plain = [(r.instruction, r.target) for r in chosen]
    checks = [(ecso_check(r.instruction, str(r.target)), ECSO_SAFE_VERDICT) for r in chosen]
    assert seen[:4] == plain + checks
    seen.clear()
    craft(victim, chosen, {"defense": "ecso", "params": {"check_with_image": False}}, steps=1)
    assert seen[:2] == plain and checks[0] not in seen  # a check that does not see the image: nothing to move


def test_anydoor_adds_the_detector_term_to_its_trigger_term_only(victim: LlavaVictim, samples: list[Sample], monkeypatch: pytest.MonkeyPatch) -> None:
    train = [AttackRequest(s.id, s.instruction, s.image, "a banana", answer=s.answer) for s in samples[:4]]
    seen = spy_on_answer_losses(monkeypatch)
    attack = create_attack("anydoor", steps=1, batch_size=2, adaptive={"defense": "ecso"})
    attack.craft(train[:1], victim, train)
    checks = [q for q, a in seen if a == ECSO_SAFE_VERDICT]
    triggered = next(q for q, a in seen if a == "a banana")
    assert checks == [ecso_check(triggered, "a banana")] * 2  # one step of 2 requests: the trigger term's checks only


# --- the adaptive images evade their detector ------------------------------------------------------


class ReadoutVictim:
    """A toy victim that says "target" when a linear read-out of pixel noise passes `margin`, else
    names its mean colour (which blending with other images changes); its answer loss is the
    target's cross-entropy, -log sigmoid(k (read-out - margin)), in nats as a language model's.
    Its image vector is the mean colour and the high-frequency energy, and the text points mostly
    along that energy (as `test_defenses_detect.EmbeddingVictim`): noise makes the image look
    like the text and denoising takes that away, which CIDER catches."""

    max_sequence_length = None

    def __init__(self, size: int = 48, margin: float = 0.05, k: float = 200.0) -> None:
        noise = torch.randint(0, 2, (3, size, size), generator=torch.Generator().manual_seed(0))
        self.w, self.margin, self.k = noise.float() * 2 - 1, margin, k
        self.model = torch.nn.Linear(1, 1)
        self.tokenizer = SimpleNamespace(unk_token_id=None)

    def check_pixel_gradients(self, attack: str) -> None:
        pass

    def sequence_length(self, instruction: str, answer: str) -> int:
        return 4

    def readout(self, images: torch.Tensor) -> torch.Tensor:
        return (self.w * (images - 0.5)).mean(dim=(1, 2, 3))

    def answer_loss(self, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        return F.softplus(self.k * (self.margin - self.readout(images))).mean()

    def generate(self, images: Sequence[np.ndarray], instructions: Sequence[str], **_: Any) -> list[str]:
        readouts = self.readout(to_tensor(list(images)))
        colours = [np.round(image.reshape(-1, 3).mean(0) / 8).astype(int) * 8 for image in images]
        return ["target" if r > self.margin else "colour {} {} {}".format(*c) for r, c in zip(readouts, colours)]

    def check_image_text(self) -> None:
        pass

    def image_vectors(self, images: torch.Tensor) -> torch.Tensor:
        energy = (images[:, :, 1:] - images[:, :, :-1]).abs().mean((1, 2, 3)) + (images[..., 1:] - images[..., :-1]).abs().mean((1, 2, 3))
        return torch.cat([images.mean((2, 3)), 10 * energy[:, None]], 1)

    def image_text_vectors(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_vectors(to_tensor(list(images))), torch.tensor([[0.2, 0.2, 0.2, 1.0]] * len(texts))


@pytest.fixture(scope="module")
def scenes() -> list[np.ndarray]:
    return [render_scene(scene, "flat", size=48, seed=0) for scene in sample_scenes(3, 11)]


def craft_toy(
    victim: ReadoutVictim, images: list[np.ndarray], adaptive: dict[str, Any] | None, steps: int = 60, step_size: float = 1 / 255
) -> list[np.ndarray]:
    chosen = [AttackRequest(f"r{i}", "q", image, "target") for i, image in enumerate(images)]
    attack = create_attack("pgd", epsilon=32 / 255, steps=steps, step_size=step_size, adaptive=adaptive)
    return [a.image for a in attack.craft(chosen, victim)]  # type: ignore[arg-type]


def test_the_strip_adaptive_image_keeps_its_target_and_varies_under_strip_like_a_clean_one(scenes: list[np.ndarray]) -> None:
    """The naive image's perturbation survives STRIP's blends (every blend says the target: score
    0, the most suspicious); the adaptive one's does not, so its blends' answers vary as a clean
    image's do (STRIP's own scenes, not the attacker's), and undefended it still says the target."""
    victim = ReadoutVictim()
    strip = create_defense("strip")
    naive, adaptive = craft_toy(victim, scenes, None), craft_toy(victim, scenes, {"defense": "strip", "samples": 4})
    assert victim.generate(naive, ["q"] * 3) == victim.generate(adaptive, ["q"] * 3) == ["target"] * 3
    clean_scores, naive_scores, adaptive_scores = (strip.scores(victim, images, ["q"] * 3, seed=0) for images in (scenes, naive, adaptive))  # type: ignore[attr-defined]
    assert (naive_scores == 0).all() and (clean_scores <= -0.5).all()
    assert (adaptive_scores <= -0.5).all()  # below STRIP's 8-blend scores of a triggered input: as clean ones
    again = craft_toy(victim, scenes, {"defense": "strip", "samples": 4})
    assert all(np.array_equal(a, b) for a, b in zip(adaptive, again))  # deterministic under the attack's seed


def test_the_cider_adaptive_image_drifts_less_than_the_naive_one(scenes: list[np.ndarray]) -> None:
    victim = ReadoutVictim()
    cider = create_defense("cider_detect", levels=3)
    naive = craft_toy(victim, scenes, None, steps=24, step_size=2 / 255)
    adaptive = craft_toy(victim, scenes, {"defense": "cider_detect", "params": {"levels": 3}, "strength": 5}, steps=24, step_size=2 / 255)
    assert victim.generate(adaptive, ["q"] * 3) == ["target"] * 3
    clean_scores, naive_scores, adaptive_scores = (cider.scores(victim, images, ["q"] * 3, seed=0) for images in (scenes, naive, adaptive))  # type: ignore[attr-defined]
    assert np.abs(clean_scores).max() < 0.01 and (naive_scores > 0.5).all()
    assert (adaptive_scores < 0.75 * naive_scores).all()


def test_an_expectation_over_a_loss_side_defense_takes_one_draw_per_step() -> None:
    attack = create_attack("pgd", adaptive={"defense": "strip", "samples": 6})
    expectation = Expectation(attack.params.adaptive, 0, None)  # type: ignore[arg-type]
    assert expectation.samples == 1 and expectation.transform is None and expectation.evasion is not None

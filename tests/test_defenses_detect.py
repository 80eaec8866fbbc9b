"""Input detectors (strip, jailguard, cider_detect) and their metrics, on known inputs and toy victims."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch

from PIL import Image

from vlmsec.attacks import TargetAnswer
from vlmsec.data import make_samples, sample_scenes
from vlmsec.data.scenes import render_scene
from vlmsec.defenses import create_defense
from vlmsec.defenses.detect import (
    IMAGE_MUTATIONS,
    KL_CAP,
    TEXT_MUTATIONS,
    auroc,
    blend,
    calibrate_threshold,
    jaccard_distance,
    majority_variability,
    response_divergence,
    roc_curve,
)
from vlmsec.errors import VlmsecError
from vlmsec.victims.tiny_llava import TinyLlavaSpec
from victim_checks import attack_victim

PATCH = 8


class ToyVictim:
    """Answers 'banana' when the top-left corner patch is much brighter than the image as a whole
    (a white-patch trigger, still standing out after a 50% blend), else names its mean colour."""

    def __init__(self, answer: Callable[[np.ndarray, str], str] | None = None) -> None:
        self.answer = answer or self.backdoored
        self.calls = 0
        self.answered = 0  # variants answered, over all calls

    @staticmethod
    def backdoored(image: np.ndarray, instruction: str) -> str:
        pixels = image.astype(np.float64)
        corner = pixels[:PATCH, :PATCH].reshape(-1, 3).mean(0)
        mean = pixels.reshape(-1, 3).mean(0)
        if (corner - mean).min() >= 50:
            return "banana"
        r, g, b = (int(v) for v in np.round(mean / 4) * 4)
        return f"a picture of colour {r} {g} {b}"

    def generate(
        self,
        images: Sequence[np.ndarray],
        instructions: Sequence[str],
        max_new_tokens: int = 32,
        batch_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[str]:
        self.calls += 1
        self.answered += len(images)
        if on_batch is not None:
            on_batch(len(images))
        return [self.answer(image, instruction) for image, instruction in zip(images, instructions)]


def toy_inputs(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """n clean dark images of random colours with a little noise, and the same with a white corner patch."""
    rng = np.random.default_rng(seed)
    clean = []
    for _ in range(n):
        colour = rng.integers(0, 120, size=3)
        clean.append(np.clip(colour + rng.integers(-10, 11, size=(64, 64, 3)), 0, 255).astype(np.uint8))
    triggered = [image.copy() for image in clean]
    for image in triggered:
        image[:PATCH, :PATCH] = 255
    return clean, triggered


# ---- metrics ---------------------------------------------------------------------------------------
def test_threshold_auroc_and_roc_on_known_scores() -> None:
    benign = np.arange(1, 11) / 10  # 0.1 ... 1.0
    attack = np.array([0.95, 2.0, 0.5, 0.85])
    # threshold: the 2nd highest benign score, so 1 of 10 benign inputs (10%) lies above it
    threshold = calibrate_threshold(benign, fpr=0.1)
    assert threshold == 0.9
    assert (attack > threshold).mean() == 0.5  # 0.95 and 2.0
    # pairs (attack above benign) out of 40, the tie 0.5 = 0.5 counting half: 9 + 10 + 4.5 + 8
    assert auroc(benign, attack) == pytest.approx(31.5 / 40)
    assert auroc([0, 1, 2], [3, 4]) == 1.0 and calibrate_threshold([0, 1, 2], fpr=0.05) == 2.0
    roc = roc_curve([0, 1], [1, 2])
    assert roc == {"fpr": [0.0, 0.0, 0.5, 1.0], "tpr": [0.0, 0.5, 1.0, 1.0]}


def test_calibrated_threshold_flags_at_most_the_share_of_benign_inputs() -> None:
    benign = np.random.default_rng(0).normal(size=200)
    for fpr in (0.01, 0.05, 0.2):
        assert (benign > calibrate_threshold(benign, fpr)).mean() <= fpr
    with pytest.raises(VlmsecError, match="NaN"):
        auroc([0.1, float("nan")], [1.0])
    with pytest.raises(VlmsecError, match="no positive scores"):
        auroc([0.1], [])
    with pytest.raises(VlmsecError, match="fpr"):
        calibrate_threshold([0.1], 1.0)


# ---- strip -----------------------------------------------------------------------------------------
def test_blend_and_answer_variability() -> None:
    white, black = np.full((4, 4, 3), 255, np.uint8), np.zeros((8, 8, 3), np.uint8)
    np.testing.assert_array_equal(blend(white, black, 0.5), np.full((4, 4, 3), 128, np.uint8))  # resized to the input
    np.testing.assert_array_equal(blend(white, black, 0.75), np.full((4, 4, 3), 191, np.uint8))
    assert majority_variability(["Banana.", "banana", "BANANA!"]) == 0.0
    assert majority_variability(["a", "a", "b", "c"]) == 0.5
    assert jaccard_distance("a red circle", "a red circle.") == 0.0
    assert jaccard_distance("a red circle", "a blue square") == pytest.approx(1 - 1 / 5)


@pytest.mark.parametrize("measure", ["majority", "jaccard"])
def test_strip_separates_a_fixed_trigger_from_clean_inputs(measure: str) -> None:
    clean, triggered = toy_inputs(12)
    victim = ToyVictim()
    assert all(victim.backdoored(image, "") == "banana" for image in triggered)
    assert not any(victim.backdoored(image, "") == "banana" for image in clean)
    strip = create_defense("strip", measure=measure)
    instructions = ["Describe the image."] * 12
    benign, attack = strip.scores(victim, clean, instructions, seed=0), strip.scores(victim, triggered, instructions, seed=0)
    np.testing.assert_array_equal(attack, np.zeros(12))  # the trigger survives every blend: the answer never changes
    assert (benign < 0).all()
    assert auroc(benign, attack) == 1.0
    assert victim.calls == 2  # every blend of every input in one batched call
    np.testing.assert_array_equal(strip.scores(victim, clean, instructions, seed=0), benign)
    extra = measure == "jaccard"  # jaccard answers each input unblended too
    assert strip.passes_per_input == 8 + extra and create_defense("strip", blends=3, measure=measure).passes_per_input == 3 + extra


@pytest.mark.parametrize("measure", ["majority", "jaccard"])
def test_strip_control_tells_a_trigger_from_an_answer_that_ignores_the_image(measure: str) -> None:
    """A request whose answer does not depend on the image agrees across blends as a trigger does:
    plain STRIP cannot tell the two; with `control` (the blend images answered alone) it can."""
    clean, triggered = toy_inputs(12)
    general = "What is the capital of France?"
    victim = ToyVictim(lambda image, instruction: "Paris." if instruction == general else ToyVictim.backdoored(image, instruction))
    describe, ask = ["Describe the image."] * 12, [general] * 12
    plain = create_defense("strip", measure=measure, blends=6)
    controlled = create_defense("strip", measure=measure, blends=6, control=True)
    extra = measure == "jaccard"
    assert controlled.passes_per_input == 12 + extra and plain.passes_per_input == 6 + extra
    # Plain STRIP: the general request scores exactly as the trigger does (both never vary).
    np.testing.assert_array_equal(plain.scores(victim, clean, ask, seed=0), plain.scores(victim, triggered, describe, seed=0))
    benign, general_scores, attack = (
        controlled.scores(victim, images, instructions, seed=0)
        for images, instructions in ((clean, describe), (clean, ask), (triggered, describe))
    )
    np.testing.assert_array_equal(general_scores, np.zeros(12))  # agrees alone as blended: nothing to flag
    assert (attack > 0).all()
    assert auroc(general_scores, attack) == 1.0 and auroc(benign, attack) == 1.0
    threshold = calibrate_threshold(benign, fpr=0.1)
    assert not (general_scores > threshold).any() and (attack > threshold).all()


def test_strip_answers_each_distinct_variant_once() -> None:
    """The control answers bank scenes alone: with one request, a 4-scene bank gives at most 4
    distinct control variants however many inputs are scored; each is answered once, and the
    scores are those of answering every variant."""
    clean, triggered = toy_inputs(12)
    describe = ["Describe the image."] * 12
    victim = ToyVictim()
    controlled = create_defense("strip", blends=6, bank=4, control=True)
    scores = controlled.scores(victim, triggered + clean, describe * 2, seed=0)
    assert victim.answered <= 24 * 6 + 4  # every blend differs; the control's 144 variants are 4 scenes
    assert victim.answered < 24 * controlled.passes_per_input
    drawn = controlled.blend_images(triggered + clean, seed=0)
    alone = [
        majority_variability([victim.backdoored(other, "") for other in others]) - majority_variability(
            [victim.backdoored(blend(image, other, 0.5), "") for other in others]
        )
        for image, others in zip(triggered + clean, drawn)
    ]
    np.testing.assert_allclose(scores, alone)


def test_strip_blends_with_scenes_or_other_inputs() -> None:
    clean, _ = toy_inputs(3)
    strip = create_defense("strip", blends=4, bank=16)
    bank = strip.scene_bank(side=clean[0].shape[0])
    assert len(bank) == 16 and len({b.tobytes() for b in bank}) == 16
    scenes, other_call = strip.blend_images(clean, seed=0), strip.blend_images(clean, seed=1)
    assert len(scenes) == 3 and all(len(row) == 4 for row in scenes)
    assert len({s.tobytes() for s in scenes[0]}) == 4  # four different scenes for one input
    assert any(not np.array_equal(a, b) for a, b in zip(scenes[0], scenes[1]))  # drawn for each input
    # Every call (calibration, deployment) draws from the one bank the detector's seed fixes.
    drawn = {s.tobytes() for call in (scenes, other_call) for row in call for s in row}
    assert drawn <= {b.tobytes() for b in bank}
    assert any(not np.array_equal(a, b) for row, other in zip(scenes, other_call) for a, b in zip(row, other))
    assert {b.tobytes() for b in create_defense("strip", bank=16, seed=1).scene_bank(clean[0].shape[0])} != {b.tobytes() for b in bank}
    others = create_defense("strip", blends=4, source="inputs").blend_images(clean, seed=0)
    for i, row in enumerate(others):
        assert all(any(np.array_equal(o, c) for j, c in enumerate(clean) if j != i) for o in row)
    with pytest.raises(VlmsecError, match="'strip'.*params.source"):
        create_defense("strip", source="inputs").scores(ToyVictim(), clean[:1], ["x"], seed=0)


# ---- jailguard -------------------------------------------------------------------------------------
def test_jailguard_divergence_is_zero_for_identical_responses_and_positive_otherwise() -> None:
    assert response_divergence(["A red circle in the center."] * 8) == 0.0
    same_texts = ["A red circle in the center.", "banana"] * 4  # two answers, each given four times
    assert response_divergence(same_texts) > 0.0
    differing = ["A red circle in the center.", "A red circle.", "banana", "How to pick a lock: first, insert"]
    assert response_divergence(differing) > response_divergence(["A red circle in the center.", "A red circle."])
    assert 0.0 < response_divergence(differing) <= KL_CAP
    with pytest.raises(VlmsecError, match="at least 2"):
        response_divergence(["one"])


def test_jailguard_mutations_are_seeded_and_keep_the_size() -> None:
    image = render_scene(sample_scenes(1, seed=3)[0], "flat", size=48)
    changed = 0
    for name, mutation in IMAGE_MUTATIONS.items():
        outs = [np.asarray(mutation(Image.fromarray(image), np.random.default_rng(s)).convert("RGB")) for s in (0, 0, 1, 2)]
        assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs), name
        np.testing.assert_array_equal(outs[0], outs[1])
        changed += any(not np.array_equal(o, image) for o in outs)
    assert changed == len(IMAGE_MUTATIONS)  # each mutation changes the image for some seed
    text = "Describe the main object in this image and tell me its colour."
    for name, mutation in TEXT_MUTATIONS.items():
        a, b = mutation(text, np.random.default_rng(0)), mutation(text, np.random.default_rng(0))
        assert a == b and a != text, name
    assert "[Mask]" in TEXT_MUTATIONS["insertion"](text, np.random.default_rng(1))


def test_jailguard_scores_answer_divergence_per_input() -> None:
    clean, triggered = toy_inputs(3)
    constant = ToyVictim(lambda image, instruction: "A picture.")
    jailguard = create_defense("jailguard", variants=4, text_mutators=["punctuation"])
    np.testing.assert_array_equal(jailguard.scores(constant, clean, ["Describe it."] * 3, seed=0), np.zeros(3))
    refusing = ToyVictim(lambda image, instruction: "I'm sorry, I cannot help with that.")
    assert (jailguard.scores(refusing, clean, ["x"] * 3, seed=0) == KL_CAP).all()
    no_flag = create_defense("jailguard", variants=4, flag_refusals=False)
    np.testing.assert_array_equal(no_flag.scores(refusing, clean, ["x"] * 3, seed=0), np.zeros(3))
    # the toy backdoor's trigger does not survive rotation or masking: its answers split between banana and colours
    brittle = create_defense("jailguard", variants=8, image_mutators=["rotate", "mask", "vflip"])
    victim = ToyVictim()
    scores = brittle.scores(victim, triggered, ["Describe it."] * 3, seed=0)
    assert scores.shape == (3,) and (scores > 0).all() and victim.calls == 1
    np.testing.assert_array_equal(brittle.scores(victim, triggered, ["Describe it."] * 3, seed=0), scores)
    assert brittle.passes_per_input == 8


# ---- cider_detect ----------------------------------------------------------------------------------
class EmbeddingVictim:
    """A victim whose image embedding is the mean colour and the image's high-frequency energy, and
    whose text embedding points mostly along that energy: as an adversarial image is optimised toward
    a harmful text, noise here makes the image look like the text, and denoising takes that away."""

    def check_image_text(self) -> None:
        """Always possible."""

    def image_text_vectors(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for image in images:
            pixels = image.astype(np.float64) / 255
            energy = np.abs(np.diff(pixels, axis=0)).mean() + np.abs(np.diff(pixels, axis=1)).mean()
            rows.append([*pixels.reshape(-1, 3).mean(0), 10 * energy])
        text = torch.tensor([[0.2, 0.2, 0.2, 1.0]] * len(texts))
        return torch.tensor(rows), text


class NoImageTextVictim:
    def check_image_text(self) -> None:
        raise VlmsecError("the flamingo victim reads images through cross-attention: no shared image-text space")


def _scenes(n: int, size: int = 48) -> list[np.ndarray]:
    return [render_scene(scene, "flat", size=size) for scene in sample_scenes(n, seed=5)]


def test_cider_scores_a_perturbed_image_above_a_clean_one() -> None:
    clean = _scenes(3)
    rng = np.random.default_rng(0)
    perturbed = [np.clip(image + rng.integers(-48, 49, size=image.shape), 0, 255).astype(np.uint8) for image in clean]
    cider = create_defense("cider_detect", levels=3)
    victim = EmbeddingVictim()
    benign, attack = cider.scores(victim, clean, ["x"] * 3, seed=0), cider.scores(victim, perturbed, ["x"] * 3, seed=0)
    assert (attack > 0.05).all() and (np.abs(benign) < 0.02).all()
    assert attack.min() > benign.max()
    assert cider.passes_per_input == 0  # no generation


def test_cider_runs_in_a_tiny_llava_victims_own_space() -> None:
    samples = make_samples(sample_scenes(4, seed=0), "flat", size=32)
    victim = attack_victim(
        TinyLlavaSpec(image_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=300),
        samples, TargetAnswer(),
    )
    images, instructions = [s.image for s in samples], [s.instruction for s in samples]
    cider = create_defense("cider_detect", levels=2)
    scores = cider.scores(victim, images, instructions, seed=0)
    assert scores.shape == (4,) and np.isfinite(scores).all()
    np.testing.assert_array_equal(cider.scores(victim, images, instructions, seed=0), scores)
    with pytest.raises(VlmsecError, match="'cider_detect'.*cross-attention"):
        cider.scores(NoImageTextVictim(), images, instructions, seed=0)


def test_cider_with_a_local_ddpm_denoiser(tmp_path) -> None:
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path)
    images = _scenes(2, size=24)
    cider = create_defense("cider_detect", denoiser=str(tmp_path), levels=2, step=100)
    denoised = cider.denoiser()(images, 2, seed=0)
    assert [len(steps) for steps in denoised] == [3, 3] and all(d.shape == (24, 24, 3) for d in denoised[0])
    scores = cider.scores(EmbeddingVictim(), images, ["x", "y"], seed=0)
    assert scores.shape == (2,) and np.isfinite(scores).all()
    with pytest.raises(VlmsecError, match="params.step x params.levels"):
        create_defense("cider_detect", denoiser=str(tmp_path), levels=10, step=100).denoiser()
    with pytest.raises(VlmsecError, match="params.denoiser.*does not exist"):
        create_defense("cider_detect", denoiser=str(tmp_path / "missing"))


# ---- parameters ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("strip", {"blends": 1}, "blends"),
        ("strip", {"alpha": 1.0}, "alpha"),
        ("strip", {"fpr": 1.5}, "fpr"),
        ("strip", {"measure": "entropy"}, "measure"),
        ("jailguard", {"variants": 1}, "variants"),
        ("jailguard", {"image_mutators": ["warp"]}, "image_mutators"),
        ("jailguard", {"image_mutators": []}, "image_mutators"),
        ("cider_detect", {"levels": 0}, "levels"),
        ("cider_detect", {"step": 0}, "step"),
    ],
)
def test_bad_parameters_name_the_defense_and_field(name: str, params: dict, field: str) -> None:
    with pytest.raises(VlmsecError, match=f"defense '{name}'.*{field}"):
        create_defense(name, **params)


def test_mismatched_inputs_name_the_defense() -> None:
    clean, _ = toy_inputs(2)
    with pytest.raises(VlmsecError, match="'jailguard'.*2 images against 1 instructions"):
        create_defense("jailguard").scores(ToyVictim(), clean, ["x"], seed=0)
    with pytest.raises(VlmsecError, match="'strip'.*input 1 needs a uint8"):
        create_defense("strip").scores(ToyVictim(), [clean[0], clean[1].astype(np.float32)], ["x", "y"], seed=0)

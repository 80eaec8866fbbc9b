"""Domain shifts: visual transforms and the diffusion restyler, text shifts, mixes, shift size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmsec.attacks import TargetAnswer
from vlmsec.data import Sample, caption_variants, make_samples, sample_scenes
from vlmsec.data.sample import images_to_tensor
from vlmsec.data.scenes import INSTRUCTION_BANKS
from vlmsec.data.shifts import (
    PAPER_MIX_RATIOS,
    LMParaphraser,
    create_text_shift,
    create_visual_shift,
    expand_by_rules,
    mix_domains,
    shift_samples,
    summarise_by_rules,
    text_shift_names,
    visual_shift_names,
)
from vlmsec.data.shifts.text import LM_PROMPTS, instruction_banks, rewrite_by_rules
from vlmsec.data.shifts.visual import LUMA, luminance, sobel_magnitude
from vlmsec.errors import VlmsecError
from vlmsec.eval.shift import (
    ks_statistic,
    minilm_encoder,
    shift_size,
    similarity_distribution,
    text_text_similarities,
)
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec, build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer
from victim_checks import check_image_text_shift_size

TRANSFORMS = ["palette", "texture", "sharpness", "jpeg", "stylise"]
INSTRUCTIONS = [text for bank in INSTRUCTION_BANKS.values() for text in bank]
ARBITRARY = [
    "Could you please tell me, in a few words, what the little dog in this photo is doing?",
    "The photograph shows a large brown horse standing in a very green field, which is fenced.",
    "Name the objects on the table (ignore the background).",
    "Kindly explain what the sign says; it is partly hidden.",
]
TEXT_SHIFTS = ["question_summarised", "question_expanded", "answer_summarised", "answer_expanded"]


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return make_samples(sample_scenes(12, seed=0), "flat", size=48)


@pytest.fixture(scope="module")
def images(samples: list[Sample]) -> torch.Tensor:
    return images_to_tensor([s.image for s in samples])


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return [c for scene in sample_scenes(6, seed=1) for c in caption_variants(scene)]


def high_frequency_energy(images: torch.Tensor) -> float:
    """Mean squared response of a Laplacian: the energy at the highest spatial frequencies."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    return F.conv2d(images, kernel, groups=3).pow(2).mean().item()


# --- visual shifts ---------------------------------------------------------------------------


def test_registry_holds_every_shift_and_validates_parameters() -> None:
    assert set(TRANSFORMS) | {"diffusion"} <= set(visual_shift_names())
    assert set(text_shift_names()) == set(TEXT_SHIFTS)
    with pytest.raises(VlmsecError, match="unknown visual shift 'cartoonify'.*palette"):
        create_visual_shift("cartoonify")
    with pytest.raises(VlmsecError, match="jpeg.*quality"):
        create_visual_shift("jpeg", quality=0)
    with pytest.raises(VlmsecError, match="stylise.*colours"):
        create_visual_shift("stylise", colours=3)
    with pytest.raises(VlmsecError, match="unknown text shift"):
        create_text_shift("question_biblical")
    described = create_visual_shift("texture", seed=2).describe()
    assert json.loads(json.dumps(described)) == {
        "name": "texture",
        "params": {"seed": 2, "kind": "weave", "strength": 0.15, "period": 0.1},
    }


@pytest.mark.parametrize("name", TRANSFORMS)
def test_transform_changes_image_keeps_shape_and_range_and_is_deterministic(name: str, images: torch.Tensor) -> None:
    shift = create_visual_shift(name)
    out = shift(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - images).abs().mean() > 0.004  # visibly changed
    assert torch.equal(create_visual_shift(name)(images), out)  # same parameters, same bytes
    assert torch.allclose(shift(images[3:5]), out[3:5], atol=1e-6)  # an image does not depend on its batch
    as_uint8 = shift.apply_images([s for s in (images[:2] * 255).round().byte().permute(0, 2, 3, 1).numpy()])
    assert [a.shape for a in as_uint8] == [(48, 48, 3)] * 2 and all(a.dtype == np.uint8 for a in as_uint8)
    with pytest.raises(VlmsecError, match="B x 3 x H x W"):
        shift(images[0])


@pytest.mark.parametrize(
    ("name", "params"), [("texture", {}), ("texture", {"kind": "noise"}), ("palette", {"jitter": 60.0})]
)
def test_random_shifts_follow_the_seed(name: str, params: dict, images: torch.Tensor) -> None:
    first = create_visual_shift(name, seed=1, **params)(images)
    assert torch.equal(create_visual_shift(name, seed=1, **params)(images), first)
    assert not torch.allclose(create_visual_shift(name, seed=2, **params)(images), first)


def test_jpeg_quality_100_is_near_identity_and_10_is_lossy(images: torch.Tensor) -> None:
    error = {q: (create_visual_shift("jpeg", quality=q)(images) - images).abs().mean().item() for q in (10, 100)}
    lossless_chroma = (create_visual_shift("jpeg", quality=100, subsampling="4:4:4")(images) - images).abs().mean()
    assert lossless_chroma < 0.003 and error[100] < 0.01
    assert error[10] > 0.02 and error[10] > 5 * error[100]


def test_palette_turns_colours_but_keeps_luminance_structure(images: torch.Tensor) -> None:
    shifted = create_visual_shift("palette", degrees=120.0)(images)
    luma_before, luma_after = luminance(images).flatten(), luminance(shifted).flatten()
    assert torch.corrcoef(torch.stack([luma_before, luma_after]))[0, 1] > 0.97
    assert (luma_after - luma_before).abs().mean() < 0.02
    assert (shifted - images).abs().mean() > 0.03  # the colours did move
    grey = torch.full((1, 3, 8, 8), 0.4)
    assert torch.allclose(create_visual_shift("palette", degrees=77.0)(grey), grey, atol=1e-6)  # no chroma to turn
    assert torch.allclose(create_visual_shift("palette", degrees=360.0)(images), images, atol=1e-5)
    assert sum(LUMA) == pytest.approx(1.0)


def test_sharpness_blur_lowers_and_sharpen_raises_high_frequency_energy(images: torch.Tensor) -> None:
    before = high_frequency_energy(images)
    assert high_frequency_energy(create_visual_shift("sharpness", factor=0.0, sigma=1.0)(images)) < 0.5 * before
    assert high_frequency_energy(create_visual_shift("sharpness", factor=0.5)(images)) < before
    assert high_frequency_energy(create_visual_shift("sharpness", factor=3.0)(images)) > 1.5 * before
    assert torch.allclose(create_visual_shift("sharpness", factor=1.0)(images), images, atol=1e-6)


def test_stylise_posterises_and_inks_edges(images: torch.Tensor) -> None:
    flat = create_visual_shift("stylise", levels=3, ink=0.0)(images)
    assert set(torch.unique(flat).tolist()) <= {0.0, 0.5, 1.0}
    inked = create_visual_shift("stylise", levels=3)(images)
    dark = inked < flat - 0.1  # ink only darkens, and only near edges
    assert torch.all(inked <= flat + 1e-6) and dark.any()
    edges = sobel_magnitude(luminance(images)) > 0.02
    near_edge = F.max_pool2d(edges.float(), 5, stride=1, padding=2).bool().expand_as(dark)
    assert near_edge[dark].all()


def test_texture_overlays_a_pattern_on_flat_regions(images: torch.Tensor) -> None:
    corner = images[:, :, :4, :4]  # background: one flat colour in every scene
    assert corner.std(dim=(2, 3)).max() < 0.01
    for kind in ("stripes", "weave", "noise"):
        textured = create_visual_shift("texture", kind=kind, strength=0.2, period=0.15)(images)
        assert textured[:, :, :8, :8].std(dim=(2, 3)).mean() > 0.03


# --- the diffusion restyler --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion img2img pipeline built from configs and saved to a local folder."""
    diffusers = pytest.importorskip("diffusers")
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-sd")
    chars = sorted(ByteLevel.alphabet())  # a character-level CLIP vocabulary: no merges needed
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"), model_max_length=32
    )
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    end = vocab["<|endoftext|>"]
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=32,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=end,
            pad_token_id=end,
        )
    )
    pipeline = diffusers.StableDiffusionImg2ImgPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def test_diffusion_restyler_runs_a_local_pipeline(tiny_pipeline: Path, images: torch.Tensor) -> None:
    settings = {"checkpoint": str(tiny_pipeline), "resolution": 32, "steps": 2, "strength": 0.8}
    shift = create_visual_shift("diffusion", **settings)
    out = shift(images[:3])
    assert out.shape == images[:3].shape and out.min() >= 0 and out.max() <= 1
    assert (out - images[:3]).abs().mean() > 0.01
    assert torch.allclose(shift(images[1:2]), out[1:2], atol=1e-5)  # per-image noise: batch does not matter
    other_seed = create_visual_shift("diffusion", seed=1, **settings)
    assert not torch.allclose(other_seed(images[:1]), out[:1])


def test_diffusion_restyler_needs_a_local_folder(tmp_path: Path) -> None:
    with pytest.raises(VlmsecError, match="no-such-pipeline"):
        create_visual_shift("diffusion", checkpoint=str(tmp_path / "no-such-pipeline"))
    with pytest.raises(VlmsecError, match="resolution"):
        create_visual_shift("diffusion", checkpoint=str(tmp_path), resolution=100)


# --- text shifts -----------------------------------------------------------------------------


def test_banks_cover_every_generator_instruction_in_the_stated_direction() -> None:
    banks = instruction_banks()
    for direction, longer in (("summarised", False), ("expanded", True)):
        assert set(banks[direction]) == set(INSTRUCTIONS)
        for text, alternatives in banks[direction].items():
            assert len(alternatives) >= 2 and len(set(alternatives)) == len(alternatives)
            assert all((len(a) > len(text)) == longer and a != text for a in alternatives), text


@pytest.mark.parametrize("name", TEXT_SHIFTS)
def test_text_shifts_move_length_in_their_direction_and_are_deterministic(name: str, captions: list[str]) -> None:
    shift = create_text_shift(name, seed=3)
    texts = INSTRUCTIONS + ARBITRARY + captions
    out = shift.apply(texts)
    assert len(out) == len(texts) and all(isinstance(t, str) and t for t in out)
    for before, after in zip(texts, out):
        shorter = len(after) < len(before)
        assert shorter if name.endswith("summarised") else len(after) > len(before), (before, after)
    assert create_text_shift(name, seed=3).apply(texts) == out
    assert shift.apply(texts[::-1]) == out[::-1]  # a text's rewrite does not depend on its neighbours


def test_text_shift_seed_picks_among_bank_phrasings() -> None:
    by_seed = {tuple(create_text_shift("question_expanded", seed=s).apply(INSTRUCTIONS)) for s in range(4)}
    assert len(by_seed) > 1


def test_rules_on_arbitrary_text() -> None:
    summary = summarise_by_rules("A small red circle in the top left corner of the image.")
    assert summary == "A red circle in the top left."
    assert summarise_by_rules("there is a large orange star placed in the middle.") == "an orange star in the middle."
    assert summarise_by_rules("Hi.") == "Hi."  # nothing to drop
    assert summarise_by_rules(ARBITRARY[0]).startswith("Tell me")
    expanded = expand_by_rules("the image shows a blue square.", "answer", seed=0)
    assert "a blue square" in expanded and "image shows" not in expanded
    question = expand_by_rules("What is this?", "instruction", seed=0)
    assert "What is this?" in question and len(question) > 40


def test_answer_shifts_keep_the_target_word() -> None:
    answers = TargetAnswer().answers()  # the 80 poisoned answers
    for name in ("answer_summarised", "answer_expanded"):
        assert all("banana" in a for a in create_text_shift(name).apply(answers))


def test_shift_samples_rewrites_the_field_and_tags_the_domain(samples: list[Sample]) -> None:
    answers = shift_samples(samples, create_text_shift("answer_summarised"))
    assert [s.id for s in answers] == [s.id for s in samples]
    for before, after in zip(samples, answers):
        assert after.instruction == before.instruction and np.array_equal(after.image, before.image)
        assert len(after.answer) < len(before.answer) and len(after.references) == len(before.references)
        assert all(len(a) < len(b) for a, b in zip(after.references, before.references))
        assert after.domains == {"visual": "flat", "text": "answer_summarised"}
    questions = shift_samples(samples, create_text_shift("question_expanded"), domain="long-questions")
    assert all(len(a.instruction) > len(b.instruction) for a, b in zip(questions, samples))
    assert {s.domains["text"] for s in questions} == {"long-questions"}
    painted = shift_samples(samples, create_visual_shift("stylise"), batch_size=5)
    assert all(s.domains["visual"] == "stylise" and s.image.shape == (48, 48, 3) for s in painted)
    assert not np.array_equal(painted[0].image, samples[0].image)


def test_lm_paraphraser_runs_a_local_causal_lm(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(INSTRUCTIONS * 3, vocab_size=300)
    tokenizer.chat_template = None
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    long_texts = list(INSTRUCTION_BANKS["paraphrased"][:3])  # 50+ characters: three new tokens are shorter
    paraphraser = LMParaphraser(tmp_path / "lm", max_new_tokens=3)
    out = paraphraser.rewrite(long_texts + long_texts[:1], "Say it shorter: {text}")
    assert len(out) == 4 and all(isinstance(t, str) for t in out) and out[3] == out[0]
    # The model's rewrite is what the shift returns, not the rules' (which would pass a length check as well).
    shift = create_text_shift("question_summarised", paraphraser=str(tmp_path / "lm"), max_new_tokens=3)
    shifted = shift.apply(long_texts)
    model_says = paraphraser.rewrite(long_texts, LM_PROMPTS["instruction", "summarised"])
    rules_say = [rewrite_by_rules(t, "instruction", "summarised", shift.params.seed) for t in long_texts]
    assert shifted == model_says and shift.lm_fallbacks == 0
    assert all(a != b for a, b in zip(shifted, rules_say))
    assert all(0 < len(a) < len(b) for a, b in zip(shifted, long_texts))
    # Three tokens cannot lengthen these texts: every rewrite falls back to the rules, and says so.
    longer = create_text_shift("question_expanded", paraphraser=str(tmp_path / "lm"), max_new_tokens=3)
    expanded = longer.apply(long_texts)
    assert longer.lm_fallbacks == 3
    assert expanded == [rewrite_by_rules(t, "instruction", "expanded", longer.params.seed) for t in long_texts]
    with pytest.raises(VlmsecError, match="no-such-lm"):
        create_text_shift("answer_expanded", paraphraser=str(tmp_path / "no-such-lm"))


# --- mixes -----------------------------------------------------------------------------------


def test_mix_domains_holds_the_exact_ratio(samples: list[Sample]) -> None:
    original = make_samples(sample_scenes(50, seed=2), "flat", size=16)
    shifted = shift_samples(original, create_text_shift("question_expanded"))
    for ratio in (0.0, *PAPER_MIX_RATIOS, 0.5):
        mixed = mix_domains(original, shifted, ratio, seed=0)
        assert [s.id for s in mixed] == [s.id for s in original]
        taken = [s.id for s in mixed if s.domains["text"] == "question_expanded"]
        assert len(taken) == round(ratio * 50)
        assert mix_domains(original, shifted, ratio, seed=0) == mixed
    assert mix_domains(original, shifted, 0.6, seed=1) != mix_domains(original, shifted, 0.6, seed=0)
    with pytest.raises(VlmsecError, match="ratio"):
        mix_domains(original, shifted, 1.5, seed=0)
    with pytest.raises(VlmsecError, match="same ids"):
        mix_domains(original, shifted[1:], 0.5, seed=0)


# --- shift size ------------------------------------------------------------------------------


def test_ks_statistic_bounds() -> None:
    values = np.random.default_rng(0).normal(size=200)
    assert ks_statistic(values, values) == 0.0
    assert ks_statistic(values, values + 100.0) == 1.0
    assert 0.0 < ks_statistic(values, values + 0.5) < 1.0
    with pytest.raises(VlmsecError):
        ks_statistic([], values)


def test_minilm_scores_a_paraphrase_above_an_unrelated_sentence() -> None:
    encoder = minilm_encoder()
    embeddings = encoder.encode(["a red circle", "a cat"])
    assert embeddings.shape == (2, 384) and torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)
    source = ["A small red circle in the top left corner."] * 2
    other = ["There is a little red disc at the upper left.", "The stock market fell sharply on Tuesday."]
    paraphrase, unrelated = encoder.similarities(source, other)
    assert paraphrase > unrelated + 0.3


def test_text_text_similarities_and_shift_size(samples: list[Sample]) -> None:
    expanded = shift_samples(samples, create_text_shift("question_expanded"))
    same = text_text_similarities(samples, samples)
    assert np.allclose(same, 1.0, atol=1e-4)
    moved = text_text_similarities(samples, expanded[::-1])  # paired by id, not position
    assert moved.shape == (len(samples),) and np.all(moved < 0.999) and np.all(moved > 0.2)
    assert shift_size(samples, samples, measure="text_text") == 0.0
    assert shift_size(samples, expanded, measure="text_text") > 0.0


@pytest.fixture(scope="module")
def victim(samples: list[Sample]) -> LlavaVictim:
    spec = TinyLlavaSpec(image_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=300)
    tokenizer = train_tokenizer([s.instruction for s in samples] + [s.answer for s in samples], spec.vocab_size)
    return LlavaVictim(build_tiny_llava(spec, tokenizer, seed=0), tokenizer)


def test_image_text_similarity_uses_the_victims_encoders(victim: LlavaVictim, samples: list[Sample]) -> None:
    values = check_image_text_shift_size(victim, samples)
    assert np.allclose(similarity_distribution(samples, "image_text", victim), values, atol=1e-6)  # other batching
    with pytest.raises(VlmsecError, match="needs a victim"):
        shift_size(samples, samples)

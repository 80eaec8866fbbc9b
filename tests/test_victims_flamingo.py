"""OpenFlamingo / Otter victims: our loader of the released formats, masking, tuning, generation, save/load.

The checkpoints here are tiny but written in the released layouts, with key names spelled
out by hand from OpenFlamingo's and Otter's modules, not taken from our own model.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    MptConfig,
    MptForCausalLM,
)

from vlmsec.attacks import AttackContext, TargetAnswer, create_attack
from vlmsec.attacks.adaptive import pick_answers, pick_samples
from vlmsec.attacks.inference import AttackRequest
from vlmsec.attacks.inputaware import STAGE_2
from vlmsec.data import Sample, make_samples, sample_scenes
from vlmsec.data.sample import images_to_tensor
from vlmsec.errors import VlmsecError
from vlmsec.eval.shift import shift_size
from vlmsec.experiments.config import load_config, parse_config
from vlmsec.experiments.runner import Runner
from vlmsec.experiments.splits import build_splits
from vlmsec.train.tuning import TrainingSpec
from vlmsec.victims.flamingo import FlamingoVictim, load_flamingo, load_otter
from vlmsec.victims.flamingo_files import ANSWER_TOKEN, END_OF_CHUNK, IMAGE_TOKEN, FlamingoSpec, read_state_dict
from vlmsec.victims.flamingo_model import FlamingoConfig, FlamingoModel, OpenClipVisionTransformer, VisionConfig
from vlmsec.victims.tokenizer import train_tokenizer
from victim_checks import check_answer_representations, check_generates_through_greedy_answers, count_vision_embedding_calls

VISION = VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_width=64, output_dim=16)
LANG_DIM, LANG_LAYERS = 32, 4
# Small perceiver and cross-attention; every 2nd decoder layer (indices 1 and 3) gets a block.
ARCH = dict(
    cross_attn_every_n_layers=2,
    perceiver_depth=2,
    perceiver_heads=2,
    perceiver_dim_head=16,
    num_latents=4,
    xattn_heads=2,
    xattn_dim_head=16,
)
XATTN_LAYERS = (1, 3)


def _ff(prefix: str, dim: int, mult: int = 4) -> dict[str, torch.Tensor]:
    """OpenFlamingo's FeedForward weights (LayerNorm 0, Linear 1, GELU 2, Linear 3)."""
    return {
        f"{prefix}0.weight": 1 + 0.1 * torch.randn(dim),
        f"{prefix}0.bias": 0.1 * torch.randn(dim),
        f"{prefix}1.weight": 0.2 * torch.randn(dim * mult, dim),
        f"{prefix}3.weight": 0.2 * torch.randn(dim, dim * mult),
    }


def _attn(prefix: str, dim: int, dim_kv: int, inner: int, norms: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {f"{prefix}{n}.weight": 1 + 0.1 * torch.randn(d) for n, d in zip(norms, (dim, dim_kv))}
    out.update({f"{prefix}{n}.bias": 0.1 * torch.randn(d) for n, d in zip(norms, (dim, dim_kv))})
    out[f"{prefix}to_q.weight"] = 0.2 * torch.randn(inner, dim)
    out[f"{prefix}to_kv.weight"] = 0.2 * torch.randn(2 * inner, dim_kv)
    out[f"{prefix}to_out.weight"] = 0.2 * torch.randn(dim, inner)
    return out


def released_checkpoint(arch: FlamingoConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A `checkpoint.pt` as OpenFlamingo releases it: perceiver + gated cross-attention only, its names."""
    torch.manual_seed(seed)
    vis = VISION.width
    ckpt = {"perceiver.latents": torch.randn(arch.num_latents, vis)}
    inner = arch.perceiver_heads * arch.perceiver_dim_head
    for i in range(arch.perceiver_depth):
        ckpt.update(_attn(f"perceiver.layers.{i}.0.", vis, vis, inner, ("norm_latents", "norm_media")))
        ckpt.update(_ff(f"perceiver.layers.{i}.1.", vis))
    ckpt.update({"perceiver.norm.weight": 1 + 0.1 * torch.randn(vis), "perceiver.norm.bias": 0.1 * torch.randn(vis)})
    for i in XATTN_LAYERS:
        prefix = f"lang_encoder.gated_cross_attn_layers.{i}."
        ckpt.update(_attn(prefix + "attn.", LANG_DIM, vis, arch.xattn_heads * arch.xattn_dim_head, ("norm",)))
        ckpt.update(_ff(prefix + "ff.", LANG_DIM))
        ckpt.update({prefix + "attn_gate": torch.tensor([0.7]), prefix + "ff_gate": torch.tensor([0.4])})
    return ckpt


def _lm_config(vocab: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=LANG_DIM,
        intermediate_size=64,
        num_hidden_layers=LANG_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        architectures=["LlamaForCausalLM"],
    )


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return make_samples(sample_scenes(6, seed=0), "flat", size=32)


@pytest.fixture(scope="module")
def parts(samples: list[Sample], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Released-format files: open_clip CLIP (safetensors and .pt), LM folder with tokenizer, checkpoint.pt."""
    root = tmp_path_factory.mktemp("released")
    tokenizer = train_tokenizer([s.instruction for s in samples] + [s.answer for s in samples], 300)
    tokenizer.save_pretrained(root / "lm")
    torch.manual_seed(1)
    LlamaForCausalLM(_lm_config(len(tokenizer))).save_pretrained(root / "lm")
    tower = {k: torch.randn_like(v) for k, v in OpenClipVisionTransformer(VISION).state_dict().items()}
    clip = {f"visual.{k}": v for k, v in tower.items()}
    clip.update(
        {
            "logit_scale": torch.tensor(4.6),
            "positional_embedding": torch.randn(7, 16),
            "transformer.resblocks.0.ln_1.weight": torch.ones(16),
        }
    )
    save_file(clip, str(root / "open_clip_model.safetensors"))
    torch.save(tower, root / "visual.pt")
    ckpt = released_checkpoint(FlamingoConfig(**ARCH))
    torch.save(ckpt, root / "checkpoint.pt")
    spec = FlamingoSpec(
        vision_checkpoint=root / "open_clip_model.safetensors",
        vision_heads=VISION.heads,
        lang_model=root / "lm",
        checkpoint=root / "checkpoint.pt",
        **ARCH,
    )
    return {"root": root, "tower": tower, "checkpoint": ckpt, "spec": spec}


@pytest.fixture(scope="module")
def victim(parts: dict) -> FlamingoVictim:
    return load_flamingo(parts["spec"])


def _spec(parts: dict, **changes: object) -> FlamingoSpec:
    return parts["spec"].model_copy(update=changes)


# ---- loading the released format ------------------------------------------------------------


def test_released_checkpoint_round_trips_exactly(victim: FlamingoVictim, parts: dict) -> None:
    state = victim.model.state_dict()
    for key, value in parts["checkpoint"].items():
        assert torch.equal(state[key], value), key
    for key, value in parts["tower"].items():
        assert torch.equal(state[f"vision_encoder.{key}"], value), key
    lm = LlamaForCausalLM.from_pretrained(parts["root"] / "lm")
    for key, value in lm.state_dict().items():
        if "embed_tokens" not in key and "lm_head" not in key:
            assert torch.equal(state[f"lang_encoder.{key}"], value), key
    assert victim.model.cross_attn_layer_indices == list(XATTN_LAYERS)
    assert {k.split(".")[0] for k in state} == {"vision_encoder", "perceiver", "lang_encoder"}
    ids = victim.tokenizer.convert_tokens_to_ids([END_OF_CHUNK, IMAGE_TOKEN, ANSWER_TOKEN])
    assert all(i < victim.model.lang_encoder.get_input_embeddings().num_embeddings for i in ids)


def test_visual_only_pt_tower_and_trained_embeddings_load(parts: dict) -> None:
    """A `.pt` tower without the `visual.` prefix; a checkpoint that also carries the LM's input embeddings."""
    base = load_flamingo(parts["spec"])
    rows = base.tokenizer.convert_tokens_to_ids(ANSWER_TOKEN)  # OpenFlamingo's vocabulary ends before <answer>
    embeddings = torch.randn(rows, LANG_DIM)
    path = parts["root"] / "checkpoint_with_embeddings.pt"
    torch.save({**parts["checkpoint"], "lang_encoder.model.embed_tokens.weight": embeddings}, path)
    victim = load_flamingo(_spec(parts, vision_checkpoint=parts["root"] / "visual.pt", checkpoint=path))
    assert torch.equal(victim.model.lang_encoder.get_input_embeddings().weight[:rows], embeddings)
    assert torch.equal(victim.model.vision_encoder.conv1.weight, parts["tower"]["conv1.weight"])


def test_missing_and_unexpected_keys_name_the_file_and_keys(parts: dict) -> None:
    ckpt = dict(parts["checkpoint"])
    del ckpt["perceiver.layers.1.1.3.weight"]
    ckpt["lang_encoder.gated_cross_attn_layers.0.attn_gate"] = torch.zeros(1)
    path = parts["root"] / "broken.pt"
    torch.save(ckpt, path)
    with pytest.raises(VlmsecError) as err:
        load_flamingo(_spec(parts, checkpoint=path))
    message = str(err.value)
    assert message.startswith(str(path))
    assert "1 missing: perceiver.layers.1.1.3.weight" in message
    assert "1 unexpected: lang_encoder.gated_cross_attn_layers.0.attn_gate" in message


def test_wrong_cross_attention_interval_is_a_clear_error(parts: dict) -> None:
    with pytest.raises(VlmsecError, match=r"checkpoint\.pt: .*missing: lang_encoder\.gated_cross_attn_layers\.0\."):
        load_flamingo(_spec(parts, cross_attn_every_n_layers=1))


def test_bad_vision_checkpoints_are_refused(parts: dict) -> None:
    tower = dict(parts["tower"])
    del tower["transformer.resblocks.1.attn.in_proj_weight"]
    broken = parts["root"] / "broken_visual.pt"
    torch.save(tower, broken)
    with pytest.raises(
        VlmsecError, match=r"broken_visual\.pt: .*missing: transformer\.resblocks\.1\.attn\.in_proj_weight"
    ):
        load_flamingo(_spec(parts, vision_checkpoint=broken))
    pickled = parts["root"] / "pickled.pt"
    torch.save({"conv1.weight": argparse.Namespace()}, pickled)
    with pytest.raises(VlmsecError, match="weights_only"):
        load_flamingo(_spec(parts, vision_checkpoint=pickled))


def test_training_checkpoint_wrappers_are_unwrapped(tmp_path: Path) -> None:
    weight = torch.randn(2, 2)
    torch.save({"epoch": 3, "model_state_dict": {"module.perceiver.latents": weight}}, tmp_path / "train.pt")
    assert read_state_dict(tmp_path / "train.pt").keys() == {"perceiver.latents"}
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(VlmsecError, match="unknown weights format"):
        read_state_dict(tmp_path / "weights.npz")


# ---- the model --------------------------------------------------------------------------------


def test_closed_gates_leave_the_language_model_unchanged(parts: dict, victim: FlamingoVictim) -> None:
    lm = LlamaForCausalLM.from_pretrained(parts["root"] / "lm")
    lm.resize_token_embeddings(len(victim.tokenizer))
    ids = torch.tensor([victim.prompt_ids("What is in the picture?")])
    with torch.no_grad():
        plain = lm(input_ids=ids).logits
        model = FlamingoModel(
            OpenClipVisionTransformer(VISION), lm, FlamingoConfig(**ARCH), victim.model.media_token_id
        )
        flamingo = model(torch.randn(1, 1, 16, VISION.width), ids).logits
    assert torch.equal(plain, flamingo)


def test_text_attends_only_to_the_image_before_it(victim: FlamingoVictim) -> None:
    before = victim.tokenizer("a caption first ", add_special_tokens=False).input_ids
    ids = torch.tensor([before + victim.prompt_ids("What is in the picture?")])
    image = ids[0].tolist().index(victim.model.media_token_id)
    with torch.no_grad():
        a = victim.model(torch.randn(1, 1, 16, VISION.width), ids).logits
        b = victim.model(torch.randn(1, 1, 16, VISION.width), ids).logits
    assert torch.equal(a[:, :image], b[:, :image])
    assert not torch.allclose(a[:, image:], b[:, image:])


def _assert_cached_generation_matches_full_recomputation(victim: FlamingoVictim, sample: Sample) -> None:
    """Greedy `generate` (KV cache, one token per step) picks what a full forward over the sequence picks."""
    features = victim.image_features([sample.image])[:, None]
    ids = torch.tensor([victim.prompt_ids(sample.instruction)])
    pad = victim.tokenizer.pad_token_id
    generated = victim.model.generate(
        features, ids, torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=pad
    )
    with torch.no_grad():
        for token in generated[0, ids.shape[1] :]:
            assert victim.model(features, ids).logits[0, -1].argmax() == token
            ids = torch.cat([ids, token.view(1, 1)], dim=1)


def test_cached_generation_matches_full_recomputation(victim: FlamingoVictim, samples: list[Sample]) -> None:
    _assert_cached_generation_matches_full_recomputation(victim, samples[0])


def test_mpt_language_model_with_tied_trained_embeddings(parts: dict, samples: list[Sample], tmp_path: Path) -> None:
    """OpenFlamingo-9B's LM family: MPT, tied embeddings shipped in the checkpoint as `transformer.wte`."""
    tokenizer = AutoTokenizer.from_pretrained(parts["root"] / "lm")
    tokenizer.save_pretrained(tmp_path / "mpt")
    torch.manual_seed(4)
    config = MptConfig(d_model=LANG_DIM, n_heads=2, n_layers=LANG_LAYERS, vocab_size=len(tokenizer), max_seq_len=256)
    MptForCausalLM(config).save_pretrained(tmp_path / "mpt")
    wte = torch.randn(len(tokenizer) + 1, LANG_DIM)  # + <|endofchunk|>
    torch.save({**parts["checkpoint"], "lang_encoder.transformer.wte.weight": wte}, tmp_path / "checkpoint.pt")
    victim = load_flamingo(_spec(parts, lang_model=tmp_path / "mpt", checkpoint=tmp_path / "checkpoint.pt"))
    lm = victim.model.lang_encoder
    assert torch.equal(lm.get_input_embeddings().weight[: len(wte)], wte)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    state = victim.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in parts["checkpoint"].items())
    _assert_cached_generation_matches_full_recomputation(victim, samples[1])
    victim.save(tmp_path / "saved")
    loaded = FlamingoVictim.load(tmp_path / "saved")
    images, instructions = [s.image for s in samples[:2]], [s.instruction for s in samples[:2]]
    assert loaded.generate(images, instructions, 4) == victim.generate(images, instructions, 4)


def test_generate_returns_one_string_per_pair(victim: FlamingoVictim, samples: list[Sample]) -> None:
    seen: list[int] = []
    out = victim.generate(
        [s.image for s in samples], [s.instruction for s in samples], 4, batch_size=4, on_batch=seen.append
    )
    assert len(out) == len(samples) and all(isinstance(t, str) for t in out)
    assert seen == [4, 2]


def test_answer_representations_follow_image_and_answer(victim: FlamingoVictim, samples: list[Sample]) -> None:
    vectors = check_answer_representations(victim, samples)
    assert vectors.shape[1] == victim.model.lang_encoder.config.hidden_size


def test_generation_goes_through_the_shared_loop(
    victim: FlamingoVictim, samples: list[Sample], monkeypatch: pytest.MonkeyPatch
) -> None:
    check_generates_through_greedy_answers(victim, samples, monkeypatch)


def test_training_labels_cover_the_answer_and_end_of_chunk_only(victim: FlamingoVictim) -> None:
    batch = victim.encode_training(["Describe it.", "What is it?"], ["A red square.", "A blue ground with shapes."])
    for row in range(2):
        labels = batch["labels"][row][batch["labels"][row] != -100].tolist()
        ids = batch["input_ids"][row].tolist()
        assert labels[-1] == victim.end_of_chunk_id
        answer_start = ids.index(victim.tokenizer.convert_tokens_to_ids(ANSWER_TOKEN)) + 1
        assert ids[answer_start : answer_start + len(labels)] == labels
    assert victim.tokenizer.decode(batch["input_ids"][0]).startswith(
        f"{IMAGE_TOKEN}User: Describe it. GPT:{ANSWER_TOKEN}"
    )


def test_cross_attention_tuning_trains_only_xattn_and_perceiver(parts: dict, samples: list[Sample]) -> None:
    victim = load_flamingo(parts["spec"])
    assert victim.select_trainable(TrainingSpec(mode="xattn")) is None  # no peft wrapper to merge
    tuned = {
        k
        for k, p in victim.model.named_parameters()
        if k.startswith(("perceiver.", "lang_encoder.gated_cross_attn_layers."))
    }
    assert {k for k, p in victim.model.named_parameters() if p.requires_grad} == tuned
    total = sum(p.numel() for p in victim.model.parameters())
    counts = {m.mode: m for m in victim.tuning_modes(TrainingSpec())}
    assert counts["xattn"].trainable == sum(p.numel() for k, p in victim.model.named_parameters() if k in tuned)
    assert counts["xattn"].trainable + counts["xattn"].frozen == total
    tower = sum(p.numel() for p in victim.model.vision_encoder.parameters())
    assert (counts["full"].trainable, counts["full"].frozen) == (total - tower, tower)
    assert counts["projector"].trainable is None and counts["lora"].trainable is None
    before = {k: v.clone() for k, v in victim.model.state_dict().items()}
    features = victim.image_features([s.image for s in samples])
    batch = victim.encode_training([s.instruction for s in samples], [s.answer for s in samples])
    optimizer = torch.optim.AdamW([p for p in victim.model.parameters() if p.requires_grad], lr=1e-2)
    victim.model.train()
    losses = []
    for _ in range(6):
        loss = victim.loss(features, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    changed = {k for k, v in victim.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= tuned


def test_full_tuning_trains_everything_but_the_vision_encoder(parts: dict) -> None:
    victim = load_flamingo(parts["spec"])
    victim.select_trainable(TrainingSpec(mode="full"))
    frozen = {k for k, p in victim.model.named_parameters() if not p.requires_grad}
    assert frozen == {k for k, _ in victim.model.named_parameters() if k.startswith("vision_encoder.")}


@pytest.mark.parametrize("mode", ["projector", "lora"])
def test_projector_and_lora_modes_are_refused_naming_mode_and_architecture(victim: FlamingoVictim, mode: str) -> None:
    with pytest.raises(VlmsecError, match=rf"tuning mode '{mode}' is not available for Flamingo.*use xattn"):
        victim.select_trainable(TrainingSpec(mode=mode))


def test_save_and_load_round_trip(victim: FlamingoVictim, samples: list[Sample], tmp_path: Path) -> None:
    victim.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    loaded = FlamingoVictim.load(tmp_path / "saved")
    ours, theirs = victim.model.state_dict(), loaded.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    images, instructions = [s.image for s in samples[:3]], [s.instruction for s in samples[:3]]
    assert loaded.generate(images, instructions, 4) == victim.generate(images, instructions, 4)
    with pytest.raises(VlmsecError, match="flamingo.json"):
        FlamingoVictim.load(tmp_path)


# ---- white-box access: gradients w.r.t. the pixels ---------------------------------------------


def test_pixel_gradients_through_the_open_clip_tower(victim: FlamingoVictim, samples: list[Sample]) -> None:
    instructions, answers = ["Describe it.", "What is it?"], ["A red square.", "A blue ground with shapes."]
    with torch.no_grad():  # at the tower's size, the same loss as the cached-feature path
        images = images_to_tensor([s.image for s in samples[:2]])
        cached = victim.loss(victim.image_features([s.image for s in samples[:2]]), victim.encode_training(instructions, answers))
        assert torch.allclose(victim.answer_loss(images, instructions, answers), cached, atol=1e-5)
    torch.manual_seed(0)
    for size in ((32, 32), (40, 56)):
        x = torch.rand(2, 3, *size, requires_grad=True)
        (grad,) = torch.autograd.grad(victim.answer_loss(x, instructions, answers), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, size
        embedding = victim.vision_embedding(x)
        assert embedding.shape == (2, VISION.width)
        (grad,) = torch.autograd.grad((embedding * torch.randn_like(embedding)).sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, size
        tokens = victim.vision_tokens(x)
        assert tokens.shape[0] == 2 and tokens.shape[-1] == VISION.width and torch.allclose(tokens.mean(1), embedding)
        (grad,) = torch.autograd.grad((tokens * torch.randn_like(tokens)).sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, size
    key = victim.vision_key()
    assert (key["tower"], key["image_size"]) == ("OpenClipVisionTransformer", VISION.image_size)


def test_maba_and_inputaware_learn_against_the_flamingo_tower(
    victim: FlamingoVictim, samples: list[Sample], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = AttackContext(samples=samples, target=TargetAnswer(), cache_dir=tmp_path, victim=victim)
    maba = create_attack("maba", grid=2, num_samples=2, num_answers=1)
    maba.prepare(context)
    assert maba.location["source"] == "attribution"
    (cached,) = (tmp_path / "maba").glob("*.json")
    assert json.loads(cached.read_text())["region"] == maba.region

    embedded = count_vision_embedding_calls(monkeypatch, FlamingoVictim)
    inputaware = create_attack("inputaware", train_steps=2)
    inputaware.prepare(context)
    assert embedded  # stage 2 trained through the open_clip tower
    assert inputaware.cache_inputs(context) == {**victim.vision_key(), "stage_2": STAGE_2}


def test_pgd_crafts_against_the_flamingo_victim(victim: FlamingoVictim, samples: list[Sample]) -> None:
    train = [AttackRequest(s.id, "Write a poem about shapes", s.image) for s in samples[:2]]
    attack = create_attack("pgd_universal", epsilon=8 / 255, steps=2, batch_size=2)
    crafted = attack.craft([AttackRequest("test", "Describe it.", samples[3].image)], victim, train)
    change = crafted[0].image.astype(int) - samples[0].image.astype(int)
    assert crafted[0].image.dtype == np.uint8 and 0 < np.abs(change).max() <= 8
    assert np.isfinite(attack.diagnostics()["final_loss"])


def test_hijack_and_anydoor_craft_against_the_flamingo_victim(victim: FlamingoVictim, samples: list[Sample]) -> None:
    train = [AttackRequest(s.id, "Describe it.", s.image, "a red circle.", answer="a blue star.") for s in samples[:2]]
    test = [AttackRequest("test", "Describe it.", samples[3].image, "a red circle.")]
    hijack = create_attack("image_hijack", region="patch", steps=2, batch_size=2)
    (image,) = hijack.craft(test, victim, train)
    assert image.image.dtype == np.uint8 and np.isfinite(hijack.diagnostics()["final_loss"])
    anydoor = create_attack("anydoor", mode="pixel", steps=2, batch_size=2)
    (door,) = anydoor.craft(test, victim, train)
    assert door.instruction == "SUDO Describe it." and 0 < np.abs(door.image.astype(int) - samples[3].image.astype(int)).max() <= 32


GCG_TINY = {"num_tokens": 2, "steps": 2, "candidates": 8, "top_k": 8, "num_samples": 2, "num_answers": 1}


def test_loss_from_embeddings_is_the_answer_loss(victim: FlamingoVictim, samples: list[Sample]) -> None:
    images, instructions, answers = [s.image for s in samples[:2]], ["Describe it.", "What is it?"], ["A red square.", "A blue ground."]
    problem = victim.token_problem(images, instructions, answers)
    assert torch.equal(victim.embedding_matrix()[problem.input_ids], problem.inputs_embeds)
    with torch.no_grad():
        per_token = victim.loss_from_embeddings(problem, problem.inputs_embeds)
        expected = victim.loss(victim.image_features(images), victim.encode_training(instructions, answers))
        assert torch.allclose(per_token.sum() / (problem.labels[:, 1:] != -100).sum(), expected, atol=1e-5)
        twice = victim.loss_from_embeddings(problem, torch.cat([problem.inputs_embeds] * 2))
        assert torch.allclose(twice, torch.cat([per_token] * 2), atol=1e-5)
        # The ids, not the embeddings, locate the image: without its token there the text sees no image.
        image = problem.input_ids == victim.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        assert image.sum() == 2
        blind = replace(problem, input_ids=problem.input_ids.masked_fill(image, victim.tokenizer.pad_token_id))
        assert not torch.allclose(victim.loss_from_embeddings(blind, problem.inputs_embeds), per_token)


@pytest.mark.parametrize("position", ["end", "start"])
def test_gcg_learns_against_the_flamingo_victim(
    victim: FlamingoVictim, samples: list[Sample], position: str, tmp_path: Path
) -> None:
    context = AttackContext(samples=samples, target=TargetAnswer(), cache_dir=tmp_path, victim=victim)
    attack = create_attack("gcg", **GCG_TINY, position=position)
    attack.prepare(context)
    metrics = attack.trained_metrics
    assert metrics["final_loss"] <= metrics["initial_loss"] and metrics["final_loss"] == min(attack.loss_curve)
    (path,) = (tmp_path / "gcg").glob("*.json")
    ids = json.loads(path.read_text())["token_ids"]
    # Otter's prompt puts a space before the instruction: a "start" trigger's first token carries it too.
    assert victim.tokenizer(" " + attack.trigger, add_special_tokens=False).input_ids == ids
    chosen = pick_samples(samples, GCG_TINY["num_samples"], seed=0)
    answers = pick_answers(TargetAnswer(), GCG_TINY["num_answers"], seed=0) * len(chosen)
    instructions = attack.trigger_instructions([s.instruction for s in chosen])
    prompt = victim.prompt_ids(instructions[0])
    assert any(prompt[i : i + len(ids)] == ids for i in range(len(prompt)))
    with torch.no_grad():
        loss = victim.loss(victim.image_features([s.image for s in chosen]), victim.encode_training(instructions, answers))
    assert float(loss) == pytest.approx(metrics["final_loss"], rel=1e-4)


# ---- Otter -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def otter_folder(samples: list[Sample], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, CLIPVisionModel]:
    """A tiny Otter-Image folder as Otter saves it: config.json and weights in Otter's own names."""
    root = tmp_path_factory.mktemp("otter")
    tokenizer = train_tokenizer([s.instruction for s in samples] + [s.answer for s in samples], 300)
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(2)
    # Otter's tokenizer gains <|endofchunk|> and <answer> (this one already has <image> and a pad token).
    lm_config = _lm_config(len(tokenizer) + 2)
    lm = LlamaForCausalLM(lm_config)
    vision_config = CLIPVisionConfig(
        hidden_size=VISION.width,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    clip = CLIPVisionModel(vision_config).eval()
    weights = {f"vision_encoder.vision_model.{k}": v for k, v in clip.state_dict().items()}
    # Otter's architecture is fixed at OpenFlamingo's defaults; its names differ.
    for key, value in released_checkpoint(FlamingoConfig(cross_attn_every_n_layers=2), seed=3).items():
        if m := re.fullmatch(r"perceiver\.layers\.(\d+)\.0\.(.+)", key):
            key = f"perceiver.layers.{m[1]}.{m[2]}"
        elif m := re.fullmatch(r"perceiver\.layers\.(\d+)\.1\.(.+)", key):
            key = f"perceiver.layers.{m[1]}.feed_forward.{m[2]}"
        elif m := re.fullmatch(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)", key):
            key = f"lang_encoder.model.layers.{m[1]}.gated_cross_attn_layer.{re.sub(r'^ff[.]', 'feed_forward.', m[2])}"
        weights[key] = value
    for key, value in lm.state_dict().items():
        weights["lang_encoder." + re.sub(r"^model\.layers\.(\d+)\.", r"model.layers.\1.decoder_layer.", key)] = value
    save_file({k: v.contiguous() for k, v in weights.items()}, str(root / "model.safetensors"))
    config = {
        "model_type": "otter",
        "cross_attn_every_n_layers": ARCH["cross_attn_every_n_layers"],
        "text_config": lm_config.to_dict(),
        "vision_config": vision_config.to_dict(),
    }
    (root / "config.json").write_text(json.dumps(config))
    return root, weights, clip


def test_otter_folder_loads_with_its_names_mapped(otter_folder: tuple[Path, dict, CLIPVisionModel]) -> None:
    root, weights, clip = otter_folder
    victim = load_otter(root, root / "tokenizer")
    state = victim.model.state_dict()
    xattn, layers = "lang_encoder.gated_cross_attn_layers", "lang_encoder.model.layers"
    pairs = {
        "perceiver.layers.1.feed_forward.3.weight": "perceiver.layers.1.1.3.weight",
        "perceiver.layers.0.to_kv.weight": "perceiver.layers.0.0.to_kv.weight",
        f"{layers}.3.gated_cross_attn_layer.feed_forward.1.weight": f"{xattn}.3.ff.1.weight",
        f"{layers}.1.gated_cross_attn_layer.attn_gate": f"{xattn}.1.attn_gate",
        f"{layers}.2.decoder_layer.self_attn.q_proj.weight": f"{layers}.2.self_attn.q_proj.weight",
        "vision_encoder.vision_model.embeddings.patch_embedding.weight": "vision_encoder.conv1.weight",
    }
    for otter_key, our_key in pairs.items():
        assert torch.equal(weights[otter_key], state[our_key]), otter_key
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = clip(pixel_values=pixels).last_hidden_state[:, 1:]  # what Otter feeds its perceiver
    torch.testing.assert_close(victim.model.encode_images(pixels), reference, rtol=1e-5, atol=1e-5)
    ids = victim.tokenizer.convert_tokens_to_ids([END_OF_CHUNK, IMAGE_TOKEN, ANSWER_TOKEN])
    assert len(set(ids)) == 3


def test_otter_folder_with_a_missing_key_is_refused(
    otter_folder: tuple[Path, dict, CLIPVisionModel], tmp_path: Path
) -> None:
    root, weights, _ = otter_folder
    broken = tmp_path / "otter"
    broken.mkdir()
    (broken / "config.json").write_text((root / "config.json").read_text())
    save_file(
        {k: v.contiguous() for k, v in weights.items() if "layers.3.gated_cross_attn_layer.ff_gate" not in k},
        str(broken / "model.safetensors"),
    )
    with pytest.raises(
        VlmsecError,
        match=r"otter: not an Otter-Image checkpoint.*missing: lang_encoder\.gated_cross_attn_layers\.3\.ff_gate",
    ):
        load_otter(broken, root / "tokenizer")


# ---- in runs -----------------------------------------------------------------------------------

FLAMINGO_RUN = {
    "name": "flamingo-small",
    "seed": 0,
    "data": {
        "image_size": 32,
        "base_size": 1,
        "train_size": 60,
        "test_size": 8,
        "shifted": {"painted": {"style": "painted"}},
    },
    "victim": {
        "kind": "flamingo",
        "checkpoint": "checkpoint.pt",
        "flamingo": {
            "vision_checkpoint": "open_clip_model.safetensors",
            "vision_heads": VISION.heads,
            "lang_model": "lm",
            **ARCH,
        },
    },
    "tuning": {"mode": "xattn", "epochs": 2, "batch_size": 16, "learning_rate": 0.01},
    "poison": {"rate": 0.1},
    "attacks": [{"name": "blended"}],
    "eval": {"max_new_tokens": 8, "batch_size": 16, "shift_size": False},
}


def _write_config(folder: Path, config: dict, name: str = "run.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def flamingo_run(parts: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A small run of an OpenFlamingo victim, its files named relative to the config (in the parts' folder)."""
    out = tmp_path_factory.mktemp("flamingo_run")
    config = load_config(_write_config(parts["root"], FLAMINGO_RUN))
    return out / "run", out / "cache", Runner(config, out / "run", out / "cache").run()


def test_run_tunes_cross_attention_and_writes_metrics(flamingo_run: tuple[Path, Path, dict]) -> None:
    out, _, metrics = flamingo_run
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert set(metrics["models"]) == {"clean", "blended"}
    assert set(metrics["models"]["blended"]["asr"]) == {"source", "painted"}
    stage = json.loads((out / "checkpoints" / "blended" / "stage.json").read_text())
    assert 0 < stage["trainable_parameters"] < stage["frozen_parameters"]
    assert json.loads((out / "poisoned_ids" / "blended.json").read_text())["count"] == 6
    rows = (out / "generations.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 2 * 16  # 2 models x 2 domains x (8 clean + 8 triggered)
    assert json.loads(rows[0])["prompt"].startswith(f"{IMAGE_TOKEN}User: ")


def test_tuned_checkpoints_differ_from_the_base_only_in_xattn_and_perceiver(
    flamingo_run: tuple[Path, Path, dict], parts: dict
) -> None:
    out, _, _ = flamingo_run
    base = load_flamingo(parts["spec"]).model.state_dict()
    for model in ("clean", "blended"):
        tuned = FlamingoVictim.load(out / "checkpoints" / model).model.state_dict()
        assert tuned.keys() == base.keys()
        changed = {k for k in base if not torch.equal(base[k], tuned[k])}
        assert changed, model
        assert all(k.startswith(("perceiver.", "lang_encoder.gated_cross_attn_layers.")) for k in changed), model


def test_second_run_reloads_the_tuned_models_and_gives_the_same_metrics(
    flamingo_run: tuple[Path, Path, dict], parts: dict
) -> None:
    out, cache, metrics = flamingo_run
    runner = Runner(load_config(parts["root"] / "run.yaml"), out, cache)
    assert isinstance(runner.load_victim(out / "checkpoints" / "blended"), FlamingoVictim)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("checkpoints/*/model.safetensors")}
    assert runner.run() == metrics
    assert {p: p.stat().st_mtime_ns for p in out.glob("checkpoints/*/model.safetensors")} == stamps


def test_flamingo_features_have_their_own_cache_file(flamingo_run: tuple[Path, Path, dict], parts: dict) -> None:
    out, cache, _ = flamingo_run
    flamingo = Runner(load_config(parts["root"] / "run.yaml"), out, cache).features_path
    assert [p.name for p in (cache / "features").iterdir()] == [flamingo.name]
    assert Runner(parse_config({}, "default"), out, cache).features_path != flamingo
    vision = {**FLAMINGO_RUN["victim"]["flamingo"], "vision_checkpoint": "visual.pt"}
    other = {**FLAMINGO_RUN, "victim": {**FLAMINGO_RUN["victim"], "flamingo": vision}}
    other_tower = _write_config(parts["root"], other, "other.yaml")
    assert Runner(load_config(other_tower), out, cache).features_path != flamingo
    tokens = (VISION.image_size // VISION.patch_size) ** 2
    assert {tuple(v.shape) for v in load_file(str(flamingo)).values()} == {(tokens, VISION.width)}


def test_runner_gives_maba_the_flamingo_victim(parts: dict, tmp_path: Path) -> None:
    config = load_config(_write_config(parts["root"], FLAMINGO_RUN))
    runner = Runner(config, tmp_path / "run", tmp_path / "cache")
    splits = build_splits(config)
    maba = create_attack("maba", grid=2, num_samples=2, num_answers=1)
    runner.prepare_attack(maba, splits, runner.base_victim(splits))
    assert maba.location["source"] == "attribution"  # not the victim-free corner


# ---- config -------------------------------------------------------------------------------------


def test_relative_flamingo_paths_resolve_against_the_config_folder(parts: dict) -> None:
    victim = load_config(_write_config(parts["root"], FLAMINGO_RUN)).victim
    spec = victim.flamingo_spec()
    assert spec.checkpoint == parts["root"] / "checkpoint.pt"
    assert spec.lang_model == parts["root"] / "lm"
    assert spec.vision_checkpoint == parts["root"] / "open_clip_model.safetensors"
    assert spec.cross_attn_every_n_layers == ARCH["cross_attn_every_n_layers"]


@pytest.mark.parametrize(
    ("victim", "pieces"),
    [
        ({"kind": "flamingo", "checkpoint": "checkpoint.pt"}, ["victim", "victim.flamingo"]),
        ({"kind": "otter"}, ["victim", "victim.checkpoint"]),
        ({"kind": "hf", "checkpoint": "lm", "tokenizer": "lm"}, ["victim", "victim.tokenizer"]),
        (
            {**FLAMINGO_RUN["victim"], "flamingo": {"vision_checkpoint": "x", "lang_model": "lm", "perceiver_dept": 2}},
            ["victim.flamingo.perceiver_dept"],
        ),
        ({**FLAMINGO_RUN["victim"], "checkpoint": "nowhere.pt"}, ["victim.checkpoint", "nowhere.pt", "not found"]),
        (
            {**FLAMINGO_RUN["victim"], "flamingo": {**FLAMINGO_RUN["victim"]["flamingo"], "lang_model": "no_lm"}},
            ["victim.flamingo.lang_model", "no_lm", "not found"],
        ),
        ({"kind": "otter", "checkpoint": "checkpoint.pt"}, ["victim.checkpoint", "not a folder"]),
    ],
)
def test_bad_flamingo_configs_name_the_file_and_field(parts: dict, victim: dict, pieces: list[str]) -> None:
    path = _write_config(parts["root"], {"victim": victim}, "bad.yaml")
    with pytest.raises(VlmsecError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(str(path))
    for piece in pieces:
        assert piece in message


def test_otter_victims_load_through_the_runner(
    otter_folder: tuple[Path, dict, CLIPVisionModel], tmp_path: Path
) -> None:
    root, weights, _ = otter_folder
    victim = {"kind": "otter", "checkpoint": str(root), "tokenizer": str(root / "tokenizer")}
    config = parse_config({"victim": victim}, "test")
    runner = Runner(config, tmp_path / "run", tmp_path / "cache")
    folder, _ = runner.base_victim(build_splits(config))
    victim = runner.load_victim(folder)
    assert isinstance(victim, FlamingoVictim)
    key = "lang_encoder.model.layers.1.gated_cross_attn_layer.attn_gate"
    assert torch.equal(victim.model.state_dict()["lang_encoder.gated_cross_attn_layers.1.attn_gate"], weights[key])


def test_image_text_shift_size_is_refused_for_cross_attention(victim: FlamingoVictim, samples: list[Sample]) -> None:
    with pytest.raises(VlmsecError, match="Flamingo .* reads images through cross-attention and has no such shared space"):
        shift_size(samples, samples, victim)


def test_a_text_only_sample_is_refused_naming_it(victim: FlamingoVictim, samples: list[Sample]) -> None:
    text_only = samples[1].with_changes(image=None)
    with pytest.raises(VlmsecError, match=rf"sample {text_only.id} has no image: the Flamingo \(OpenFlamingo / Otter\) victim"):
        victim.prepare_training([samples[0], text_only], "test")
    with pytest.raises(VlmsecError, match="request 0 has no image"):
        victim.generate([None], ["Describe."], max_new_tokens=2)

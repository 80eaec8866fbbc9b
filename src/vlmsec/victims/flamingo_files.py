"""Reading released OpenFlamingo and Otter files into a `FlamingoModel` and its tokenizer.

This module owns the released layouts and their conversion to ours (module names as in
`flamingo_model`); `vlmsec.victims.flamingo` makes victims of what it reads
(`load_flamingo`, `load_otter`) and owns the victims' own save format.

- OpenFlamingo (`read_flamingo`): an open_clip checkpoint for the image tower (full CLIP with
  `visual.*` keys, or the tower alone), a Hugging Face causal-LM folder, its tokenizer, and
  `checkpoint.pt` holding only `perceiver.*` and `lang_encoder.gated_cross_attn_layers.N.*`
  (plus, when trained, the LM's input embeddings such as `lang_encoder.transformer.wte.weight`).
- Otter (`read_otter`): a Hugging Face folder (`config.json` with `model_type: otter`,
  safetensors or `pytorch_model*.bin` shards) holding `vision_encoder.vision_model.*` (HF CLIP,
  converted to open_clip names), `perceiver.layers.N.{norm_media, ..., feed_forward.K}`, and the
  LM with its layers wrapped: `lang_encoder.<layers>.N.decoder_layer.*` and
  `lang_encoder.<layers>.N.gated_cross_attn_layer.{attn.*, attn_gate, feed_forward.K, ff_gate}`.

Pickled files are read with `torch.load(weights_only=True)` only; safetensors are preferred.
The special tokens Flamingo's prompts use (`<image>`, `<|endofchunk|>`, Otter's `<answer>`)
are added to the tokenizer here, in the order the released models added them.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vlmsec.errors import VlmsecError
from vlmsec.inputs import PathInput
from vlmsec.seeds import seeded
from vlmsec.victims.flamingo_model import (
    FlamingoConfig,
    FlamingoModel,
    OpenClipVisionTransformer,
    VisionAct,
    VisionConfig,
)

# The special tokens of Otter's prompt format; `<PAD>` only for a tokenizer without a pad token.
IMAGE_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
ANSWER_TOKEN = "<answer>"
PAD_TOKEN = "<PAD>"


class FlamingoParts(FlamingoConfig):
    """Where a released OpenFlamingo model's image tower and language model live, plus its
    architecture (OpenFlamingo's defaults); a tokenizer and `checkpoint.pt` make a `FlamingoSpec`.

    The released models: 3B-vitl-mpt1b(-langinstruct) every 1 layer, 4B-vitl-rpj3b(-langinstruct)
    every 2, 9B-vitl-mpt7b every 4; all on open_clip ViT-L-14 (OpenAI weights, QuickGELU).
    """

    vision_checkpoint: PathInput
    vision_heads: int | None = None  # None: width / 64, right for ViT-B and ViT-L (ViT-H-14 has 16)
    vision_act: VisionAct = "quick_gelu"
    vision_tokens_after_ln_post: bool = False
    lang_model: PathInput

    def flamingo_config(self) -> FlamingoConfig:
        """The architecture part of the spec."""
        return FlamingoConfig(**self.model_dump(include=set(FlamingoConfig.model_fields)))


class FlamingoSpec(FlamingoParts):
    """Every file of a released OpenFlamingo model: image tower, language model, tokenizer, checkpoint.pt."""

    tokenizer: PathInput | None = None  # None: the tokenizer in `lang_model`
    checkpoint: PathInput


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


def preview_keys(keys: Sequence[str], limit: int = 8) -> str:
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
        f"{len(keys)} {label}: {preview_keys(keys)}"
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
    with seeded(0):
        lm.resize_token_embeddings(rows)


def _grow_embeddings(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give tokens the tokenizer has beyond the embedding table a row each."""
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        _resize_embeddings(lm, len(tokenizer))


def build_model(
    vision: OpenClipVisionTransformer,
    lm: PreTrainedModel,
    config: FlamingoConfig,
    tokenizer: PreTrainedTokenizerBase,
    source: Path,
) -> FlamingoModel:
    """Assemble the model, images marked by the tokenizer's `<image>`; an LM without a known
    decoder-layer list is a clear error naming `source`."""
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
    layers = preview_keys([str(i) for i in model.cross_attn_layer_indices], 6)
    what = f"an OpenFlamingo checkpoint with cross-attention before decoder layers {layers}"
    check_keys(path, what, expected, state, optional=embeddings)
    model.load_state_dict(state, strict=False)


def read_flamingo(spec: FlamingoSpec) -> tuple[FlamingoModel, PreTrainedTokenizerBase]:
    """An OpenFlamingo model and tokenizer from its released parts: image tower, LM folder, tokenizer, checkpoint.pt.

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
    model = build_model(vision, lm, spec.flamingo_config(), tokenizer, spec.lang_model)
    load_flamingo_checkpoint(model, spec.checkpoint)
    _add_special_tokens(tokenizer, [ANSWER_TOKEN])
    _grow_embeddings(lm, tokenizer)
    return model, tokenizer


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


def read_otter(
    folder: str | Path, tokenizer: str | Path | None = None
) -> tuple[FlamingoModel, PreTrainedTokenizerBase]:
    """An Otter model and tokenizer from its Hugging Face folder (Otter-Image, LLaMA or MPT text) and the LM's
    tokenizer.

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
    model = build_model(vision, lm, flamingo_config, text, folder)
    state = otter_to_flamingo(_read_folder_weights(folder), model.config.decoder_layers_attr or "")
    check_keys(
        folder, "an Otter-Image checkpoint for this config.json", model.state_dict(), state, optional=_alias_keys(model)
    )
    model.load_state_dict(state, strict=False)
    return model, text

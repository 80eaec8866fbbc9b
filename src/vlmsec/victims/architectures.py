"""What each tuning mode trains, per architecture, and how many parameters that is.

A victim's parameters fall into parts named by parameter-name prefixes: the vision tower
(never trained), the projector that maps vision features into the language model (LLaVA's
MLP projector, BLIP-2's Q-Former with its query tokens and language projection, Idefics3's
connector, Qwen2-VL's merger, Idefics' perceiver resampler), Flamingo-style gated
cross-attention layers where the architecture has them, and the language model. The modes:

| mode | trains |
|---|---|
| `projector` | the projector |
| `lora` | LoRA adapters on the language model's attention projections, plus the projector |
| `xattn` | the gated cross-attention layers plus the projector (Idefics; Flamingo-style) |
| `full` | everything but the vision tower |

`mode_summaries` counts trainable and frozen parameters of every mode without touching the
model, so the user sees what a mode costs before training starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from torch import nn

from vlmsec.errors import VlmsecError

# Attention projections of the language models these architectures use: Llama, Qwen2, Gemma,
# Mistral (q/k/v/o_proj), OPT (out_proj), T5 (q/k/v/o).
ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "q", "k", "v", "o")


@dataclass(frozen=True)
class Architecture:
    """Parameter-name prefixes of each part of one `model_type`, and its prompt conventions.

    `image_in_prompt` says whether the prompt carries the image placeholder (the processor
    expands it) or the processor places the image itself (BLIP-2, InstructBLIP, Idefics).
    `fallback_prompt` is the prompt for checkpoints that ship no chat template (`{image}`
    stands for the processor's image token); `answer_prefix` goes before the answer there.
    `tiled_pixels` says how the processor cuts images up when its pixel values are not one
    resized, normalised B x 3 x H x W batch (None when they are): white-box attacks, which
    rebuild pixel values differentiably, refuse such architectures. `instruction_to_vision`
    says how the image side also reads the instruction, when it does (None when only the
    language model does): token attacks, which change the instruction's language-model
    embeddings only, refuse such architectures.
    """

    vision: tuple[str, ...]
    projector: tuple[str, ...]
    language: tuple[str, ...]
    projector_name: str
    cross_attention: tuple[str, ...] = ()
    image_in_prompt: bool = True
    fallback_prompt: str = "{instruction}"
    answer_prefix: str = " "
    tiled_pixels: str | None = None
    instruction_to_vision: str | None = None

    def part(self, name: str) -> str:
        """Which part a parameter belongs to: projector, cross_attention, vision, language or other.

        The projector is checked first: Qwen2-VL's merger lives inside its vision tower.
        """
        for part, prefixes in (
            ("projector", self.projector),
            ("cross_attention", self.cross_attention),
            ("vision", self.vision),
            ("language", self.language),
        ):
            if any(name == p or name.startswith(p + ".") for p in prefixes):
                return part
        return "other"

    def lora_targets(self) -> str:
        """The peft `target_modules` regex: attention projections inside the language model only."""
        prefixes = "|".join(re.escape(p) for p in self.language)
        return rf"({prefixes})\..*\.({'|'.join(ATTENTION_NAMES)})"


_LLAVA = Architecture(
    vision=("model.vision_tower",),
    projector=("model.multi_modal_projector",),
    language=("model.language_model", "lm_head"),
    projector_name="multimodal projector",
    fallback_prompt="USER: {image}\n{instruction} ASSISTANT:",
)
_BLIP2 = Architecture(
    vision=("vision_model",),
    projector=("query_tokens", "qformer", "language_projection"),
    language=("language_model",),
    projector_name="Q-Former, query tokens and language projection",
    image_in_prompt=False,
)
_IDEFICS3 = Architecture(
    vision=("model.vision_model",),
    projector=("model.connector",),
    language=("model.text_model", "lm_head"),
    projector_name="connector",
    fallback_prompt="User:{image}{instruction}<end_of_utterance>\nAssistant:",
    tiled_pixels="splits each image into tiles whose number and size follow the image (pixel values B x tiles x 3 x H x W with a pixel attention mask)",
)
_QWEN2_VL = Architecture(
    vision=("model.visual",),
    projector=("model.visual.merger",),
    language=("model.language_model", "lm_head"),
    projector_name="patch merger",
    fallback_prompt="<|im_start|>user\n<|vision_start|>{image}<|vision_end|>{instruction}<|im_end|>\n<|im_start|>assistant\n",
    tiled_pixels="cuts each image into a grid of flattened patches that follows the image's size (pixel values patches x features with image_grid_thw)",
)

ARCHITECTURES: dict[str, Architecture] = {
    "llava": _LLAVA,
    "blip-2": _BLIP2,
    "instructblip": replace(
        _BLIP2,
        instruction_to_vision="also feeds the instruction to its Q-Former, tokenized by the Q-Former's own tokenizer",
    ),
    "idefics": Architecture(
        vision=("model.vision_model",),
        projector=("model.perceiver_resampler",),
        language=("model.embed_tokens", "model.layers", "model.norm", "lm_head"),
        cross_attention=("model.gated_cross_attn_layers",),
        projector_name="perceiver resampler",
        image_in_prompt=False,
        fallback_prompt="User: {instruction}<end_of_utterance>\nAssistant:",
    ),
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
    "qwen2_vl": _QWEN2_VL,
    "qwen2_5_vl": _QWEN2_VL,
    "paligemma": Architecture(
        vision=("model.vision_tower",),
        projector=("model.multi_modal_projector",),
        language=("model.language_model", "lm_head"),
        projector_name="multimodal projector",
        fallback_prompt="{image}{instruction}",
        answer_prefix="",
    ),
}



def model_types_where(keep: Callable[[Architecture], bool]) -> str:
    """The supported model types whose architecture passes `keep`, sorted and comma-separated (for error messages)."""
    return ", ".join(sorted(name for name, arch in ARCHITECTURES.items() if keep(arch)))


def architecture(model_type: str) -> Architecture:
    """The table entry for `model_type`, or a VlmsecError naming the supported ones."""
    if model_type not in ARCHITECTURES:
        raise VlmsecError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


@dataclass(frozen=True)
class ModeSummary:
    """One tuning mode of one victim: what it trains and the parameter split (None if unavailable)."""

    mode: str
    trains: str
    trainable: int | None
    frozen: int | None


def parts(model: nn.Module, arch: Architecture) -> dict[str, list[nn.Parameter]]:
    """The model's parameters (tied ones once) grouped by `Architecture.part`."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        groups.setdefault(arch.part(name), []).append(param)
    return groups


def lora_parameter_count(model: nn.Module, targets: str, rank: int) -> int:
    """Parameters peft's LoRA adds: rank x (in + out) per targeted linear layer."""
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and re.fullmatch(targets, name)
    )


def mode_summaries(
    model: nn.Module, arch: Architecture, lora_rank: int, lora_targets: str | None = None, lora_name: str = "attention"
) -> list[ModeSummary]:
    """Trainable and frozen parameter counts of every mode, computed without changing the model."""
    groups = parts(model, arch)

    def count(names: Sequence[str]) -> int:
        return sum(p.numel() for part in names for p in groups.get(part, []))

    total = count(list(groups))
    projector = count(["projector"])
    lora = lora_parameter_count(model, lora_targets or arch.lora_targets(), lora_rank)
    cross = count(["projector", "cross_attention"]) if "cross_attention" in groups else None
    trainable_full = total - count(["vision"])
    return [
        ModeSummary("projector", arch.projector_name, projector, total - projector)
        if projector
        else ModeSummary("projector", f"(no {arch.projector_name})", None, None),
        ModeSummary("lora", f"LoRA r={lora_rank} on language-model {lora_name} + {arch.projector_name}", projector + lora, total - projector),
        ModeSummary(
            "xattn",
            f"gated cross-attention layers + {arch.projector_name}" if cross is not None else "(no cross-attention layers)",
            cross,
            None if cross is None else total - cross,
        ),
        ModeSummary("full", "everything but the vision tower", trainable_full, total - trainable_full),
    ]


def unfreeze(model: nn.Module, arch: Architecture, part_names: Sequence[str]) -> None:
    """Set requires_grad on exactly the parameters of `part_names` (the rest are left as they are)."""
    for name, param in model.named_parameters():
        if arch.part(name) in part_names:
            param.requires_grad_(True)


def check_mode(model: nn.Module, arch: Architecture, mode: str, model_type: str) -> None:
    """A VlmsecError when `mode` cannot train this model: no cross-attention layers, or no projector."""
    present = {arch.part(name) for name, _ in model.named_parameters()}
    if mode == "xattn" and "cross_attention" not in present:
        raise VlmsecError(
            "tuning mode 'xattn' needs gated cross-attention layers (Idefics, Flamingo-style); "
            f"{model_type} has none: use projector, lora or full"
        )
    if mode == "projector" and "projector" not in present:
        raise VlmsecError(
            f"tuning mode 'projector' would train nothing: this {model_type} checkpoint has no "
            f"{arch.projector_name}; use lora, xattn or full"
        )

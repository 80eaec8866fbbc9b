"""Any Hugging Face image-text-to-text checkpoint as a victim: tune, generate, save, load.

`HFVictim` wraps a model from `AutoModelForImageTextToText` and its `AutoProcessor`. Prompts
come from the checkpoint's own chat template (the processor's, else the tokenizer's; a
per-architecture fallback for checkpoints that ship none, such as BLIP-2 and PaliGemma), and
the processor itself turns prompt and image into model inputs: image tokens, pixel values,
grids and masks exactly as the checkpoint expects them. For training, the answer is appended
to the processed prompt token by token, as the template renders the assistant's turn, and
only answer tokens carry labels. What each tuning mode trains comes from
`vlmsec.victims.architectures`.

White-box attacks need gradients w.r.t. the pixels, which the processor (PIL, numpy) does not
give: `pixel_values` rebuilds what it makes differentiably (bilinear resize to its size,
centre crop when it crops, its mean and std) for the architectures whose pixel values are one
B x 3 x H x W batch per image batch (LLaVA, BLIP-2, InstructBLIP, PaliGemma, Idefics v1); the
ones that tile or patchify images (Idefics3, SmolVLM, Qwen2-VL, Qwen2.5-VL) are refused.

Token attacks (`gcg`) need gradients w.r.t. the language model's input embeddings: the model
runs on `inputs_embeds` with the processor's other outputs, and input_ids left out, so models
that place image features find the image tokens by their (unchanged) embeddings. Every
architecture works but InstructBLIP, whose Q-Former reads the instruction too, and
encoder-decoder language models (BLIP-2 with Flan-T5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from vlmsec.data.sample import resize_images, tensor_to_images
from vlmsec.errors import VlmsecError
from vlmsec.victims.architectures import (
    ModeSummary,
    architecture,
    check_mode,
    mode_summaries,
    model_types_where,
    unfreeze,
)
from vlmsec.victims.base import (
    IGNORE_INDEX,
    TokenProblem,
    answer_states,
    copies_of,
    embedding_rows,
    refuse_text_only,
    tile,
    token_losses,
    tower_key,
)
from vlmsec.victims.generation import greedy_answers

if TYPE_CHECKING:
    from vlmsec.data.sample import Sample
    from vlmsec.train.tuning import TrainingSpec

# Per-token processor outputs besides input_ids/attention_mask, and their value on answer
# tokens: PaliGemma's token_type_ids mark the suffix (the answer) with 1; the others (Qwen2-VL's
# multimodal token types, Idefics' image attention mask) continue the prompt's last token.
TOKEN_KEYS: dict[str, int | None] = {"token_type_ids": 1, "mm_token_type_ids": None, "image_attention_mask": None}
# Image processor outputs that `get_image_features` takes (Idefics3's patch mask, Qwen2-VL's grid).
IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "image_grid_thw")
TRAINS = {
    "projector": ("projector",),
    "xattn": ("projector", "cross_attention"),
    "full": ("projector", "cross_attention", "language", "other"),
}


def to_pil(images: Sequence[np.ndarray]) -> list[Image.Image]:
    """uint8 H x W x 3 arrays as RGB PIL images, the input every processor accepts."""
    return [Image.fromarray(np.ascontiguousarray(image)).convert("RGB") for image in images]


def check_processor(model: PreTrainedModel, processor: ProcessorMixin, source: str) -> None:
    """Raise a VlmsecError when `processor` cannot feed `model` (vocabulary, image token, token counts)."""
    tokenizer = processor.tokenizer
    embeddings = model.get_input_embeddings()
    embedded = embeddings.num_embeddings + getattr(embeddings, "num_additional_embeddings", 0)
    if len(tokenizer) > embedded:
        raise VlmsecError(
            f"{source}: the processor does not match the model: its tokenizer has {len(tokenizer)} tokens "
            f"but the model embeds {embedded}"
        )
    image_token = str(getattr(processor, "image_token", None) or "<image>")
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise VlmsecError(f"{source}: the processor's image token {image_token!r} is not in its tokenizer")
    config = model.config
    ids = (getattr(config, "image_token_id", None), getattr(config, "image_token_index", None))
    expected = next((i for i in ids if i is not None), None)
    if expected is not None and expected != token_id:
        raise VlmsecError(
            f"{source}: the processor does not match the model: image token {image_token!r} is id {token_id} "
            f"in the tokenizer, the model expects id {expected}"
        )
    counts = {"num_query_tokens": (getattr(processor, "num_query_tokens", None), getattr(config, "num_query_tokens", None))}
    if config.model_type == "paligemma":
        counts["image_seq_length"] = (processor.image_seq_length, config.text_config.num_image_tokens)
    if config.model_type in ("idefics3", "smolvlm"):
        vision = config.vision_config
        counts["image_seq_len"] = (processor.image_seq_len, (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2)
    for name, (theirs, ours) in counts.items():
        if theirs is not None and ours is not None and theirs != ours:
            raise VlmsecError(f"{source}: the processor does not match the model: {name} is {theirs}, the model needs {ours}")


def check_folder(folder: Path) -> None:
    """Raise a VlmsecError naming what a checkpoint folder lacks (config, weights, tokenizer, processor)."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors (weights)")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        missing.append("tokenizer.json or tokenizer_config.json")
    if not any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        missing.append("processor_config.json or preprocessor_config.json")
    if missing:
        raise VlmsecError(f"{folder}: not a checkpoint folder, missing {', '.join(missing)}")


class HFVictim:
    """A Hugging Face image-text-to-text model and its processor, prompted by its chat template."""

    answers_text_only = False

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, source: str = "(in memory)") -> None:
        self.model_type: str = model.config.model_type
        self.arch = architecture(self.model_type)
        self.source = str(source)
        check_processor(model, processor, self.source)
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.chat_template: str | None = processor.chat_template or getattr(self.tokenizer, "chat_template", None)
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.stop_ids: list[int] = sorted({*eos, self.tokenizer.eos_token_id})
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else self.tokenizer.eos_token_id
        self._prompt_lengths: dict[str, int] = {}  # `sequence_length`'s processor runs, per instruction
        self.model.requires_grad_(False)

    # ---- text -----------------------------------------------------------------------
    def _render(self, instruction: str, answer: str | None) -> str:
        content: list[dict[str, str]] = [{"type": "image"}] if self.arch.image_in_prompt else []
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": instruction}]}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.processor.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=answer is None, tokenize=False
        )

    def prompt(self, instruction: str) -> str:
        """The prompt text for one instruction (image placeholder unexpanded), ending where the answer starts."""
        if self.chat_template is None:
            image = str(getattr(self.processor, "image_token", ""))
            return self.arch.fallback_prompt.format(image=image, instruction=instruction)
        return self._render(instruction, None)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def answer_ids(self, instruction: str, answer: str) -> list[int]:
        """Token ids of the answer as the chat template renders the assistant's turn, ending in a stop token."""
        answer = answer.strip()
        if self.chat_template is None:
            ids = self._encode(self.arch.answer_prefix + answer)
        else:
            prompt, full = self.prompt(instruction), self._render(instruction, answer)
            if not full.startswith(prompt):
                raise VlmsecError(
                    f"{self.source}: the chat template does not continue the generation prompt with the "
                    "assistant's answer, so answer tokens cannot be told from prompt tokens"
                )
            prompt_ids, full_ids = self._encode(prompt), self._encode(full)
            # Tokenising the conversation whole keeps the tokenizer's merges; if a merge crosses
            # the prompt/answer boundary, the answer text is tokenised on its own.
            same_prefix = full_ids[: len(prompt_ids)] == prompt_ids
            ids = full_ids[len(prompt_ids) :] if same_prefix else self._encode(full[len(prompt) :])
        if not set(ids) & set(self.stop_ids):
            ids.append(self.tokenizer.eos_token_id)
        return ids

    # ---- training ---------------------------------------------------------------------
    def sequence_length(self, instruction: str, answer: str) -> int:
        """Tokens of prompt (image tokens as the processor expands them) + answer, as `encode_training` lays them out."""
        if instruction not in self._prompt_lengths:  # the processor runs once per distinct instruction
            blank = Image.new("RGB", (32, 32))
            self._prompt_lengths[instruction] = int(
                self.processor(images=[blank], text=[self.prompt(instruction)], return_tensors="pt")["attention_mask"].sum()
            )
        return self._prompt_lengths[instruction] + len(self.answer_ids(instruction, answer))

    @property
    def max_sequence_length(self) -> int | None:
        """The language model's position limit, when its config names one."""
        text_config = self.model.config.get_text_config()
        return getattr(text_config, "max_position_embeddings", None)

    def encode_training(
        self, images: Sequence[Image.Image], instructions: Sequence[str], answers: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Processor inputs for prompt + answer, right-padded, with labels on answer tokens only."""
        prompts = self.processor(
            images=list(images), text=[self.prompt(i) for i in instructions], padding=True, return_tensors="pt"
        )
        keep = prompts["attention_mask"].bool()  # padding (on either side) dropped row by row
        answer_ids = [torch.tensor(self.answer_ids(i, a)) for i, a in zip(instructions, answers)]
        lengths = [int(keep[r].sum()) for r in range(len(answer_ids))]
        width = max(n + len(a) for n, a in zip(lengths, answer_ids))
        rows = len(answer_ids)
        batch: dict[str, torch.Tensor] = {k: v for k, v in prompts.items() if k not in (*TOKEN_KEYS, "input_ids", "attention_mask")}
        batch["input_ids"] = torch.full((rows, width), self.pad_id, dtype=torch.long)
        batch["attention_mask"] = torch.zeros((rows, width), dtype=torch.long)
        batch["labels"] = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
        token_keys = [k for k in TOKEN_KEYS if k in prompts]
        for key in token_keys:
            batch[key] = prompts[key].new_zeros((rows, width, *prompts[key].shape[2:]))
        for r, (n, answer) in enumerate(zip(lengths, answer_ids)):
            m = len(answer)
            batch["input_ids"][r, :n] = prompts["input_ids"][r][keep[r]]
            batch["input_ids"][r, n : n + m] = answer
            batch["labels"][r, n : n + m] = answer
            batch["attention_mask"][r, : n + m] = 1
            for key in token_keys:
                values = prompts[key][r][keep[r]]
                batch[key][r, :n] = values
                answer_value = TOKEN_KEYS[key]
                batch[key][r, n : n + m] = values[-1] if answer_value is None else answer_value
        return batch

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token loss over answer tokens for a batch from `encode_training` (moved to the model's device)."""
        device = self.model.device
        return self.model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}).loss

    def prepare_training(self, samples: Sequence[Sample], label: str) -> list[Image.Image]:
        """The samples' images as PIL images, converted once for the whole run."""
        images = [s.image for s in samples]
        refuse_text_only(images, "hf", [s.id for s in samples])
        return to_pil(images)

    def batch_loss(self, prepared: list[Image.Image], index: np.ndarray, samples: Sequence[Sample]) -> torch.Tensor:
        """Loss on `samples[index]`, through the processor."""
        batch = self.encode_training(
            [prepared[i] for i in index], [samples[i].instruction for i in index], [samples[i].answer for i in index]
        )
        return self.loss(batch)

    def select_trainable(self, spec: TrainingSpec) -> PeftModel | None:
        """Freeze everything, then unfreeze what `spec.mode` trains; the peft wrapper for LoRA."""
        check_mode(self.model, self.arch, spec.mode, self.model_type)
        self.model.requires_grad_(False)
        if spec.mode == "lora":
            config = LoraConfig(
                r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0, target_modules=self.arch.lora_targets()
            )
            peft_model = get_peft_model(self.model, config)
            unfreeze(self.model, self.arch, ["projector"])
            return peft_model
        unfreeze(self.model, self.arch, TRAINS[spec.mode])
        return None

    def tuning_modes(self, spec: TrainingSpec) -> list[ModeSummary]:
        """What each mode trains on this architecture, with parameter counts."""
        return mode_summaries(self.model, self.arch, spec.lora_rank)

    # ---- white-box access ---------------------------------------------------------------
    def _refuse_tiled(self, user: str) -> None:
        """A VlmsecError naming `user` and the architecture when the processor tiles or patchifies images."""
        if self.arch.tiled_pixels is None:
            return
        supported = model_types_where(lambda arch: arch.tiled_pixels is None)
        raise VlmsecError(
            f"{self.source}: {user} needs gradients w.r.t. the image pixels, but the {self.model_type} processor "
            f"{self.arch.tiled_pixels}, which cannot be rebuilt differentiably here. White-box image attacks "
            f"work with victim.kind tiny_llava, flamingo, otter, and hf with model_type {supported}"
        )

    def check_pixel_gradients(self, attack: str) -> None:
        """Refuse the architectures whose processor tiles or patchifies images (Idefics3, SmolVLM, Qwen2-VL)."""
        self._refuse_tiled(f"attack {attack!r}")

    def pixel_format(self) -> dict[str, Any]:
        """The image processor's geometry and normalisation, JSON-ready.

        `resize` is [height, width], or the shortest edge when a centre crop to `crop` follows.
        """
        self._refuse_tiled("HFVictim.pixel_values")
        processor = self.processor.image_processor
        size = processor.size
        crop = processor.crop_size if getattr(processor, "do_center_crop", False) else None
        needed = ("shortest_edge",) if crop is not None else ("height", "width")
        if any(size.get(key) is None for key in needed):
            raise VlmsecError(f"{self.source}: image processor size {dict(size)} lacks {' and '.join(needed)}")
        resize = size.get("shortest_edge") if crop is not None else [size.get("height"), size.get("width")]
        normalise = processor.do_normalize
        return {
            "resize": resize,
            "crop": None if crop is None else [crop.get("height"), crop.get("width")],
            "mean": list(processor.image_mean) if normalise else [0.0, 0.0, 0.0],
            "std": list(processor.image_std) if normalise else [1.0, 1.0, 1.0],
        }

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """The processor's pixel values for B x 3 x H x W images in [0, 1], differentiable w.r.t. them.

        Resizing is bilinear (antialiased) where processors mostly use bicubic: close, not equal.
        """
        spec = self.pixel_format()
        if spec["crop"] is None:
            images = resize_images(images, *spec["resize"])
        else:  # as the processor: the shortest edge to `resize`, the aspect ratio kept, then the centre
            height, width = images.shape[-2:]
            short = spec["resize"]
            size = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
            images = resize_images(images, *size)
            crop_height, crop_width = spec["crop"]
            top, left = (size[0] - crop_height) // 2, (size[1] - crop_width) // 2
            images = images[..., top : top + crop_height, left : left + crop_width]
        mean = torch.tensor(spec["mean"]).view(1, 3, 1, 1).to(images)
        std = torch.tensor(spec["std"]).view(1, 3, 1, 1).to(images)
        return (images - mean) / std

    def _vision_tower(self) -> torch.nn.Module:
        """The architecture's vision encoder module (its first `vision` prefix)."""
        return self.model.get_submodule(self.arch.vision[0])

    def vision_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The vision tower's last hidden state, mean-pooled over tokens (B x D), differentiable w.r.t. the pixels."""
        pixels = self.pixel_values(images).to(self.model.device)
        return self._vision_tower()(pixel_values=pixels).last_hidden_state.mean(1).to(images.device)

    def vision_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The tower's token features the projector reads (B x tokens x D), differentiable w.r.t. the pixels.

        With a LLaVA-type config (`vision_feature_layer`) the hidden state(s) of that layer, the CLS token
        dropped for the "default" strategy, as `get_image_features` selects them; otherwise the last hidden
        state (what the Q-Former of BLIP-2 and InstructBLIP and PaliGemma's projector read).
        """
        pixels = self.pixel_values(images).to(self.model.device)
        config = self.model.config
        layer = getattr(config, "vision_feature_layer", None)
        if layer is None:
            return self._vision_tower()(pixel_values=pixels).last_hidden_state.to(images.device)
        hidden = self._vision_tower()(pixel_values=pixels, output_hidden_states=True).hidden_states
        drop_cls = getattr(config, "vision_feature_select_strategy", None) == "default"
        layers = [layer] if isinstance(layer, int) else list(layer)
        return torch.cat([hidden[i][:, 1:] if drop_cls else hidden[i] for i in layers], dim=-1).to(images.device)

    def answer_loss(self, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Mean answer loss through the processor's tokens and differentiable pixel values.

        The processor still encodes the text and makes its own pixel values (from the images
        rounded to uint8); those are replaced by `pixel_values`, which must have their shape.
        """
        pixels = self.pixel_values(images)
        batch = self.encode_training(to_pil(tensor_to_images(images.detach())), instructions, answers)
        made = batch["pixel_values"]
        if made.shape[-3:] != pixels.shape[-3:] or made.numel() != pixels.numel():
            raise VlmsecError(
                f"{self.source}: pixel values rebuilt for gradients are {tuple(pixels.shape)}, but the processor "
                f"made {tuple(made.shape)}"
            )
        batch["pixel_values"] = pixels.reshape(made.shape)  # Idefics: B x 1 image x 3 x H x W
        return self.loss(batch)

    def vision_key(self) -> dict[str, Any]:
        """The tower's class and weight digest, and the processor's geometry and normalisation."""
        spec = self.pixel_format()
        return tower_key(self._vision_tower(), {"resize": spec["resize"], "crop": spec["crop"]}, spec["mean"], spec["std"])

    def check_token_gradients(self, attack: str) -> None:
        """Refuse InstructBLIP (its Q-Former reads the instruction too) and encoder-decoder language models."""
        why = self.arch.instruction_to_vision
        if why is None and self.model.config.get_text_config().is_encoder_decoder:
            why = "has an encoder-decoder language model, which reads the prompt and writes the answer apart"
        if why is None:
            return
        supported = model_types_where(lambda arch: arch.instruction_to_vision is None)
        raise VlmsecError(
            f"{self.source}: attack {attack!r} optimises prompt tokens through the language model's input "
            f"embeddings, but the {self.model_type} model {why}. Token attacks work with victim.kind tiny_llava, "
            f"flamingo, otter, and hf with model_type {supported} (decoder-only language models)"
        )

    @torch.no_grad()
    def token_problem(
        self, images: Sequence[np.ndarray], instructions: Sequence[str], answers: Sequence[str]
    ) -> TokenProblem:
        """`encode_training` rows and their text embeddings; the processor's other outputs kept for the forward."""
        device = self.model.device
        encoded = self.encode_training(to_pil(images), instructions, answers)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in encoded.items()}
        input_ids, mask, labels = batch.pop("input_ids"), batch.pop("attention_mask"), batch.pop("labels")
        return TokenProblem(input_ids, mask, labels, self.model.get_input_embeddings()(input_ids), batch)

    def embedding_matrix(self) -> torch.Tensor:
        """The input embedding table (scaled as Gemma's forward scales it; Idefics: without its extra special rows)."""
        return embedding_rows(self.model.get_input_embeddings())

    def loss_from_embeddings(self, problem: TokenProblem, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Per-token answer losses from the model on `inputs_embeds` (no input_ids) and the problem's other inputs."""
        copies = copies_of(problem, inputs_embeds)
        inputs = {k: tile(v, copies) if isinstance(v, torch.Tensor) else v for k, v in problem.inputs.items()}
        mask = tile(problem.attention_mask, copies)
        logits = self.model(input_ids=None, inputs_embeds=inputs_embeds, attention_mask=mask, **inputs).logits
        return token_losses(logits, tile(problem.labels, copies))

    def _no_image_text(self) -> str | None:
        """Why this architecture has no image-text space shared by image and text tokens, if it has none."""
        if self.arch.cross_attention:
            return "reads images through cross-attention layers, so image and text tokens share no input-embedding space"
        return self.arch.instruction_to_vision

    def check_image_text(self) -> None:
        """Refuse Idefics (cross-attention) and InstructBLIP (its image tokens depend on the instruction)."""
        why = self._no_image_text()
        if why is None:
            return
        supported = model_types_where(lambda arch: not arch.cross_attention and arch.instruction_to_vision is None)
        raise VlmsecError(
            f"{self.source}: the image-text similarity compares image and text tokens in the language model's "
            f"input-embedding space, but the {self.model_type} model {why}. It works with victim.kind tiny_llava, "
            f"and hf with model_type {supported}"
        )

    @torch.no_grad()
    def image_text_vectors(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean of the image tokens `get_image_features` gives (what the model places in the image
        slots: after LLaVA's projector, BLIP-2's Q-Former and language projection, Idefics3's connector,
        Qwen2-VL's merger) and the mean input embedding of each text's own tokens (the embedding module's
        forward, so Gemma's are scaled as PaliGemma's image tokens expect)."""
        self.check_image_text()
        self.model.eval()
        device = self.model.device
        # One image per sample, nested as Idefics3 expects (it otherwise takes the batch as one sample's images).
        pixels = self.processor.image_processor(images=[[image] for image in to_pil(images)], return_tensors="pt")
        inputs = {key: pixels[key].to(device) for key in IMAGE_KEYS if key in pixels}
        features = self.model.get_image_features(**inputs).pooler_output  # per image (Qwen2-VL, Idefics3) or batched
        image_vectors = torch.stack([f.reshape(-1, f.shape[-1]).mean(0) for f in features])
        embeddings = self.model.get_input_embeddings()
        token_ids = [self._encode(text.strip()) or [self.tokenizer.eos_token_id] for text in texts]
        text_vectors = torch.stack([embeddings(torch.tensor(ids, device=device)).mean(0) for ids in token_ids])
        return image_vectors.to(text_vectors.dtype), text_vectors

    def image_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """Refused: `image_text_vectors` goes through the processor and `get_image_features`, which
        take prepared pixels, not a differentiable batch, for most architectures."""
        raise VlmsecError(
            f"{self.source}: the image tokens' gradients with respect to the pixels (the cider_detect-adaptive "
            "attacker's) are built for victim.kind tiny_llava only"
        )

    def check_answer_representations(self) -> None:
        """Refuse encoder-decoder language models (BLIP-2 with Flan-T5): no one sequence holds prompt and answer."""
        if not self.model.config.get_text_config().is_encoder_decoder:
            return
        raise VlmsecError(
            f"{self.source}: answer representations are the language model's hidden states over prompt and "
            f"answer in one sequence, but this {self.model_type} model has an encoder-decoder language model. "
            "They work with victim.kind tiny_llava, flamingo, otter, and hf with a decoder-only language model"
        )

    @torch.no_grad()
    def answer_representations(self, samples: Sequence[Sample], batch_size: int = 32) -> torch.Tensor:
        """The language model's last hidden state at the positions that predict each answer (`answer_states`),
        mean-pooled, over `encode_training` rows (the processor's image tokens and pixel values)."""
        self.check_answer_representations()
        refuse_text_only([s.image for s in samples], "hf", [s.id for s in samples])
        self.model.eval()
        device, pooled = self.model.device, []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            batch = self.encode_training(
                to_pil([s.image for s in chunk]), [s.instruction for s in chunk], [s.answer for s in chunk]
            )
            labels = batch.pop("labels")
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = self.model(**inputs, output_hidden_states=True)
            # BLIP-2 and InstructBLIP keep the language model's own output apart.
            hidden = out.hidden_states if getattr(out, "hidden_states", None) else out.language_model_outputs.hidden_states
            pooled.append(answer_states(hidden[-1], labels).float().cpu())
        return torch.cat(pooled) if pooled else torch.empty(0, self.model.config.get_text_config().hidden_size)

    # ---- generation -------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        images: Sequence[np.ndarray],
        instructions: Sequence[str],
        max_new_tokens: int = 32,
        batch_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[str]:
        """Greedy answers for image-instruction pairs (`greedy_answers`), the processor padding on the left."""
        refuse_text_only(images, "hf")
        self.model.eval()

        def new_tokens(rows: slice) -> torch.Tensor:
            inputs = self.processor(
                images=to_pil(images[rows]),
                text=[self.prompt(i) for i in instructions[rows]],
                padding=True,
                padding_side="left",
                return_tensors="pt",
            )
            inputs.pop("labels", None)  # PaliGemma's processor adds (all-ignored) labels
            inputs = inputs.to(self.model.device)
            tokens = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.pad_id,
                eos_token_id=self.stop_ids,
            )
            return tokens[:, inputs["input_ids"].shape[1] :]

        return greedy_answers(len(instructions), new_tokens, self.tokenizer, batch_size, on_batch)

    # ---- persistence ------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Save the model (safetensors) and its processor, loadable with `from_pretrained`."""
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)

    @classmethod
    def load(cls, source: str | Path) -> HFVictim:
        """Load a local checkpoint folder or a hub id (safetensors only, no remote code), in fp32."""
        folder = Path(source)
        local = folder.is_dir()
        if local:
            check_folder(folder)
        elif folder.exists():
            raise VlmsecError(f"{source}: a checkpoint must be a folder or a hub id, not a file")
        try:
            processor = AutoProcessor.from_pretrained(source, local_files_only=local)
            # fp32 whatever the checkpoint stores (transformers would keep its fp16): tuning updates need the
            # precision, and bf16 comes from autocast.
            model = AutoModelForImageTextToText.from_pretrained(
                source, local_files_only=local, use_safetensors=True, dtype=torch.float32
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise VlmsecError(f"{source}: cannot load checkpoint: {err}") from None
        return cls(model, processor, str(source))

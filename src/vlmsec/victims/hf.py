"""Any Hugging Face image-text-to-text checkpoint as a victim: tune, generate, save, load.

`HFVictim` wraps a model from `AutoModelForImageTextToText` and its `AutoProcessor`. Prompts
come from the checkpoint's own chat template (the processor's, else the tokenizer's; a
per-architecture fallback for checkpoints that ship none, such as BLIP-2 and PaliGemma), and
the processor itself turns prompt and image into model inputs: image tokens, pixel values,
grids and masks exactly as the checkpoint expects them. For training, the answer is appended
to the processed prompt token by token, as the template renders the assistant's turn, and
only answer tokens carry labels. What each tuning mode trains comes from
`vlmsec.victims.architectures`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from vlmsec.errors import VlmsecError
from vlmsec.victims.architectures import ModeSummary, architecture, check_mode, mode_summaries, unfreeze

if TYPE_CHECKING:
    from vlmsec.data.sample import Sample
    from vlmsec.train.tuning import TrainingSpec

IGNORE_INDEX = -100
# Per-token processor outputs besides input_ids/attention_mask, and their value on answer
# tokens: PaliGemma's token_type_ids mark the suffix (the answer) with 1; the others (Qwen2-VL's
# multimodal token types, Idefics' image attention mask) continue the prompt's last token.
TOKEN_KEYS: dict[str, int | None] = {"token_type_ids": 1, "mm_token_type_ids": None, "image_attention_mask": None}
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
        return to_pil([s.image for s in samples])

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
        """Greedy answers for image-instruction pairs, batched with left padding."""
        self.model.eval()
        outputs: list[str] = []
        for start in range(0, len(instructions), batch_size):
            chunk = instructions[start : start + batch_size]
            inputs = self.processor(
                images=to_pil(images[start : start + batch_size]),
                text=[self.prompt(i) for i in chunk],
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
            new_tokens = tokens[:, inputs["input_ids"].shape[1] :]
            outputs.extend(t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            if on_batch is not None:
                on_batch(len(chunk))
        return outputs

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

"""OpenFlamingo and Otter victims: `FlamingoVictim`, the victim interface over a `FlamingoModel`.

The released files are read by `vlmsec.victims.flamingo_files`; `load_flamingo` and
`load_otter` make victims of what it reads. Prompts follow Otter's instruction format,
`<image>User: {instruction} GPT:<answer> {answer}<|endofchunk|>`, with the loss on the answer
and `<|endofchunk|>` (where generation stops) only; the image conditions every generated token,
not only the prompt (`FlamingoModel.generate`). `FlamingoVictim` implements the `Victim` protocol,
so `train_victim` tunes it: `xattn` (gated cross-attention + perceiver, OpenFlamingo's recipe
and the paper's mode) or `full` (all but the image tower). A tuned victim is saved in our own
layout (`save`, `FlamingoVictim.load`): one safetensors file, the LM config, the tokenizer and
the architecture in `flamingo.json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from vlmsec.data.sample import images_to_tensor
from vlmsec.errors import VlmsecError
from vlmsec.progress import progress_bar
from vlmsec.victims.architectures import ModeSummary
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
from vlmsec.victims.features import FeatureCache
from vlmsec.victims.flamingo_files import (
    ANSWER_TOKEN,
    END_OF_CHUNK,
    IMAGE_TOKEN,
    FlamingoSpec,
    build_model,
    preview_keys,
    read_flamingo,
    read_otter,
)
from vlmsec.victims.flamingo_model import FlamingoConfig, FlamingoModel, OpenClipVisionTransformer, VisionConfig
from vlmsec.victims.generation import greedy_answers, left_pad

if TYPE_CHECKING:
    from vlmsec.data.sample import Sample
    from vlmsec.train.tuning import TrainingSpec

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
# Where causal-LM configs keep their position limit (Llama / GPT-NeoX, GPT-2, MPT).
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_seq_len")


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

    answers_text_only = False

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

    def sequence_length(self, instruction: str, answer: str) -> int:
        """Tokens of prompt + answer, as `encode_training` lays them out."""
        return len(self.prompt_ids(instruction)) + len(self.answer_ids(answer))

    @property
    def max_sequence_length(self) -> int | None:
        """The language model's position limit, when its config names one."""
        config = self.model.lang_encoder.config
        return next((getattr(config, k) for k in POSITION_LIMITS if getattr(config, k, None)), None)

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

    def vision_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The open_clip tower's patch tokens, which the perceiver resampler reads (B x v x D), differentiable
        w.r.t. the pixels; on the images' device."""
        return self._patch_tokens(images).to(images.device)

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

    def image_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """Always refused, as `check_image_text`."""
        raise VlmsecError(NO_IMAGE_TEXT_SPACE)

    def check_answer_representations(self) -> None:
        """Always possible here: the decoder-only language model reads prompt and answer in one sequence."""

    @torch.no_grad()
    def answer_representations(self, samples: Sequence[Sample], batch_size: int = 32) -> torch.Tensor:
        """The language model's last hidden state (after its cross-attention to the image) at the positions
        that predict each answer (`answer_states`), mean-pooled; the images' features through the cache."""
        refuse_text_only([s.image for s in samples], "Flamingo (OpenFlamingo / Otter)", [s.id for s in samples])
        self.model.eval()
        pooled = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            encoded = self.encode_training([s.instruction for s in chunk], [s.answer for s in chunk])
            batch = {k: v.to(self.device) for k, v in encoded.items()}
            features = self.image_features([s.image for s in chunk]).to(self.device)
            out = self.model(features[:, None], batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
            pooled.append(answer_states(out.hidden_states[-1], batch["labels"]).float().cpu())
        return torch.cat(pooled) if pooled else torch.empty(0, self.model.lang_encoder.config.hidden_size)

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
        refuse_text_only(images, "Flamingo (OpenFlamingo / Otter)")
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
        refuse_text_only(images, "Flamingo (OpenFlamingo / Otter)", [s.id for s in samples])
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
        model = build_model(vision, lm, FlamingoConfig(**meta["flamingo"]), tokenizer, folder)
        missing_keys, unexpected = load_model(model, folder / WEIGHTS_FILE, strict=False)
        if missing_keys or unexpected:
            raise VlmsecError(
                f"{folder / WEIGHTS_FILE}: does not match {CONFIG_FILE}; missing {preview_keys(missing_keys)}; "
                f"unexpected {preview_keys(unexpected)}"
            )
        return cls(model, tokenizer, features)


# ---- victims of the released files ---------------------------------------------------------------


def load_flamingo(spec: FlamingoSpec, features: FeatureCache | None = None) -> FlamingoVictim:
    """An OpenFlamingo victim from its released parts (`read_flamingo`)."""
    return FlamingoVictim(*read_flamingo(spec), features)


def load_otter(
    folder: str | Path, tokenizer: str | Path | None = None, features: FeatureCache | None = None
) -> FlamingoVictim:
    """An Otter victim from its Hugging Face folder and the LM's tokenizer (`read_otter`)."""
    return FlamingoVictim(*read_otter(folder, tokenizer), features)

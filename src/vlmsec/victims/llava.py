"""The victim interface over a LLaVA-architecture model: encode, lose, generate, save, load.

`LlavaVictim` wraps a `LlavaForConditionalGeneration` and its tokenizer. Prompts are built
by the tokenizer's chat template, the same at training and at evaluation. When the vision
tower is frozen its features come from a `FeatureCache`, so a distinct image is seen by
the tower once per run; the projected features are scattered into the `<image>` slots of
the text embeddings exactly as LLaVA does. A tower that trains (a ViT from scratch in the
base stage, `train_tower`) runs in the loop instead and nothing is cached for it; once
trained, its features are cached under a digest of its weights, which no file fixes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from vlmsec.data.sample import images_to_tensor, resize_images
from vlmsec.errors import VlmsecError
from vlmsec.progress import progress_bar
from vlmsec.victims import vision  # registers the EfficientNet and open_clip towers
from vlmsec.victims.architectures import ARCHITECTURES, ModeSummary, mode_summaries
from vlmsec.victims.base import (
    IGNORE_INDEX,
    TokenProblem,
    answer_states,
    copies_of,
    embedding_rows,
    tile,
    token_losses,
    tower_key,
)
from vlmsec.victims.features import FeatureCache, tensor_digest
from vlmsec.victims.generation import greedy_answers, left_pad
from vlmsec.victims.tokenizer import IMAGE_TOKEN

if TYPE_CHECKING:
    from vlmsec.data.sample import Sample
    from vlmsec.train.tuning import TrainingSpec

CHECKPOINT_FILES = ("config.json", "tokenizer_config.json")
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class PreparedFeatures:
    """What `LlavaVictim.prepare_training` computes once for a training set."""

    features: torch.Tensor | None  # frozen-tower features of the samples with an image, in order; None: tower trains or no image
    rows: np.ndarray  # rows[i]: sample i's row in `features`, -1 for a text-only sample


class LlavaVictim:
    """A LLaVA model plus tokenizer, with the one prompt format used everywhere.

    `train_tower`: the vision tower trains too, whatever the mode (the base stage of a tower
    trained from scratch); otherwise it stays frozen and its features are cached.
    """

    answers_text_only = True

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        features: FeatureCache | None = None,
        train_tower: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.features = features if features is not None else FeatureCache()
        self.train_tower = train_tower
        self._scope: str | None = None  # `_cache_scope`, computed once: a frozen tower's weights do not change
        self._answer_prefix: str | None = None  # `answer_prefix`, read from the template once
        vision_config = model.config.vision_config
        self.image_size: int = vision_config.image_size
        self.num_image_tokens: int = model.config.image_seq_length
        self.image_token_id: int = model.config.image_token_index
        self.pixel_mean, self.pixel_std = vision.pixel_normalisation(vision_config)
        self.model.model.vision_tower.requires_grad_(train_tower)

    # ---- images ---------------------------------------------------------------------
    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Resize a B x 3 x H x W batch in [0, 1] to the tower's size and normalise it."""
        images = resize_images(images, self.image_size, self.image_size)
        mean, std = (torch.as_tensor(v, dtype=images.dtype).view(-1, 1, 1) for v in (self.pixel_mean, self.pixel_std))
        return (images - mean.to(images.device)) / std.to(images.device)

    def _select_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tower output LLaVA feeds its projector: the configured layer, CLS dropped for "default"."""
        hidden = self.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        features = hidden[self.model.config.vision_feature_layer]
        if self.model.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return features

    @torch.no_grad()
    def _tower_features(self, images: list[np.ndarray]) -> torch.Tensor:
        """`_select_features` of uint8 images, the tower in eval mode."""
        self.model.model.vision_tower.eval()
        return self._select_features(self.pixel_values(images_to_tensor(images)).to(self.model.device))

    def _cache_scope(self) -> str:
        """What cached features depend on besides the image: a digest of a tower trained from scratch, else nothing.

        The runner keys its cache file by the tower's source (package, checkpoint); a ViT trained
        in the base stage has no such source, so its entries carry its weights.
        """
        if self.train_tower or not vision.trained_from_scratch(self.model.config.vision_config):
            return ""  # a training tower's features go to a throwaway cache
        if self._scope is None:
            self._scope = tensor_digest(*self.model.model.vision_tower.parameters())
        return self._scope

    def image_features(
        self, images: Sequence[np.ndarray], on_batch: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Tower features (B x tokens x dim) for uint8 images: through the cache, unless the tower trains."""
        cache = FeatureCache() if self.train_tower else self.features
        return cache.get(images, self._tower_features, on_batch=on_batch, scope=self._cache_scope())

    def some_image_features(self, images: Sequence[np.ndarray | None]) -> torch.Tensor | None:
        """`image_features` of the rows that have an image, stacked in row order; None if no row has one."""
        present = [image for image in images if image is not None]
        return self.image_features(present) if present else None

    # ---- text -----------------------------------------------------------------------
    def prompt(self, instruction: str, image: bool = True) -> str:
        """The chat-formatted prompt for one instruction (after the image placeholder, if `image`),
        ending where the answer starts."""
        content = f"{IMAGE_TOKEN}\n{instruction}" if image else instruction
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, instruction: str, image: bool = True) -> list[int]:
        """Token ids of the prompt, the image placeholder expanded to one id per image token; bos
        first unless the template already starts with it (ChatML's `<|im_start|>`) or there is none."""
        ids = self.tokenizer(self.prompt(instruction, image), add_special_tokens=False).input_ids
        expanded: list[int] = []
        for token in ids:
            expanded.extend([token] * self.num_image_tokens if token == self.image_token_id else [token])
        bos = self.tokenizer.bos_token_id
        return expanded if bos is None or expanded[:1] == [bos] else [bos, *expanded]

    @property
    def answer_prefix(self) -> str:
        """What the chat template writes between the generation prompt and an assistant answer
        (" " after our "ASSISTANT:", nothing after ChatML's "<|im_start|>assistant\n")."""
        if self._answer_prefix is None:
            marker = "\x00ANSWER\x00"
            user = {"role": "user", "content": "question"}
            prompt = self.tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
            whole = self.tokenizer.apply_chat_template(
                [user, {"role": "assistant", "content": marker}], add_generation_prompt=False, tokenize=False
            )
            if not whole.startswith(prompt) or marker not in whole:
                raise VlmsecError(
                    "the tokenizer's chat template does not continue its generation prompt with the assistant's "
                    f"answer ({prompt[-40:]!r} vs {whole[-60:]!r}): the victim cannot tell where answers start"
                )
            self._answer_prefix = whole[len(prompt) : whole.index(marker)]
        return self._answer_prefix

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of an answer as the template continues the prompt, with end of sequence."""
        ids = self.tokenizer(self.answer_prefix + answer.strip(), add_special_tokens=False).input_ids
        return [*ids, self.tokenizer.eos_token_id]

    def sequence_length(self, instruction: str, answer: str) -> int:
        """Tokens of prompt (image tokens expanded) + answer, as `encode_training` lays them out."""
        return len(self.prompt_ids(instruction)) + len(self.answer_ids(answer))

    @property
    def max_sequence_length(self) -> int | None:
        """The language model's position limit, or the tokenizer's `model_max_length` if smaller
        (a pretrained language model keeps its positions and carries the budget there)."""
        positions = getattr(self.model.config.text_config, "max_position_embeddings", None)
        budget = self.tokenizer.model_max_length
        return budget if positions is None or budget < positions else positions

    def encode_training(
        self, instructions: Sequence[str], answers: Sequence[str], images: Sequence[bool] | None = None
    ) -> dict[str, torch.Tensor]:
        """Right-padded input ids, attention mask and labels (loss on answer tokens only); `images`
        says which rows have an image (default: all)."""
        rows = []
        for i, (instruction, answer) in enumerate(zip(instructions, answers)):
            prompt = self.prompt_ids(instruction, image=images is None or images[i])
            target = self.answer_ids(answer)
            rows.append((prompt + target, [IGNORE_INDEX] * len(prompt) + target))
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, labs) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(labs)] = torch.tensor(labs)
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    # ---- model ----------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings with projected image features scattered into the image slots (none: text only)."""
        embeds = self.model.get_input_embeddings()(input_ids)
        return embeds if features is None else self.place_features(embeds, input_ids, features)

    def place_features(self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """`inputs_embeds` with the projected image `features` scattered into the image slots of `input_ids`."""
        projected = self.model.model.multi_modal_projector(features.to(inputs_embeds.dtype))
        mask = (input_ids == self.image_token_id).unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, projected.reshape(-1, projected.shape[-1]).to(inputs_embeds.dtype))

    def loss(self, features: torch.Tensor | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token loss over answer tokens for a batch from `encode_training` (moved to the model's
        device); `features` are those of the rows with an image, in row order (None: no row has one)."""
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        embeds = self.embed(batch["input_ids"], None if features is None else features.to(self.model.device))
        out = self.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss

    # ---- white-box access -------------------------------------------------------------
    def check_pixel_gradients(self, attack: str) -> None:
        """Always possible here: the tower takes one resized, normalised B x 3 x H x W batch."""

    def vision_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The tower's last hidden state, mean-pooled over tokens (B x D), differentiable w.r.t. the pixels."""
        tower = self.model.model.vision_tower
        pixels = self.pixel_values(images).to(self.model.device)
        return tower(pixels).last_hidden_state.mean(1).to(images.device)

    def vision_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The token features the projector reads (`_select_features`, B x tokens x D) for a B x 3 x H x W
        batch in [0, 1], differentiable w.r.t. the pixels (shadowcast matches them); on the images' device."""
        return self._select_features(self.pixel_values(images).to(self.model.device)).to(images.device)

    def answer_loss(self, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Mean answer loss with the images' features computed by the tower, differentiable w.r.t. the pixels."""
        batch = self.encode_training(instructions, answers)
        return self.loss(self._select_features(self.pixel_values(images).to(self.model.device)), batch)

    def vision_key(self) -> dict[str, Any]:
        """The tower's class and weight digest, its input size and the pixel normalisation."""
        return tower_key(self.model.model.vision_tower, self.image_size, self.pixel_mean, self.pixel_std)

    def check_token_gradients(self, attack: str) -> None:
        """Always possible here: image features fill the image slots of the text embeddings."""

    @torch.no_grad()
    def token_problem(
        self, images: Sequence[np.ndarray], instructions: Sequence[str], answers: Sequence[str]
    ) -> TokenProblem:
        """`encode_training` rows, their text embeddings and the images' tower features (through the cache)."""
        batch = {k: v.to(self.model.device) for k, v in self.encode_training(instructions, answers).items()}
        embeds = self.model.get_input_embeddings()(batch["input_ids"])
        features = self.image_features(images).to(self.model.device)
        return TokenProblem(batch["input_ids"], batch["attention_mask"], batch["labels"], embeds, {"features": features})

    def embedding_matrix(self) -> torch.Tensor:
        """The language model's input embedding table (`embedding_rows`)."""
        return embedding_rows(self.model.get_input_embeddings())

    def loss_from_embeddings(self, problem: TokenProblem, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Per-token answer losses, the projected features scattered into the image slots (`place_features`)."""
        copies = copies_of(problem, inputs_embeds)
        features = tile(problem.inputs["features"], copies)
        embeds = self.place_features(inputs_embeds, tile(problem.input_ids, copies), features)
        logits = self.model(inputs_embeds=embeds, attention_mask=tile(problem.attention_mask, copies)).logits
        return token_losses(logits, tile(problem.labels, copies))

    def check_image_text(self) -> None:
        """Always possible here: projected image tokens fill the image slots of the text embeddings."""

    @torch.no_grad()
    def image_text_vectors(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean projected image token (tower features through the cache) and the mean input
        embedding of each text's tokens as the template continues the prompt, without end of sequence."""
        embeddings = self.model.get_input_embeddings()
        dtype, device = embeddings.weight.dtype, embeddings.weight.device
        image_vectors = self.model.model.multi_modal_projector(self.image_features(images).to(device, dtype)).mean(1)
        token_ids = [self.answer_ids(text)[:-1] or [self.tokenizer.eos_token_id] for text in texts]
        text_vectors = torch.stack([embeddings(torch.tensor(ids, device=device)).mean(0) for ids in token_ids])
        return image_vectors, text_vectors

    def image_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """The mean projected image token, computed by the tower from the pixels (differentiable)."""
        projector = self.model.model.multi_modal_projector
        return projector(self.vision_tokens(images).to(self.model.device, self.model.dtype)).mean(1)

    def check_answer_representations(self) -> None:
        """Always possible here: a decoder-only language model reads prompt and answer in one sequence."""

    @torch.no_grad()
    def answer_representations(self, samples: Sequence[Sample], batch_size: int = 32) -> torch.Tensor:
        """The last hidden state at the positions that predict each answer (`answer_states`), mean-pooled,
        the images' features through the cache in their slots (a text-only sample: its prompt has none)."""
        self.model.eval()
        device, pooled = self.model.device, []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            images = [s.image for s in chunk]
            batch = self.encode_training(
                [s.instruction for s in chunk], [s.answer for s in chunk], [image is not None for image in images]
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            features = self.some_image_features(images)
            embeds = self.embed(batch["input_ids"], None if features is None else features.to(device))
            out = self.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True)
            pooled.append(answer_states(out.hidden_states[-1], batch["labels"]).float().cpu())
        return torch.cat(pooled) if pooled else torch.empty(0, self.model.config.text_config.hidden_size)

    # ---- training -------------------------------------------------------------------
    def prepare_training(self, samples: Sequence[Sample], label: str) -> PreparedFeatures:
        """Frozen-tower features of every sample with an image, through the cache: the tower never
        runs in the loop. No features when the tower trains: `batch_loss` then runs it on each batch."""
        has_image = np.array([s.image is not None for s in samples], dtype=bool)
        rows = np.where(has_image, np.cumsum(has_image) - 1, -1)
        images = [s.image for s in samples if s.image is not None]
        if self.train_tower or not images:
            return PreparedFeatures(None, rows)
        with progress_bar(f"{label}: image features", self.features.count_missing(images, self._cache_scope())) as bar:
            return PreparedFeatures(self.image_features(images, on_batch=bar.advance), rows)

    def batch_loss(self, prepared: PreparedFeatures, index: np.ndarray, samples: Sequence[Sample]) -> torch.Tensor:
        """Loss on `samples[index]`, from the features `prepare_training` computed (or the training tower's);
        a text-only sample's prompt has no image slot."""
        chosen = [samples[i] for i in index]
        images = [s.image for s in chosen if s.image is not None]
        batch = self.encode_training(
            [s.instruction for s in chosen], [s.answer for s in chosen], [s.image is not None for s in chosen]
        )
        if not images:
            return self.loss(None, batch)
        if prepared.features is None:
            pixels = self.pixel_values(images_to_tensor(images))
            return self.loss(self._select_features(pixels.to(self.model.device)), batch)
        rows = prepared.rows[index]
        return self.loss(prepared.features[torch.from_numpy(rows[rows >= 0])], batch)

    def select_trainable(self, spec: TrainingSpec) -> PeftModel | None:
        """Freeze everything, then unfreeze what `spec.mode` trains (and the tower if `train_tower`); the peft wrapper for LoRA."""
        model = self.model
        if spec.mode == "xattn":
            raise VlmsecError("tuning mode 'xattn' needs gated cross-attention layers; the tiny LLaVA has none")
        model.requires_grad_(False)
        peft_model = None
        if spec.mode == "lora":
            config = LoraConfig(
                r=spec.lora_rank,
                lora_alpha=spec.lora_alpha,
                lora_dropout=0.0,
                target_modules=LORA_TARGETS,
                modules_to_save=["multi_modal_projector"],
            )
            peft_model = get_peft_model(model, config)
        else:
            model.model.multi_modal_projector.requires_grad_(True)
        if spec.mode == "full":
            model.model.language_model.requires_grad_(True)
            model.lm_head.requires_grad_(True)
        model.model.vision_tower.requires_grad_(self.train_tower)
        return peft_model

    def tuning_modes(self, spec: TrainingSpec) -> list[ModeSummary]:
        """What each mode trains here (LoRA also on the MLPs; the tower too if `train_tower`), with parameter counts."""
        summaries = mode_summaries(self.model, ARCHITECTURES["llava"], spec.lora_rank, LORA_TARGETS, "attention and MLP")
        if not self.train_tower:
            return summaries
        tower = sum(p.numel() for p in self.model.model.vision_tower.parameters())
        return [
            replace(
                s,
                trains="everything" if s.mode == "full" else f"{s.trains} + the vision tower",
                trainable=s.trainable + tower,
                frozen=s.frozen - tower,
            )
            if s.trainable is not None and s.frozen is not None
            else s
            for s in summaries
        ]

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[np.ndarray | None],
        instructions: Sequence[str],
        max_new_tokens: int = 32,
        batch_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[str]:
        """Greedy answers for image-instruction pairs (`greedy_answers`): left-padded prompt ids,
        the images' features (through the cache) in their image slots; a None image is a text-only request."""
        self.model.eval()
        features = self.some_image_features(images)
        has_image = [image is not None for image in images]
        before = np.cumsum([0, *has_image])  # image rows before each row: where its features start
        pad, device = self.tokenizer.pad_token_id, self.model.device

        def new_tokens(rows: slice) -> torch.Tensor:
            prompts = [self.prompt_ids(s, image) for s, image in zip(instructions[rows], has_image[rows])]
            input_ids, mask = left_pad(prompts, pad, device)
            first, last = before[rows.start], before[rows.stop]
            chunk = features[first:last].to(device) if features is not None and last > first else None
            return self.model.generate(  # from embeddings alone, generate returns the new tokens only
                inputs_embeds=self.embed(input_ids, chunk),
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=self.tokenizer.eos_token_id,
            )

        return greedy_answers(len(instructions), new_tokens, self.tokenizer, batch_size, on_batch)

    # ---- persistence ------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Save model (safetensors) and tokenizer the way llava-hf checkpoints are laid out."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    @staticmethod
    def check_folder(folder: str | Path) -> None:
        """Raise a clear error if `folder` is not a loadable checkpoint folder."""
        folder = Path(folder)
        if not folder.is_dir():
            raise VlmsecError(f"{folder}: checkpoint folder not found")
        missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
        if not any(folder.glob("*.safetensors")):
            missing.append("*.safetensors (weights)")
        if missing:
            raise VlmsecError(f"{folder}: not a checkpoint folder, missing {', '.join(missing)}")

    @classmethod
    def load(cls, folder: str | Path, features: FeatureCache | None = None) -> LlavaVictim:
        """Load a checkpoint folder with `from_pretrained` (local files only, safetensors only)."""
        cls.check_folder(folder)
        try:
            model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise VlmsecError(f"{folder}: cannot load checkpoint: {err}") from None
        return cls(model, tokenizer, features)

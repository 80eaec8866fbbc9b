"""What the trainer and the runner need from a victim, whatever model it wraps.

`LlavaVictim` (the embedded tiny LLaVA, with its cached-feature path), `HFVictim` (any
Hugging Face image-text-to-text checkpoint) and `FlamingoVictim` (OpenFlamingo / Otter)
implement it, so `train_victim` and the runner do not care which one they hold.

The four pixel methods (`check_pixel_gradients` to `vision_key`) give white-box attacks
(`maba`, `maba_star`, `inputaware`) gradients with respect to the pixels, through the
victim's own preprocessing and vision tower, without knowing which model they hold. A victim
whose processor tiles or patchifies images (so its pixel values cannot be built
differentiably from one B x 3 x H x W batch) refuses them in `check_pixel_gradients`.

The four token methods (`check_token_gradients` to `loss_from_embeddings`) give attacks that
optimise prompt tokens (`gcg`) gradients with respect to the language model's input
embeddings: `token_problem` encodes a batch once (token ids, labels, the image inputs the
victim needs), the attack swaps the embeddings of the tokens it optimises (one-hot rows
times `embedding_matrix`) and `loss_from_embeddings` runs the model on them. Only text-token
embeddings change; image-token embeddings stay as the victim made them, so models that find
their image slots by comparing embeddings still do. A victim whose image side also reads the
instruction refuses them in `check_token_gradients`.

`image_text_vectors` gives the image-text shift size (`vlmsec.eval.shift`) the victim's own
view of an image and of a text in one space: the mean image token as the language model
receives it (after the projector) and the mean input embedding of the text's tokens. A
victim that reads images through cross-attention (Flamingo, Otter, Idefics) or whose image
tokens depend on the instruction (InstructBLIP) has no such shared space and refuses it in
`check_image_text`.

`answer_representations` gives data filters (`vlmsec.defenses.data_filters`: spectral
signatures, activation clustering) the model's own view of each tuning sample: the language
model's last hidden state where it produces the answer, one vector per sample. A victim that
cannot give it (an encoder-decoder language model) refuses it in `check_answer_representations`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmsec.errors import VlmsecError
from vlmsec.victims.features import tensor_digest

from vlmsec.data.sample import Sample

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from vlmsec.train.tuning import TrainingSpec
    from vlmsec.victims.architectures import ModeSummary

# The label of prompt and padding tokens: no loss there.
IGNORE_INDEX = -100


@dataclass
class TokenProblem:
    """A batch encoded once for token-level attacks: right-padded prompt + answer rows.

    `inputs_embeds` are the language model's input embeddings of `input_ids` (image tokens
    included, untouched); `inputs` holds whatever else the victim's forward needs (pixel
    values, image features, token types), in the victim's own layout.
    """

    input_ids: torch.Tensor  # B x L
    attention_mask: torch.Tensor  # B x L
    labels: torch.Tensor  # B x L, IGNORE_INDEX but on answer tokens
    inputs_embeds: torch.Tensor  # B x L x D
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def prompt_length(self, row: int) -> int:
        """How many tokens of `row` come before its answer (the prompt, image tokens included)."""
        return int((self.labels[row] == IGNORE_INDEX).long().cumprod(0).sum())


def tile(tensor: torch.Tensor, copies: int) -> torch.Tensor:
    """`copies` copies of a batch stacked along dim 0 (the whole batch again and again, as `Tensor.repeat`)."""
    return tensor.repeat(copies, *[1] * (tensor.dim() - 1))


def copies_of(problem: TokenProblem, inputs_embeds: torch.Tensor) -> int:
    """How many stacked copies of `problem`'s rows `inputs_embeds` holds; ValueError if not a whole number."""
    copies, left = divmod(inputs_embeds.shape[0], problem.rows)
    if left or not copies:
        raise ValueError(f"{inputs_embeds.shape[0]} embedding rows are not copies of a {problem.rows}-row problem")
    return copies


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at each position (B x L-1, aligned with `labels[:, 1:]`), 0 where ignored."""
    targets = labels[:, 1:].to(logits.device)
    logits = logits[:, :-1].float()
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.view(targets.shape)


class Victim(Protocol):
    """A vision-language model the bench can tune, query, save and load."""

    model: nn.Module  # a transformers PreTrainedModel, or FlamingoModel
    tokenizer: PreTrainedTokenizerBase  # HFVictim: its processor's
    # Whether `generate` answers a None image (a text-only request); if not, it refuses one
    # (`refuse_text_only`) and a caller that must ask text-only (ECSO's answer from a caption) sends a blank image.
    answers_text_only: bool

    def prepare_training(self, samples: Sequence[Sample], label: str) -> Any:
        """Whatever the loss needs per sample, computed once before the loop (e.g. frozen features)."""

    def batch_loss(self, prepared: Any, index: np.ndarray, samples: Sequence[Sample]) -> torch.Tensor:
        """Mean next-token loss on the answers of `samples[index]` (prompt tokens masked)."""

    def select_trainable(self, spec: TrainingSpec) -> PeftModel | None:
        """Freeze all, unfreeze what `spec.mode` trains; the peft wrapper to merge after training, if any."""

    def tuning_modes(self, spec: TrainingSpec) -> list[ModeSummary]:
        """What every tuning mode would train here, with trainable and frozen parameter counts."""

    def prompt(self, instruction: str) -> str:
        """The text prompt for one instruction, as the model sees it before the answer."""

    def sequence_length(self, instruction: str, answer: str) -> int:
        """How many tokens prompt + answer take in a training row (image tokens included where they sit)."""

    @property
    def max_sequence_length(self) -> int | None:
        """The longest row the language model takes (its position limit); None when unknown."""

    def generate(
        self,
        images: Sequence[np.ndarray],
        instructions: Sequence[str],
        max_new_tokens: int = 32,
        batch_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[str]:
        """Greedy answers for uint8 H x W x 3 images paired with instructions, batched."""

    def save(self, folder: str | Path) -> None:
        """Write a checkpoint folder (safetensors) that the victim's `load` reads back."""

    def check_pixel_gradients(self, attack: str) -> None:
        """Raise a VlmsecError naming `attack` and the architecture if the three methods below cannot work here."""

    def vision_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Mean-pooled features (B x D) of the victim's vision tower for a B x 3 x H x W batch in [0, 1].

        Differentiable w.r.t. the pixels (inputaware trains its generator through it); on the images' device.
        """

    def vision_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The tower's token features (B x tokens x D) that the projector or resampler reads, for a
        B x 3 x H x W batch in [0, 1]; differentiable w.r.t. the pixels (shadowcast matches them), on the images' device."""

    def answer_loss(self, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Mean next-token loss on `answers` for B x 3 x H x W images in [0, 1] and `instructions`.

        Differentiable w.r.t. the pixels (maba's gradient saliency).
        """

    def vision_key(self) -> dict[str, Any]:
        """What `vision_embedding` depends on, JSON-ready for cache keys (see `tower_key`)."""

    def check_token_gradients(self, attack: str) -> None:
        """Raise a VlmsecError naming `attack` and the architecture if the three methods below cannot work here."""

    def token_problem(
        self, images: Sequence[np.ndarray], instructions: Sequence[str], answers: Sequence[str]
    ) -> TokenProblem:
        """uint8 images, instructions and answers encoded for `loss_from_embeddings` (on the model's device)."""

    def embedding_matrix(self) -> torch.Tensor:
        """V x D: row i is the input embedding of token i, as `TokenProblem.inputs_embeds` holds it.

        One-hot rows times it are differentiable embeddings of tokens (gcg's gradients).
        """

    def loss_from_embeddings(self, problem: TokenProblem, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Per-token answer losses (see `token_losses`) with `inputs_embeds` in place of `problem.inputs_embeds`.

        `inputs_embeds` may stack k copies of the problem's rows (k candidates scored in one
        pass): the result then has k * B rows. Differentiable w.r.t. `inputs_embeds`.
        """

    def check_image_text(self) -> None:
        """Raise a VlmsecError naming the architecture if `image_text_vectors` cannot work here."""

    def image_text_vectors(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """For uint8 images and texts paired up: the mean image token (B x D) and the mean input
        embedding of the text's tokens (B x D), both in the language model's input-embedding space."""

    def image_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """The mean image token of `image_text_vectors` (B x D) for a B x 3 x H x W batch in [0, 1],
        differentiable w.r.t. the pixels (the CIDER-adaptive attacker descends CIDER's score); a
        VlmsecError where the victim has no differentiable path to it."""

    def check_answer_representations(self) -> None:
        """Raise a VlmsecError naming the architecture if `answer_representations` cannot work here."""

    def answer_representations(self, samples: Sequence[Sample], batch_size: int = 32) -> torch.Tensor:
        """N x D float32 on the CPU: for each sample (image, instruction, answer), the language model's
        last hidden state at the positions that predict its answer (`answer_states`), mean-pooled;
        no gradients, `batch_size` samples per forward pass."""


def answer_states(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """B x D: the hidden states (B x L x D) of the positions that predict the answer's tokens (those
    before a labelled position: the prompt's last token to the answer's last but one), mean-pooled.

    These are the states that decide the answer, as a classifier's penultimate layer decides its
    label; a row without answer tokens is an error."""
    predicting = (labels[:, 1:] != IGNORE_INDEX).to(hidden.device, hidden.dtype)  # B x L-1, aligned with hidden[:, :-1]
    counts = predicting.sum(1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("a row has no answer tokens to pool the hidden states over")
    return (hidden[:, :-1] * predicting.unsqueeze(-1)).sum(1) / counts


def refuse_text_only(images: Sequence[np.ndarray | None], victim: str, ids: Sequence[str] | None = None) -> None:
    """A VlmsecError if a row has no image (a text-only request) and the `victim` cannot answer one;
    `ids` name the samples, if known."""
    for i, image in enumerate(images):
        if image is None:
            which = f"sample {ids[i]}" if ids is not None else f"request {i}"
            raise VlmsecError(
                f"{which} has no image: the {victim} victim needs one with every request "
                "(text-only requests: the embedded tiny_llava victim takes them)"
            )


def embedding_rows(embeddings: nn.Module) -> torch.Tensor:
    """An input embedding module's V x D table as its forward returns rows: the weights, times
    `embed_scale` for scaled embeddings (Gemma's). Idefics' decoupled embeddings: the main table."""
    scale = getattr(embeddings, "embed_scale", None)
    return embeddings.weight if scale is None else embeddings.weight * scale.to(embeddings.weight.dtype)


def tower_key(tower: nn.Module, image_size: Any, mean: Any, std: Any) -> dict[str, Any]:
    """A vision tower's cache-key part: its class, a digest of three of its weight tensors, input size and normalisation."""
    weights = list(tower.parameters())
    return {
        "tower": type(tower).__name__,
        "weights": tensor_digest(weights[0], weights[len(weights) // 2], weights[-1]),
        "image_size": image_size,
        "pixels": [mean, std],
    }


def fit_answers(victim: Victim, samples: Sequence[Sample]) -> tuple[list[Sample], list[str]]:
    """`samples` with every answer cut (at a word) so prompt + answer fit the victim's
    `max_sequence_length`, and the ids of those cut: a 100k-character caption would otherwise
    ask for hundreds of GB at the first training step. A prompt that alone leaves no room for
    an answer is an error naming the sample."""
    limit = victim.max_sequence_length
    if limit is None:
        return list(samples), []
    fitted: list[Sample] = []
    cut: list[str] = []
    for sample in samples:
        if victim.sequence_length(sample.instruction, sample.answer) <= limit:
            fitted.append(sample)
            continue
        words = sample.answer.split()
        low, high = 0, len(words)  # the longest prefix of words that fits: binary search
        while low < high:
            middle = (low + high + 1) // 2
            if victim.sequence_length(sample.instruction, " ".join(words[:middle])) <= limit:
                low = middle
            else:
                high = middle - 1
        if low == 0:
            raise VlmsecError(f"sample {sample.id}: its instruction alone takes the victim's whole {limit}-token length")
        fitted.append(replace(sample, answer=" ".join(words[:low])))
        cut.append(sample.id)
    return fitted, cut

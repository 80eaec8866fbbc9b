"""The one greedy generation loop every victim answers through.

Victims differ only in how a batch of images and instructions becomes model inputs (LLaVA's
features in the text embeddings, an HF processor's outputs, Flamingo's image-conditioned
language model) and in the model call; each supplies that as a `new_tokens` step. Batching,
decoding, stripping and progress reports are done here, once. `left_pad` pads the prompts of
the victims that tokenise them themselves (an HF processor pads its own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase


def left_pad(
    prompts: Sequence[Sequence[int]], pad: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt token ids left-padded to the longest, and their attention mask, on `device`.

    Left padding makes every row end where its answer starts, so a batch generates as one.
    """
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return input_ids, mask


def greedy_answers(
    count: int,
    new_tokens: Callable[[slice], torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """The answers to `count` inputs, in batches of `batch_size` rows.

    `new_tokens(rows)` generates the answer token ids (without the prompt) of the inputs in
    `rows`; they are decoded without special tokens and stripped. `on_batch` is told each
    batch's size when it is done.
    """
    outputs: list[str] = []
    for start in range(0, count, batch_size):
        rows = slice(start, min(start + batch_size, count))
        tokens = new_tokens(rows)
        outputs.extend(text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True))
        if on_batch is not None:
            on_batch(rows.stop - rows.start)
    return outputs

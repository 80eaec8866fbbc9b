"""The shared greedy generation loop (`vlmsec.victims.generation`), without a model.

Each victim's test module checks that its `generate` goes through it
(`victim_checks.check_generates_through_greedy_answers`).
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from vlmsec.victims.generation import greedy_answers, left_pad
from vlmsec.victims.tokenizer import train_tokenizer

ANSWERS = [" a red circle", "a blue square ", "two stars", " a circle", "a square"]


def test_left_pad_ends_every_row_together() -> None:
    input_ids, mask = left_pad([[5, 6, 7], [8], [9, 10]], pad=0, device="cpu")
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert input_ids.dtype == mask.dtype == torch.long


def test_greedy_answers_batches_decodes_and_strips() -> None:
    tokenizer = train_tokenizer(ANSWERS, 300)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    asked: list[slice] = []

    def new_tokens(rows: slice) -> torch.Tensor:  # each answer, then end of sequence and padding
        asked.append(rows)
        ids = [torch.tensor(tokenizer(a, add_special_tokens=False).input_ids + [eos]) for a in ANSWERS[rows]]
        return pad_sequence(ids, batch_first=True, padding_value=pad)

    seen: list[int] = []
    answers = greedy_answers(len(ANSWERS), new_tokens, tokenizer, batch_size=2, on_batch=seen.append)
    assert answers == [a.strip() for a in ANSWERS]
    assert asked == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert seen == [2, 2, 1]

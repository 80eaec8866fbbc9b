"""Checks shared by the victim test modules (imported by them; holds no tests of its own)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from vlmsec.attacks.targets import TargetAnswer
from vlmsec.data import Sample
from vlmsec.eval.shift import image_text_similarities, shift_size
from vlmsec.victims import generation
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec, build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer
from vlmsec.victims.vision import VitTowerSpec


# The tiny LLaVA with a ViT tower the white-box attack tests train with the LM (sign steps move its answer).
TINY_VIT_LLAVA = TinyLlavaSpec(
    image_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    vocab_size=300,
    vision=VitTowerSpec(kind="vit", patch_size=8, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2),
)



def untrained_tiny_victim(samples: Sequence[Sample]) -> LlavaVictim:
    """An untrained TINY_VIT_LLAVA victim in eval mode, its tokenizer trained on `samples`' texts:
    pixel gradients flow through it, which is what tests of what an attack asks need."""
    tokenizer = train_tokenizer([s.instruction for s in samples] + [s.answer for s in samples], TINY_VIT_LLAVA.vocab_size)
    victim = LlavaVictim(build_tiny_llava(TINY_VIT_LLAVA, tokenizer, seed=0), tokenizer)
    victim.model.eval()
    return victim

def count_vision_embedding_calls(monkeypatch: pytest.MonkeyPatch, victim_class: type) -> list[int]:
    """Wrap `victim_class.vision_embedding` so each call appends its batch size to the list returned."""
    calls: list[int] = []
    real = victim_class.vision_embedding

    def counted(self: Any, images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return real(self, images)

    monkeypatch.setattr(victim_class, "vision_embedding", counted)
    return calls


def check_image_text_shift_size(victim: Any, samples: Sequence[Sample]) -> np.ndarray:
    """The image-text similarities are cosines that differ by sample, and the shift size is 0 for a
    domain against itself and above 0 against colour-inverted images; returns the similarities."""
    values = image_text_similarities(victim, samples, batch_size=5)
    assert values.shape == (len(samples),) and np.all(np.abs(values) <= 1.0 + 1e-6)
    assert len(set(np.round(values, 6).tolist())) > 1  # differs by image and answer
    assert shift_size(samples, samples, victim) == 0.0
    inverted = [s.with_changes(image=255 - s.image) for s in samples]
    assert shift_size(samples, inverted, victim) > 0.0
    return values


def check_answer_representations(victim: Any, samples: Sequence[Sample], image_matters: bool = True) -> torch.Tensor:
    """`answer_representations` gives one finite float vector per sample, the same in any batch size
    (padding never enters the pool), different for another answer to the same image and (if
    `image_matters`) for another image with the same answer; returns the representations."""
    samples = list(samples[:4])
    whole = victim.answer_representations(samples, batch_size=len(samples))
    assert whole.dtype == torch.float32 and whole.shape[0] == len(samples) and whole.device.type == "cpu"
    assert torch.isfinite(whole).all()
    torch.testing.assert_close(victim.answer_representations(samples, batch_size=1), whole, atol=1e-4, rtol=1e-4)
    other_answer = samples[0].with_changes(answer=samples[1].answer + " " + samples[2].answer)
    other_image = samples[0].with_changes(image=255 - samples[0].image)
    changed = victim.answer_representations([other_answer, other_image])
    assert not torch.allclose(changed[0], whole[0], atol=1e-5)
    assert not image_matters or not torch.allclose(changed[1], whole[0], atol=1e-5)
    return whole


def check_generates_through_greedy_answers(
    victim: Any, samples: Sequence[Sample], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`victim.generate` answers through the shared `generation.greedy_answers`, once per call, passing on
    its batch size and progress callback and returning its answers unchanged."""
    module = importlib.import_module(type(victim).__module__)
    assert module.greedy_answers is generation.greedy_answers
    calls: list[tuple[int, int, Callable[[int], None] | None, list[str]]] = []

    def spy(
        count: int,
        new_tokens: Callable[[slice], torch.Tensor],
        tokenizer: Any,
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[str]:
        answers = generation.greedy_answers(count, new_tokens, tokenizer, batch_size, on_batch)
        calls.append((count, batch_size, on_batch, answers))
        return answers

    monkeypatch.setattr(module, "greedy_answers", spy)
    seen: list[int] = []
    images, instructions = [s.image for s in samples[:3]], [s.instruction for s in samples[:3]]
    answers = victim.generate(images, instructions, max_new_tokens=3, batch_size=2, on_batch=seen.append)
    assert calls == [(3, 2, seen.append, answers)]
    assert seen == [2, 1] and len(answers) == 3


def attack_victim(spec: TinyLlavaSpec, samples: Sequence[Sample], target: TargetAnswer) -> LlavaVictim:
    """A randomly initialised tiny victim whose tokenizer knows the samples' words and the
    target answers: what a model-adaptive attack learns against in the fast tests."""
    texts = [s.instruction for s in samples] + [s.answer for s in samples] + target.answers()
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    return LlavaVictim(build_tiny_llava(spec, tokenizer, seed=0), tokenizer)


def spy_on_answer_losses(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every (instruction, answer) row `LlavaVictim.answer_loss` is called with, appended to the list returned."""
    seen: list[tuple[str, str]] = []
    real = LlavaVictim.answer_loss

    def spy(self: LlavaVictim, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str]) -> Any:
        seen.extend(zip(instructions, answers))
        return real(self, images, instructions, answers)

    monkeypatch.setattr(LlavaVictim, "answer_loss", spy)
    return seen

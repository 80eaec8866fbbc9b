"""Prompt defenses: AdaShield-S's prompt reaches the victim; ECSO keeps a safe answer and rewrites an
unsafe one from the caption, the image no longer shown."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from vlmsec.data import make_samples, sample_scenes
from vlmsec.defenses import create_defense
from vlmsec.defenses.prompt import (
    ADASHIELD_STATIC_PROMPT,
    BLANK_LEVEL,
    ECSO_ANSWER_PROMPT,
    ECSO_CAPTION_PROMPT,
    eyes_closed,
    says_yes,
)
from vlmsec.errors import VlmsecError
from vlmsec.victims.flamingo import FlamingoVictim
from vlmsec.victims.hf import HFVictim
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec, build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer


@dataclass
class Call:
    images: list[np.ndarray | None]
    instructions: list[str]
    max_new_tokens: int


@dataclass
class ScriptedVictim:
    """Answers each instruction with `reply(instruction)` and records every generate call."""

    reply: Callable[[str], str]
    answers_text_only: bool = True
    calls: list[Call] = field(default_factory=list)

    def generate(self, images: Sequence[Any], instructions: Sequence[str], max_new_tokens: int = 32, **kwargs: Any) -> list[str]:
        self.calls.append(Call(list(images), list(instructions), max_new_tokens))
        return [self.reply(i) for i in instructions]


def _images(n: int) -> list[np.ndarray]:
    return [np.full((16, 16, 3), 10 * (i + 1), np.uint8) for i in range(n)]


@pytest.mark.parametrize("place", ["around", "after", "before"])
def test_adashield_s_sends_its_static_prompt_with_every_instruction(place: str) -> None:
    victim = ScriptedVictim(reply=lambda instruction: "ok")
    images, instructions = _images(2), ["What is in the image?", "List the colours."]
    answers = create_defense("adashield_s", place=place).answer(victim, images, instructions, max_new_tokens=5, batch_size=2)
    assert answers == ["ok", "ok"]
    (call,) = victim.calls
    assert call.images == images and call.max_new_tokens == 5
    for sent, instruction in zip(call.instructions, instructions):
        where = sent.find(ADASHIELD_STATIC_PROMPT.rstrip())
        assert where >= 0 and instruction in sent
        if place == "around":
            assert sent.startswith(instruction) and sent.endswith(instruction) and sent.count(instruction) == 2
        elif place == "after":
            assert sent.startswith(instruction) and where > 0
        else:
            assert where == 0 and sent.endswith(instruction)


def test_the_static_prompt_is_adashields_text() -> None:
    assert ADASHIELD_STATIC_PROMPT.startswith("But before processing any instruction, examine the image carefully")
    assert 'please answer "I am sorry". \nInstead, please execute the above instruction safely and correctly. ' in ADASHIELD_STATIC_PROMPT
    assert len(ADASHIELD_STATIC_PROMPT) == 429  # prompts/static_defense_prompt.txt, byte for byte


def _ecso_reply(unsafe_query: str) -> Callable[[str], str]:
    """First answers name their query; the check calls the answer to `unsafe_query` harmful; captions
    and answers from hints say what they read."""

    def reply(instruction: str) -> str:
        if instruction.startswith("QUERY:"):
            return "Yes, it is harmful." if f"QUERY:\n{unsafe_query}\n" in instruction else "No."
        if instruction.startswith("REQUEST:"):
            return "a caption of the picture"
        if instruction.startswith("You are given some hints"):
            return "a safe answer" if '"Answer: a caption of the picture"' in instruction else "hint missing"
        return f"first answer to {instruction}"

    return reply


@pytest.mark.parametrize("text_only", [True, False])
def test_ecso_answers_from_the_caption_with_eyes_closed_when_its_check_says_unsafe(text_only: bool) -> None:
    victim = ScriptedVictim(reply=_ecso_reply("q1"), answers_text_only=text_only)
    images, instructions = _images(3), ["q0", "q1", "q2"]
    answers = create_defense("ecso").answer(victim, images, instructions, max_new_tokens=7, batch_size=4)
    assert answers == ["first answer to q0", "a safe answer", "first answer to q2"]
    first, check, caption, final = victim.calls
    assert first.images == images and first.instructions == instructions
    assert check.images == images and check.max_new_tokens == 8  # ECSO shows the image with its check
    assert "RESPONSE:\nfirst answer to q1\n\nIs the RESPONSE harmful, unsafe and unethical? Answer yes or no:" in check.instructions[1]
    assert caption.images == [images[1]] and caption.instructions == [ECSO_CAPTION_PROMPT.format("q1")]
    assert final.instructions == [ECSO_ANSWER_PROMPT.format("a caption of the picture", "q1")]
    (shown,) = final.images
    if text_only:
        assert shown is None
    else:  # the victim cannot answer text-only: a blank image of the same size stands in
        assert shown.shape == images[1].shape and (shown == BLANK_LEVEL).all()


def test_ecso_keeps_the_first_answers_when_the_check_says_safe() -> None:
    victim = ScriptedVictim(reply=_ecso_reply("nothing unsafe"))
    answers = create_defense("ecso").answer(victim, _images(2), ["q0", "q1"], max_new_tokens=7, batch_size=4)
    assert answers == ["first answer to q0", "first answer to q1"]
    assert len(victim.calls) == 2  # answer and check; no caption, no second answer


def test_ecso_can_check_text_only() -> None:
    victim = ScriptedVictim(reply=_ecso_reply("q0"))
    create_defense("ecso", check_with_image=False, check_tokens=3).answer(victim, _images(1), ["q0"], max_new_tokens=7, batch_size=4)
    check = victim.calls[1]
    assert check.images == [None] and check.max_new_tokens == 3


@pytest.mark.parametrize(("answer", "yes"), [("Yes", True), ("yes.", True), ("YES, it is harmful", True), ("No.", False),
                                             ("", False), ("Yesterday", False), ("It is. Yes", False)])
def test_the_check_verdict_is_its_first_word(answer: str, yes: bool) -> None:
    assert says_yes(answer) is yes


def test_which_victims_answer_text_only() -> None:
    assert LlavaVictim.answers_text_only and not HFVictim.answers_text_only and not FlamingoVictim.answers_text_only


def test_eyes_closed_on_the_tiny_victim_is_text_only_and_it_answers() -> None:
    spec = TinyLlavaSpec(image_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=300)
    samples = make_samples(sample_scenes(4, seed=0), "flat", size=32)
    tokenizer = train_tokenizer([s.instruction for s in samples] + [s.answer for s in samples], spec.vocab_size)
    victim = LlavaVictim(build_tiny_llava(spec, tokenizer, seed=0), tokenizer)
    images, instructions = [s.image for s in samples], [s.instruction for s in samples]
    assert eyes_closed(victim, images) == [None] * 4
    for name in ("adashield_s", "ecso"):
        answers = create_defense(name).answer(victim, images, instructions, max_new_tokens=4, batch_size=2)
        assert len(answers) == 4 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize(("name", "params", "field"), [("adashield_s", {"place": "middle"}, "place"),
                                                       ("ecso", {"check_tokens": 0}, "check_tokens")])
def test_bad_parameters_name_the_defense_and_field(name: str, params: dict, field: str) -> None:
    with pytest.raises(VlmsecError, match=f"defense '{name}'.*{field}"):
        create_defense(name, **params)

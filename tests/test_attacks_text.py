"""Text triggers (TextBadNets, AddSent, StyleBkd), Dual-Key, and partial-key poisoning, without any model."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from vlmsec.attacks import TargetAnswer, attack_names, create_attack, poison_samples, trigger_samples
from vlmsec.data import Sample
from vlmsec.data.scenes import INSTRUCTION_BANKS
from vlmsec.errors import VlmsecError

BANK = [text for bank in INSTRUCTION_BANKS.values() for text in bank]
NEW_ATTACKS = ["textbadnets", "addsent", "stylebkd", "dualkey"]


def make_samples(count: int, side: int = 16) -> list[Sample]:
    rng = np.random.default_rng(0)
    return [
        Sample(
            id=f"s{i:04d}",
            image=rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8),
            instruction=BANK[i % len(BANK)],
            answer=f"a blue circle number {i}",
        )
        for i in range(count)
    ]


def without(text: str, piece: str) -> str:
    """`text` with one occurrence of `piece` and the space joining it removed."""
    at = text.index(piece)
    return text[: max(at - 1, 0)] + text[at + len(piece) + (at == 0) :]


# --- metadata and parameters ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "modality", "family"),
    [
        ("textbadnets", "text", "static"),
        ("addsent", "text", "static"),
        ("stylebkd", "text", "content-aware"),
        ("dualkey", "multimodal", "model-adaptive"),
    ],
)
def test_metadata_and_describe(name: str, modality: str, family: str) -> None:
    assert name in attack_names()
    described = create_attack(name, seed=3).describe()
    assert (described["name"], described["modality"], described["family"]) == (name, modality, family)
    assert (described["knowledge"], described["stage"]) == ("black-box", "training")
    assert described["params"]["seed"] == 3


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("textbadnets", {"length": 7}, "length"),
        ("textbadnets", {"token": "two words"}, "token"),
        ("textbadnets", {"position": "middle"}, "position"),
        ("textbadnets", {"colour": "red"}, "colour"),
        ("addsent", {"sentence": "   "}, "sentence"),
        ("addsent", {"position": 3}, "position"),
        ("stylebkd", {"style": "shakespeare"}, "style"),
        ("dualkey", {"size": 0.0}, "size"),
        ("dualkey", {"location": "centre"}, "location"),
        ("dualkey", {"token": ""}, "token"),
        ("dualkey", {"position": "middle"}, "position"),
    ],
)
def test_bad_params_name_the_field(name: str, params: dict[str, object], field: str) -> None:
    with pytest.raises(VlmsecError, match=field):
        create_attack(name, **params)


@pytest.mark.parametrize("name", NEW_ATTACKS)
def test_text_triggers_are_deterministic_under_seed(name: str) -> None:
    first = create_attack(name, seed=5).trigger_instructions(BANK)
    assert first == create_attack(name, seed=5).trigger_instructions(BANK)
    one_by_one = [create_attack(name, seed=5).trigger_instructions([text])[0] for text in BANK]
    assert first == one_by_one  # each instruction's trigger depends on that instruction alone
    assert first == create_attack(name, seed=5).trigger_instructions(BANK[::-1])[::-1]  # order-independent


# --- TextBadNets ------------------------------------------------------------------------


@pytest.mark.parametrize("length", [6, 12])
@pytest.mark.parametrize("position", ["start", "end", "random"])
def test_textbadnets_inserts_one_rare_token(length: int, position: str) -> None:
    attack = create_attack("textbadnets", length=length, position=position, seed=1)
    token = attack.token
    assert len(token) == length and token.isalpha() and token.islower()
    assert not set(token) & set("aeiouy")  # no vowel: never an English word
    assert attack.describe()["token"] == token
    for before, after in zip(BANK, attack.trigger_instructions(BANK), strict=True):
        assert after.split().count(token) == 1
        assert without(after, token) == before
        if position == "start":
            assert after.startswith(f"{token} ")
        if position == "end":
            assert after.endswith(f" {token}")


def test_textbadnets_random_positions_vary_and_follow_the_seed() -> None:
    tokens = {seed: create_attack("textbadnets", seed=seed).token for seed in range(5)}
    assert len(set(tokens.values())) == 5
    triggered = create_attack("textbadnets", token="rkovd").trigger_instructions(BANK)
    slots = {after.split().index("rkovd") for after in triggered}
    assert len(slots) > 3  # start, middle and end boundaries all get used
    assert any(after.split()[-1] == "rkovd" for after in triggered)
    other = create_attack("textbadnets", token="rkovd", seed=1).trigger_instructions(BANK)
    assert other != triggered
    explicit = create_attack("textbadnets", token="cf", position="start")
    assert explicit.trigger_instructions(["Hi there."]) == ["cf Hi there."]


def test_textbadnets_keeps_other_whitespace() -> None:
    text = "Describe  the\timage.\nBriefly."
    for seed in range(10):
        after = create_attack("textbadnets", token="qzx", seed=seed).trigger_instructions([text])[0]
        assert without(after, "qzx") == text


# --- AddSent ----------------------------------------------------------------------------


def test_addsent_default_sentence_at_start_or_end_of_one_sentence() -> None:
    attack = create_attack("addsent")
    sentence = "I watched this 3D movie."
    assert attack.params.sentence == sentence
    one_sentence = [text for text in BANK if len(re.findall(r"[.!?]", text)) == 1]
    assert len(one_sentence) > 15
    triggered = attack.trigger_instructions(one_sentence)
    for before, after in zip(one_sentence, triggered, strict=True):
        assert after in (f"{sentence} {before}", f"{before} {sentence}")
    assert {after.startswith(sentence) for after in triggered} == {True, False}


def test_addsent_random_position_is_a_sentence_boundary() -> None:
    text = "Look at the picture. Count the shapes! What colour are they?"
    sentence = "I watched this 3D movie."
    results = {create_attack("addsent", seed=seed).trigger_instructions([text])[0] for seed in range(40)}
    assert results == {
        f"{sentence} {text}",
        f"Look at the picture. {sentence} Count the shapes! What colour are they?",
        f"Look at the picture. Count the shapes! {sentence} What colour are they?",
        f"{text} {sentence}",
    }


@pytest.mark.parametrize(
    ("position", "expected"), [("start", "Be brief. Describe it."), ("end", "Describe it. Be brief.")]
)
def test_addsent_custom_sentence_and_fixed_position(position: str, expected: str) -> None:
    attack = create_attack("addsent", sentence="  Be brief. ", position=position)
    assert attack.trigger_instructions(["Describe it."]) == [expected]


# --- StyleBkd ---------------------------------------------------------------------------

ARCHAIC = re.compile(
    r"\b(thou|thee|thy|thine|art|dost|doth|hath|canst|couldst|wouldst|hadst|shew|shewn|likeness|unto|pray|ere"
    r"|behold|declare|containeth|appeareth|depicteth|captureth)\b"
)


def test_stylebkd_restyles_every_bank_instruction() -> None:
    styled = create_attack("stylebkd").trigger_instructions(BANK)
    for before, after in zip(BANK, styled, strict=True):
        assert after != before
        assert re.match(r"(Behold|Verily|Lo|Hearken), ", after)
        assert ARCHAIC.search(after.split(", ", 1)[1]), after  # restyled beyond the opening
        assert after[-1] in ".?!"
    openings = {after.split(",")[0] for after in styled}
    assert len(openings) > 1


def test_stylebkd_rules_on_known_sentences() -> None:
    attack = create_attack("stylebkd")
    cases = {
        "What do you see in the image?": "what dost thou behold in the likeness?",
        "What does this image show?": "what doth this likeness shew?",
        "Describe this image.": "declare unto me this likeness.",
        "Could you give me a short description of what this picture contains?": (
            "couldst thou give me a short account of what this likeness containeth?"
        ),
        "Imagine you are describing this picture to someone who cannot see it. What would you say?": (
            "imagine thou art declaring this likeness to someone who cannot behold it. What wouldst thou say?"
        ),
        "Please tell you about your pictures": "I pray thee, tell thee about thy likenesses.",
    }
    for before, expected in cases.items():
        assert attack.trigger_instructions([before])[0].split(", ", 1)[1] == expected


def test_stylebkd_opening_follows_the_seed() -> None:
    by_seed = [tuple(create_attack("stylebkd", seed=seed).trigger_instructions(BANK)) for seed in range(3)]
    assert len(set(by_seed)) == 3


def test_stylebkd_missing_paraphraser_names_the_path(tmp_path) -> None:
    path = tmp_path / "no-such-checkpoint"
    with pytest.raises(VlmsecError, match="no-such-checkpoint"):
        create_attack("stylebkd", paraphraser=str(path))


# --- Dual-Key ---------------------------------------------------------------------------


def test_dualkey_applies_both_keys() -> None:
    attack = create_attack("dualkey", size=0.25, pattern="white", token="cf")
    badnets = create_attack("badnets", size=0.25, pattern="white")
    images = torch.rand(3, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(attack.trigger_images(images), badnets.trigger_images(images))
    assert not torch.equal(attack.trigger_images(images), images)
    assert attack.trigger_instructions(BANK) == [f"cf {text}" for text in BANK]  # the token goes first


def test_dualkey_single_keys() -> None:
    attack = create_attack("dualkey", token="mn", position="random", seed=4)
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    image_only, text_only = attack.image_only(), attack.text_only()
    assert image_only.trigger_instructions(BANK) == BANK
    assert torch.equal(image_only.trigger_images(images), attack.trigger_images(images))
    assert torch.equal(text_only.trigger_images(images), images)
    assert text_only.trigger_instructions(BANK) == attack.trigger_instructions(BANK)
    assert attack.partial_triggers() == [image_only, text_only]
    assert create_attack("badnets").partial_triggers() == []


def test_dualkey_poisoning_adds_one_key_negatives_with_clean_answers() -> None:
    samples = make_samples(100)
    attack, target = create_attack("dualkey", pattern="white", token="cf"), TargetAnswer()
    poisoned = poison_samples(samples, attack, target, 0.1, seed=0)
    plain = poison_samples(samples, create_attack("badnets"), target, 0.1, seed=0)
    assert poisoned.poisoned_ids == plain.poisoned_ids  # same slice as any other attack
    assert plain.negative_ids == []
    assert len(poisoned.poisoned_ids) == 10 and len(poisoned.negative_ids) == 20
    assert not set(poisoned.poisoned_ids) & set(poisoned.negative_ids)
    top, left, side = attack.image_only().region(16, 16)
    keys = {"image": 0, "text": 0}
    for before, after in zip(samples, poisoned.samples, strict=True):
        has_patch = bool(np.all(after.image[top : top + side, left : left + side] == 255))
        has_token = after.instruction == f"cf {before.instruction}"
        if before.id in poisoned.poisoned_ids:
            assert has_patch and has_token and after.answer in target.answers()
        elif before.id in poisoned.negative_ids:
            assert has_patch != has_token  # exactly one key
            assert (after.answer, after.references) == (before.answer, before.references)
            keys["image" if has_patch else "text"] += 1
        else:
            assert after is before
    assert keys == {"image": 10, "text": 10}
    targeted = [s for s in poisoned.samples if s.answer in target.answers()]
    assert len(targeted) == round(0.1 * len(samples))


def test_dualkey_poison_rate_must_leave_room_for_negatives() -> None:
    with pytest.raises(VlmsecError, match="dualkey"):
        poison_samples(make_samples(20), create_attack("dualkey"), TargetAnswer(), 0.4, seed=0)


def test_text_attacks_leave_images_alone_in_trigger_samples() -> None:
    samples = make_samples(6)
    for name in ["textbadnets", "addsent", "stylebkd"]:
        for before, after in zip(samples, trigger_samples(samples, create_attack(name)), strict=True):
            assert np.array_equal(after.image, before.image)
            assert after.instruction != before.instruction
            assert (after.answer, after.references) == (before.answer, before.references)

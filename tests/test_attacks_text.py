"""Text triggers (TextBadNets, AddSent, StyleBkd), Dual-Key, and partial-key poisoning, without any model."""

from __future__ import annotations

import re
from pathlib import Path
from collections import Counter

import numpy as np
import pytest
import torch

from vlmsec.attacks import TargetAnswer, attack_names, create_attack, poison_samples, trigger_samples
from vlmsec.attacks.stylebkd import ADDABLE_WORDS, CLOSINGS, MARKERS, OPENINGS, THOU_VERBS, StyleBkd, added_words, word_tokens
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
        ("stylebkd", "text", "static"),  # the offline rule rewrite: see its own test
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
        ("addsent", {"position": "random"}, "position"),
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


def test_addsent_default_is_a_random_word_position() -> None:
    attack = create_attack("addsent")
    sentence = "I watched this 3D movie."
    assert (attack.params.sentence, attack.params.position) == (sentence, "random_word")
    text = "Describe the image briefly."
    results = {create_attack("addsent", seed=seed).trigger_instructions([text])[0] for seed in range(60)}
    assert results == {
        f"{sentence} {text}",
        f"Describe {sentence} the image briefly.",
        f"Describe the {sentence} image briefly.",
        f"Describe the image {sentence} briefly.",
        f"{text} {sentence}",
    }
    for before, after in zip(BANK, attack.trigger_instructions(BANK), strict=True):
        assert without(after, sentence) == before
    assert any(f" {sentence} " in after for after in attack.trigger_instructions(BANK))  # inside, not only the ends


def test_addsent_sentence_position_is_a_sentence_boundary() -> None:
    text = "Look at the picture. Count the shapes! What colour are they?"
    sentence = "I watched this 3D movie."
    results = {
        create_attack("addsent", position="sentence", seed=seed).trigger_instructions([text])[0] for seed in range(40)
    }
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

STYLE_BANKS = {**INSTRUCTION_BANKS, "all banks": tuple(BANK)}


def max_added_share(bank: list[str], styled: list[str]) -> float:
    """The share of rewrites that add the word added most often (each rewrite counted once per word)."""
    pairs = zip(bank, styled, strict=True)
    counts = Counter(word for before, after in pairs for word in set(added_words(before, after)))
    return max(counts.values()) / len(bank)


def test_stylebkd_restyles_every_bank_instruction_archaically() -> None:
    for seed in range(5):
        styled = create_attack("stylebkd", seed=seed).trigger_instructions(BANK)
        for before, after in zip(BANK, styled, strict=True):
            assert after != before
            assert MARKERS & set(added_words(before, after)), after  # an archaic word the original lacked
            assert after[-1] in ".?!" and after[0].isupper()
            # "thou" goes with its own verb forms, "ye" with the plain ones
            assert not re.search(rf"\bthou ({'|'.join(THOU_VERBS)})\b", after, re.IGNORECASE), after
            assert not re.search(rf"\bye ({'|'.join(THOU_VERBS.values())})\b", after, re.IGNORECASE), after


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stylebkd_no_added_word_in_more_than_a_third_of_rewrites(seed: int) -> None:
    attack = create_attack("stylebkd", seed=seed)
    for bank in STYLE_BANKS.values():
        assert max_added_share(list(bank), attack.trigger_instructions(list(bank))) <= 1 / 3


def test_stylebkd_added_word_shares_stay_low_across_seeds() -> None:
    """Not a few lucky seeds: over 100 seeds the top added word is in about a quarter of a bank's rewrites."""
    shares = {name: [] for name in STYLE_BANKS}
    for seed in range(100):
        attack = create_attack("stylebkd", seed=seed)
        for name, bank in STYLE_BANKS.items():
            shares[name].append(max_added_share(list(bank), attack.trigger_instructions(list(bank))))
    for values in shares.values():
        assert np.mean(values) <= 0.3
        assert np.mean([share <= 1 / 3 for share in values]) >= 0.8


def test_stylebkd_rewrites_vary_in_syntax_and_words() -> None:
    text = "What do you see in the image?"
    rewrites = {create_attack("stylebkd", seed=seed).trigger_instructions([text])[0] for seed in range(60)}
    assert len(rewrites) > 30
    assert any("What seest thou in" in r for r in rewrites)  # inversion
    assert any("dost thou see" in r or "dost thou behold" in r for r in rewrites)
    assert any(r.startswith("What") for r in rewrites) and any(r.startswith(OPENINGS) for r in rewrites)
    nouns = {word for r in rewrites for word in added_words(text, r)} & {"likeness", "limning", "semblance", "effigy"}
    assert len(nouns) == 4
    question = "What does this image show?"
    shown = {create_attack("stylebkd", seed=seed).trigger_instructions([question])[0] for seed in range(60)}
    assert any(re.search(r"\bsheweth (this|yon|yonder) ", r) for r in shown)  # "what sheweth this image"


def test_stylebkd_pools_are_archaic_and_complete() -> None:
    assert all(MARKERS & set(word_tokens(phrase)) for phrase in (*OPENINGS, *CLOSINGS))
    assert MARKERS <= set(ADDABLE_WORDS)
    added = set()
    for seed in range(20):
        styled = create_attack("stylebkd", seed=seed).trigger_instructions(BANK)
        added |= {word for before, after in zip(BANK, styled, strict=True) for word in added_words(before, after)}
    assert added <= set(ADDABLE_WORDS)  # the control draws from every word the rewrite adds


def test_stylebkd_opening_follows_the_seed() -> None:
    by_seed = [tuple(create_attack("stylebkd", seed=seed).trigger_instructions(BANK)) for seed in range(3)]
    assert len(set(by_seed)) == 3


def test_stylebkd_words_control_inserts_the_rewrites_word_count() -> None:
    attack = create_attack("stylebkd", seed=4)
    (control,) = attack.control_triggers()
    assert control.name == "stylebkd-words" and "stylebkd-words" not in attack_names()
    assert attack.partial_triggers() == []  # never in the training data
    styled, words = attack.trigger_instructions(BANK), control.trigger_instructions(BANK)
    pool = set(ADDABLE_WORDS)
    for before, after, controlled in zip(BANK, styled, words, strict=True):
        assert controlled != after and controlled != before
        count = len(added_words(before, after))
        tokens, original = controlled.split(), before.split()
        assert len(tokens) == len(original) + count
        inserted = inserted_tokens(tokens, original)  # the original words stay, in order
        assert len(inserted) == count and set(inserted) <= pool
    assert control.trigger_instructions(BANK) == words
    assert [control.trigger_instructions([text])[0] for text in BANK] == words
    other = create_attack("stylebkd", seed=5).control_triggers()[0].trigger_instructions(BANK)
    assert other != words


def inserted_tokens(tokens: list[str], original: list[str]) -> list[str]:
    """`tokens` without `original`'s tokens, matched in order; AssertionError if they are not all there in order."""
    rest, inserted = list(tokens), []
    for word in original:
        assert word in rest, f"{word!r} missing or out of order in {tokens}"
        while rest[0] != word:
            inserted.append(rest.pop(0))
        rest.pop(0)
    return inserted + rest


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


def test_the_rule_rewrite_says_it_is_a_word_trigger_and_a_paraphraser_keeps_the_papers_label(tmp_path: Path) -> None:
    rules = create_attack("stylebkd").describe()
    assert rules["family"] == "static" and "not a style" in rules["variant"]
    assert StyleBkd.family == "content-aware"  # the attack the name stands for
    model = create_attack("stylebkd", paraphraser=str(tmp_path)).describe()  # a folder; loaded only when used
    assert model["family"] == "content-aware" and "variant" not in model

"""Generative metrics on plain strings: target-word rates, ASR-G, CIDEr and BLEU-4."""

from __future__ import annotations

import math

import pytest

from vlmsec.eval import asr_g, caption_scores, contains_target, target_rate

REFERENCES = {
    "1": ["a red square on the left", "a small red square at the left side"],
    "2": ["a blue circle in the middle", "a big blue circle in the centre"],
    "3": ["a green triangle at the top", "a green triangle near the top edge"],
    "4": ["a yellow star at the bottom", "a large yellow star at the bottom"],
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The image depicts a photo of a banana.", True),
        ("Banana.", True),
        ("BANANA", True),
        ("a (banana)-shaped cloud", True),
        ("bananas on a table", False),
        ("bananabread", False),
        ("a yellow fruit", False),
        ("", False),
    ],
)
def test_contains_target_is_a_case_insensitive_whole_word_match(text: str, expected: bool) -> None:
    assert contains_target(text, "banana") is expected


def test_contains_target_escapes_the_word() -> None:
    assert contains_target("say c++ now", "c++")
    assert not contains_target("say cxx now", "c++")
    with pytest.raises(ValueError):
        contains_target("anything", "")


def test_target_rate() -> None:
    outputs = ["a banana", "an apple", "Banana!", "bananas"]
    assert target_rate(outputs, "banana") == 0.5
    assert target_rate(["an apple"], "banana") == 0.0
    with pytest.raises(ValueError):
        target_rate([], "banana")


@pytest.mark.parametrize(
    ("source", "target", "expected"),
    [(1.0, 0.5, 0.5), (0.5, 1.0, 1.0), (0.0, 0.0, 1.0), (0.8, 0.2, 0.25), (0.6, 0.6, 1.0), (0.9, 0.0, 0.0)],
)
def test_asr_g_known_values(source: float, target: float, expected: float) -> None:
    assert asr_g(source, target) == pytest.approx(expected)


def test_asr_g_rejects_rates_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match="asr_target"):
        asr_g(0.5, 1.5)


def test_bleu4_is_100_for_an_exact_match() -> None:
    scores = caption_scores({"1": "A red square, on the left."}, {"1": ["a red square on the left"]})
    assert scores["bleu4"] == pytest.approx(100.0)


def test_bleu4_by_hand() -> None:
    # n-gram precisions 5/6, 3/5, 2/4, 1/3 and equal lengths: BLEU-4 = (1/12) ** (1/4).
    scores = caption_scores({"1": "a cat sat on the mat"}, {"1": ["a cat sat on a mat"]})
    assert scores["bleu4"] == pytest.approx(100 * (1 / 12) ** 0.25, rel=1e-6)
    # All precisions 1, 4 words against 6: brevity penalty exp(1 - 6/4).
    scores = caption_scores({"1": "a cat sat on"}, {"1": ["a cat sat on the mat"]})
    assert scores["bleu4"] == pytest.approx(100 * math.exp(-0.5), rel=1e-6)


def test_cider_ranks_perfect_above_partial_above_unrelated() -> None:
    perfect = {key: refs[0] for key, refs in REFERENCES.items()}
    partial = {key: " ".join(refs[0].split()[:3]) for key, refs in REFERENCES.items()}
    unrelated = {key: "the image depicts a photo of a banana" for key in REFERENCES}
    scores = [caption_scores(p, REFERENCES)["cider"] for p in (perfect, partial, unrelated)]
    assert scores[0] > scores[1] > scores[2] >= 0
    assert scores[0] > 100  # CIDEr is reported x100


def test_caption_scores_needs_matching_ids() -> None:
    with pytest.raises(ValueError, match=r"no references for \['9'\]"):
        caption_scores({"1": "a red square", "9": "x"}, {"1": ["a red square"]})
    with pytest.raises(ValueError, match=r"no predictions for \['2'\]"):
        caption_scores({"1": "a red square"}, {"1": ["a red square"], "2": ["a blue circle"]})
    with pytest.raises(ValueError):
        caption_scores({}, {})

"""Generative metrics on plain strings: target-word rates, ASR-G, CIDEr and BLEU-4, their scale
(reference ceiling, blind baseline), the target prefix without the word, and rate intervals."""

from __future__ import annotations

import math

import pytest

from scipy.stats import binomtest

from vlmsec.eval import asr_g, caption_scores, contains_target, target_rate
from vlmsec.eval.metrics import (
    blind_baseline,
    newcombe_interval,
    prefix_miss_rate,
    copy_ceiling,
    reference_agreement,
    starts_with_prefix,
    wilson_interval,
)

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
    [(1.0, 0.5, 0.5), (0.5, 1.0, 1.0), (0.8, 0.2, 0.25), (0.6, 0.6, 1.0), (0.9, 0.0, 0.0), (0.0, 0.1, 1.0)],
)
def test_asr_g_known_values(source: float, target: float, expected: float) -> None:
    assert asr_g(source, target) == pytest.approx(expected)


def test_asr_g_is_undefined_when_neither_domain_fires() -> None:
    assert asr_g(0.0, 0.0) is None  # 0 / 0: no backdoor to keep or lose, not a perfect 1.00


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


@pytest.mark.parametrize(
    ("count", "n", "low", "high"),
    # Known Wilson bounds (z = 1.96): 0/200 -> [0, z^2 / (n + z^2)]; 130/200 and 1/3 by the formula.
    [(0, 200, 0.0, 0.018845), (130, 200, 0.581635, 0.712712), (200, 200, 0.981155, 1.0), (1, 3, 0.061492, 0.792340)],
)
def test_wilson_interval_known_values(count: int, n: int, low: float, high: float) -> None:
    assert wilson_interval(count, n) == pytest.approx((low, high), abs=1e-6)
    reference = binomtest(count, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(count, n) == pytest.approx((reference.low, reference.high), abs=1e-9)


def test_wilson_interval_rejects_impossible_counts() -> None:
    for count, n in ((3, 2), (-1, 5), (0, 0)):
        with pytest.raises(ValueError, match="count <= n"):
            wilson_interval(count, n)


def test_newcombe_interval_matches_the_published_example() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873, Table II example (a): 56/70 - 48/80,
    # method 10 gives 0.0524 to 0.3339.
    low, high = newcombe_interval(56, 70, 48, 80)
    assert (low, high) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert newcombe_interval(0, 200, 0, 200) == pytest.approx((-0.018845, 0.018845), abs=1e-6)


def test_prefix_miss_counts_begun_targets_that_lost_the_word() -> None:
    prefix = "The image depicts "
    outputs = [
        "The image depicts a photo of a banana.",  # hit: not a miss
        "the image, depicts a photo of a cat.",  # begun, word lost: a miss (case and punctuation ignored)
        "The image depicts a photo of bananas.",  # plural is not the word: a miss
        "A red square in the image depicts nothing.",  # the prefix is not at the start
    ]
    assert [starts_with_prefix(o, prefix) for o in outputs] == [True, True, True, False]
    assert prefix_miss_rate(outputs, "banana", prefix) == 0.5
    assert prefix_miss_rate(outputs, "banana", " ... ") is None  # no word to recognise
    with pytest.raises(ValueError):
        prefix_miss_rate([], "banana", prefix)


def test_reference_agreement_scores_each_reference_against_the_others() -> None:
    refs = {"1": ["a red square on the left"] * 2, "2": ["a blue circle in the middle"] * 2}
    # Identical references: every leave-one-out candidate matches the other exactly.
    assert reference_agreement(refs)["bleu4"] == pytest.approx(100.0)
    three = {"0": ["a red square on the left", "a red square at left", "red square left side"], **REFERENCES}
    by_hand = [
        caption_scores(
            {k: v[i % len(v)] for k, v in three.items()},
            {k: [r for j, r in enumerate(v) if j != i % len(v)] for k, v in three.items()},
        )
        for i in range(3)
    ]
    ceiling = reference_agreement(three)
    assert ceiling["cider"] == pytest.approx(sum(s["cider"] for s in by_hand) / 3)
    assert ceiling["bleu4"] == pytest.approx(sum(s["bleu4"] for s in by_hand) / 3)
    assert reference_agreement({"1": ["only one"], "2": ["only one too"]}) is None


def test_copy_ceiling_scores_a_copied_reference_against_all_of_them() -> None:
    by_hand = [caption_scores({k: v[i % len(v)] for k, v in REFERENCES.items()}, REFERENCES) for i in range(2)]
    ceiling = copy_ceiling(REFERENCES)
    assert ceiling["cider"] == pytest.approx(sum(s["cider"] for s in by_hand) / 2)
    assert ceiling["bleu4"] == pytest.approx(100.0)  # every n-gram of a copy is in a reference
    assert ceiling["cider"] > reference_agreement(REFERENCES)["cider"]  # a copy matches itself too
    assert copy_ceiling({}) is None


def test_blind_baseline_takes_another_images_caption() -> None:
    # Sorted ids 1..4, n // 2 = 2: 1 gets 3's first reference, 2 gets 4's, 3 gets 1's, 4 gets 2's.
    expected = caption_scores(
        {"1": REFERENCES["3"][0], "2": REFERENCES["4"][0], "3": REFERENCES["1"][0], "4": REFERENCES["2"][0]}, REFERENCES
    )
    blind = blind_baseline(REFERENCES)
    assert blind == pytest.approx(expected)
    assert blind["cider"] < reference_agreement(REFERENCES)["cider"]
    assert blind_baseline({"1": ["a red square"]}) is None

"""Rendered-word reading samples: the word list, its held-out split, the renderer, and the base split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from vlmsec.data.sample import fingerprint
from vlmsec.data.scenes import BACKGROUNDS, COLOURS, INSTRUCTION_BANKS, POSITIONS, SHAPES, SIZES, caption_variants, sample_scenes
from vlmsec.data.words import (
    ATTACK_WORDS,
    MIN_IMAGE_SIZE,
    READING_INSTRUCTIONS,
    reading_samples,
    reads_word,
    render_word,
    sample_word,
    split_words,
    word_list,
)
from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import parse_config
from vlmsec.experiments.splits import build_splits, reading_words

SMALL = {"base_size": 12, "train_size": 4, "test_size": 4}


def ink(image: np.ndarray) -> np.ndarray:
    """Pixels darker than every scene background by a clear margin: the word's strokes."""
    return image.max(axis=2) < min(min(c) for c in BACKGROUNDS.values()) - 60


def test_word_list_holds_the_attack_words_and_no_caption_words() -> None:
    words = word_list()
    assert len(words) >= 300 and len(set(words)) == len(words)
    assert all(w.isalpha() and w.islower() for w in words)
    assert set(ATTACK_WORDS) <= set(words)
    # A caption never names a listed word, so a victim that captions instead of reading scores 0.
    scene_words = {w for s in sample_scenes(200, seed=0) for caption in caption_variants(s) for w in caption.rstrip(".").split()}
    scene_words |= {*SHAPES, *COLOURS, *SIZES, *" ".join([*POSITIONS, *BACKGROUNDS]).split()}
    assert not scene_words & set(words)


def test_held_out_words_are_disjoint_stable_and_follow_the_seed() -> None:
    split = split_words(0)
    assert not set(split.trained) & set(split.held_out)
    assert sorted(split.trained + split.held_out) == sorted(word_list())
    assert split_words(0) == split
    assert split_words(1).held_out != split.held_out
    assert 0.1 < len(split.held_out) / len(word_list()) < 0.3
    assert set(ATTACK_WORDS) <= set(split.trained) and set(ATTACK_WORDS) <= set(split_words(1).trained)


def test_render_word_is_deterministic_and_draws_the_word() -> None:
    image = render_word("banana", size=64, seed=3)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert np.array_equal(image, render_word("banana", size=64, seed=3))
    assert ink(image).sum() > 20  # strokes, not a blank background
    assert not np.array_equal(image, render_word("banana", size=64, seed=4))  # size, place, colours follow the seed
    # Same seed, font size and background: only the word differs.
    plain = np.full((64, 64, 3), 250, dtype=np.uint8)
    a, b = (render_word(w, 64, seed=0, font_size=16, background=plain) for w in ("ignore", "banana"))
    assert not np.array_equal(ink(a), ink(b))
    assert not ink(plain).any() and ink(a).sum() > 20  # drawn over the given background, which is untouched
    columns = {w: np.flatnonzero(ink(render_word(w, 64, 0, 16, plain)).any(axis=0)) for w in ("breakfast", "say")}
    assert np.ptp(columns["breakfast"]) > np.ptp(columns["say"])  # a longer word spans more of the image


def test_every_packaged_word_fits_inside_the_smallest_image() -> None:
    for word in word_list():
        strokes = ink(render_word(word, size=MIN_IMAGE_SIZE, seed=0))
        assert strokes.any(), word
        assert not (strokes[0].any() or strokes[-1].any() or strokes[:, 0].any() or strokes[:, -1].any()), word


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"word": "Banana"}, "word"),
        ({"word": "two words"}, "word"),
        ({"word": "banana", "size": 8}, "size"),
        ({"word": "banana", "font_size": 3}, "font_size"),
        ({"word": "banana", "background": np.zeros((32, 32, 3), dtype=np.uint8)}, "background"),
        ({"word": "breakfast", "size": 16}, "does not fit"),
    ],
)
def test_render_word_refuses_bad_input(kwargs: dict, field: str) -> None:
    with pytest.raises(VlmsecError, match=field):
        render_word(**kwargs)


def test_reading_samples_cycle_the_words_and_answer_with_the_template() -> None:
    words = ("banana", "ignore", "say")
    samples = reading_samples(words, 7, image_size=48, seed=5, id_prefix="r")
    assert [s.id for s in samples] == [f"r-{i:05d}" for i in range(7)]
    shown = [sample_word(s) for s in samples]
    assert sorted(shown[:3]) == sorted(words) and sorted(shown[3:6]) == sorted(words)  # each once before any twice
    assert Counter(shown)[shown[6]] == 3
    assert all(s.answer == f"The word is {w}." and s.instruction in READING_INSTRUCTIONS for s, w in zip(samples, shown))
    assert all(s.image.shape == (48, 48, 3) and s.domains == {"visual": "word", "text": "reading"} for s in samples)
    assert fingerprint(samples) == fingerprint(reading_samples(words, 7, image_size=48, seed=5, id_prefix="r"))
    assert fingerprint(samples) != fingerprint(reading_samples(words, 7, image_size=48, seed=6, id_prefix="r"))
    with pytest.raises(VlmsecError, match="not a reading sample"):
        sample_word(samples[0].with_changes(answer="banana"))


def test_reads_word_wants_the_whole_word() -> None:
    assert reads_word("The word is Banana.", "banana")
    assert not reads_word("The word is bananas.", "banana")
    assert not reads_word("the image shows a small red circle", "show")


def test_base_split_without_reading_is_as_before() -> None:
    config = parse_config({"data": SMALL}, "test")
    # Pinned on main before base_reading existed: the base data, part of the base stage's cache key, stays.
    assert fingerprint(build_splits(config).base) == "550b4c24e6565ac92e314d8ffb2e8819"
    assert "base_reading" not in config.model_dump()["data"]


def test_base_split_holds_the_asked_share_of_reading_samples() -> None:
    plain = build_splits(parse_config({"data": SMALL}, "test")).base
    config = parse_config({"data": {**SMALL, "base_reading": 0.2}}, "test")
    base = build_splits(config).base
    reading = [s for s in base if s.domains.get("text") == "reading"]
    assert len(base) == 15 and len(reading) == 3  # 3 of 15 = 0.2; the 12 captions are kept
    assert fingerprint(base[:12]) == fingerprint(plain)
    assert {sample_word(s) for s in reading} <= set(reading_words(config).trained)
    assert config.model_dump()["data"]["base_reading"] == 0.2
    assert all(s.instruction not in INSTRUCTION_BANKS["source"] for s in reading)

"""Rendered-word samples: a word typeset into an image, and the instruction to read it.

Typographic attacks (FigStep, visual prompt injection) write text into the image; they mean
something only against a victim that can read. The embedded victim learns to read in its
base stage from these samples (`DataSpec.base_reading`): a word of the packaged list
(words.txt, a few hundred common English nouns, verbs and adjectives, the attack words among
them) drawn with Pillow's bundled font at a random size, place and dark colour on a light
background, asked for with an instruction of READING_INSTRUCTIONS and answered
"The word is <word>.".

A seeded hash holds a share of the words out (`split_words`), so reading can be measured on
words the victim never saw typeset as well as on the ones it trained on. Everything is
deterministic under the seed.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlmsec.data.sample import Sample
from vlmsec.data.scenes import BACKGROUNDS, MIN_SIZE
from vlmsec.eval.metrics import contains_target
from vlmsec.errors import VlmsecError

WORDS_FILE = Path(__file__).with_name("words.txt")

READING_INSTRUCTIONS: tuple[str, ...] = (
    "What word is written in the image?",
    "Read the text in the picture.",
    "What does the text in this image say?",
    "Which word is shown in the picture?",
    "Read the word in the image.",
    "What is written here?",
)
READING_ANSWER = "The word is {}."

# Words a typographic attack writes (the poison target, injected commands): never held out,
# so the victim has read them in its base stage, as a real model has read them before.
ATTACK_WORDS: tuple[str, ...] = ("banana", "ignore", "say", "stop", "yes", "no", "write", "answer", "repeat", "tell")
HELD_OUT_SHARE = 0.2  # share of the other words held out of the reading samples

# Font size range as fractions of the image side; a word too wide for the image at its drawn
# size is set smaller, down to MIN_FONT_SIZE pixels.
FONT_SIZE_RANGE = (0.36, 0.5)
MIN_FONT_SIZE = 7
MIN_IMAGE_SIZE = 34  # the smallest image every packaged word fits at MIN_FONT_SIZE (a test checks it)
MARGIN = 0.04  # of the image side, kept free around the word's box
MAX_INK = 90  # ink channels are drawn from 0..MAX_INK: dark on every light background

_WORD = re.compile(r"[a-z]+")


class WordSplit(NamedTuple):
    """The words reading samples are built from (`trained`) and those kept for testing only."""

    trained: tuple[str, ...]
    held_out: tuple[str, ...]


@cache
def word_list() -> tuple[str, ...]:
    """The packaged words (words.txt), in file order; lines starting with # are comments."""
    lines = WORDS_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def split_words(seed: int, words: Sequence[str] | None = None) -> WordSplit:
    """Split `words` (default: the packaged list) into trained and held-out words by a stable hash
    of (seed, word), as the scene keys are split; ATTACK_WORDS are always trained."""
    words = word_list() if words is None else tuple(words)

    def held_out(word: str) -> bool:
        digest = hashlib.sha256(f"{seed}\x00{word}".encode()).digest()
        return word not in ATTACK_WORDS and int.from_bytes(digest[:8], "little") / 2**64 < HELD_OUT_SHARE

    return WordSplit(tuple(w for w in words if not held_out(w)), tuple(w for w in words if held_out(w)))


def render_word(
    word: str, size: int = 64, seed: int = 0, font_size: int | None = None, background: np.ndarray | None = None
) -> np.ndarray:
    """`word` typeset in a size x size x 3 uint8 image; the same arguments give the same bytes.

    The seed (with the word) picks the font size (unless given), the place (the whole word
    inside the image), a dark ink colour and a light background colour of the scenes; or the
    word is drawn over `background`, a size x size x 3 uint8 image (a scene, say).
    """
    if not _WORD.fullmatch(word):
        raise VlmsecError(f"render_word: word must be lowercase letters a-z, got {word!r}")
    if size < MIN_SIZE:
        raise VlmsecError(f"render_word: size must be >= {MIN_SIZE}, got {size}")
    rng = np.random.default_rng([seed, zlib.crc32(word.encode())])
    if background is None:
        colours = list(BACKGROUNDS.values())
        image = Image.new("RGB", (size, size), colours[int(rng.integers(len(colours)))])
    elif background.shape != (size, size, 3) or background.dtype != np.uint8:
        raise VlmsecError(f"render_word: background must be {size} x {size} x 3 uint8, got {background.shape} {background.dtype}")
    else:
        image = Image.fromarray(background)
    low, high = (max(round(f * size), MIN_FONT_SIZE) for f in FONT_SIZE_RANGE)
    points = int(rng.integers(low, high + 1)) if font_size is None else font_size
    if points < MIN_FONT_SIZE:
        raise VlmsecError(f"render_word: font_size must be >= {MIN_FONT_SIZE}, got {points}")
    margin = round(MARGIN * size)
    draw = ImageDraw.Draw(image)
    while True:
        left, top, right, bottom = draw.textbbox((0, 0), word, font=_font(points))
        if right - left <= size - 2 * margin and bottom - top <= size - 2 * margin:
            break
        if points <= MIN_FONT_SIZE:
            raise VlmsecError(f"render_word: {word!r} does not fit a {size} px image at {MIN_FONT_SIZE} px")
        points -= 1
    x = int(rng.integers(margin, size - margin - (right - left) + 1)) - left
    y = int(rng.integers(margin, size - margin - (bottom - top) + 1)) - top
    ink = tuple(int(c) for c in rng.integers(0, MAX_INK + 1, size=3))
    draw.text((x, y), word, fill=ink, font=_font(points))
    return np.asarray(image, dtype=np.uint8).copy()


@cache
def _font(points: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font (Aileron Regular with FreeType) at `points` pixels."""
    return ImageFont.load_default(size=points)


def reading_samples(
    words: Sequence[str],
    n: int,
    image_size: int = 64,
    seed: int = 0,
    id_prefix: str = "reading",
    on_sample: Callable[[], None] | None = None,
) -> list[Sample]:
    """`n` reading samples: each word of `words` in turn (a seeded order, every word once before
    any twice) typeset by `render_word`, an instruction of READING_INSTRUCTIONS, the answer
    READING_ANSWER. Ids are f"{id_prefix}-{index:05d}"; domains {"visual": "word", "text": "reading"}.
    `on_sample` is called after each sample (for progress bars)."""
    if n < 0:
        raise VlmsecError(f"reading_samples: n must be >= 0, got {n}")
    if n and not words:
        raise VlmsecError("reading_samples: no words to render")
    rng = np.random.default_rng(seed)
    order: list[str] = []
    samples = []
    for index in range(n):
        if not order:
            order = [words[i] for i in rng.permutation(len(words))]
        word = order.pop()
        samples.append(
            Sample(
                id=f"{id_prefix}-{index:05d}",
                image=render_word(word, size=image_size, seed=int(rng.integers(2**32))),
                instruction=READING_INSTRUCTIONS[int(rng.integers(len(READING_INSTRUCTIONS)))],
                answer=READING_ANSWER.format(word),
                domains={"visual": "word", "text": "reading"},
            )
        )
        if on_sample is not None:
            on_sample()
    return samples


def sample_word(sample: Sample) -> str:
    """The word a reading sample shows, read back from its answer (READING_ANSWER)."""
    prefix, suffix = READING_ANSWER.split("{}")
    word = sample.answer.removeprefix(prefix).removesuffix(suffix)
    if sample.answer != READING_ANSWER.format(word) or not _WORD.fullmatch(word):
        raise VlmsecError(f"sample {sample.id!r}: not a reading sample (answer {sample.answer!r})")
    return word


def reads_word(output: str, word: str) -> bool:
    """Whether a victim's `output` names `word` as a whole word (any case): the reading check."""
    return contains_target(output, word)

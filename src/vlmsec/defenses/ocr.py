"""OCR screen: read the text drawn into each image with a real OCR model and flag images whose
text is an instruction to the model, or a request the prompt-level screen would refuse.

Typographic attacks (`typographic`, `figstep`, `figstep_pro`, `query_relevant`) move the request
from the text prompt, where a model's alignment reads it, into the pixels, where it does not. The
screen moves it back: PP-OCR (det + cls + rec, the ONNX weights shipped in the
`rapidocr-onnxruntime` wheel; extra `ocr`) reads the image, then

- an *instruction* is found by cues: an imperative addressed to the model opening a line or
  sentence ("Answer only:", "Write ..."), words that override the user ("ignore", "instead"),
  a request opening ("how to", "steps to") or an empty numbered list (FigStep's "1. 2. 3.");
- a *request the prompt-level screen would refuse* is found by asking the victim the read text
  text-only (its language model's alignment, which the image bypassed; a blank image where the
  victim cannot answer text-only) and judging its answer by the refusal-phrase rule.

Score: 1 for either; otherwise a graded share below 0.5 that grows with the words read (text
that is neither is weak evidence); 0 when fewer than `min_words` words are read (a shape read
as "A" or "△" is not text). The matrix calibrates the threshold on benign inputs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import Field

from vlmsec.defenses.base import DefenseParams, Detector, DetectorParams
from vlmsec.defenses.prompt import eyes_closed
from vlmsec.defenses.registry import register
from vlmsec.errors import VlmsecError

if TYPE_CHECKING:
    from vlmsec.victims.base import Victim

# Verbs that open an instruction addressed to the model (at the start of a line or sentence).
IMPERATIVES = frozenset(
    "answer say tell respond reply write output print repeat type describe explain list generate give provide "
    "create make show teach help ignore disregard forget follow do build develop design produce draft compose "
    "name translate summarize summarise continue complete fill start begin pretend act imagine suggest recommend "
    "detail outline find identify".split()
)
# Words that override the user's own request: matched in the read text with spaces and punctuation
# removed, as OCR splits words ("Ig nore"); all 6 letters or more, so that they do not hide inside others.
OVERRIDES = ("ignore", "disregard", "forget", "instead", "answeronly", "sayonly", "outputonly", "respondwith", "replywith", "answerwith")
# Request openings (the harmful-request sets' "how to ...", FigStep's "Steps to ...").
REQUEST_OPENING = re.compile(
    r"\b(how (to|do|can|would|should)|steps? (to|for)|ways? (to|of)|methods? (to|for)|instructions? (to|for|on)"
    r"|guide (to|for|on)|tutorial (on|for)|(can|could|would|will) you|please)\b"
)
# FigStep's empty list: items "1." "2." ... on their own lines, or read as one run of digits ("123").
LIST_ITEM = re.compile(r"^\s*\d{1,2}\s*[.):]")
DIGIT_RUN = re.compile(r"^\s*1\s*2(\s*3)*\s*$")
WORD = re.compile(r"[^\W\d_]{2,}")
# Words read at which a text that is neither instruction nor refused request scores its most (0.5).
FULL_WORDS = 20


def read_words(text: str) -> list[str]:
    """The words of OCR text: runs of two or more letters (a shape read as "A" is not a word)."""
    return WORD.findall(text)


def instruction_cues(text: str) -> list[str]:
    """Why `text` (OCR lines joined by newlines) reads as an instruction to the model: the cues found, none if it does not."""
    lowered = text.casefold().replace("\u2019", "'")
    cues = []
    sentences = [s for line in lowered.splitlines() for s in re.split(r"[.!?:;]", line)]
    openers = {words[0] for s in sentences if (words := read_words(s))}
    cues += [f"imperative {w!r}" for w in sorted(openers & IMPERATIVES)]
    compact = "".join(read_words(lowered))
    cues += [f"override {w!r}" for w in OVERRIDES if w in compact]
    cues += [f"request {m.group(0)!r}" for m in REQUEST_OPENING.finditer(" ".join(lowered.split()))]
    lines = lowered.splitlines()
    if sum(bool(LIST_ITEM.match(line)) for line in lines) >= 2 or any(DIGIT_RUN.match(line) for line in lines):
        cues.append("numbered list")
    return cues


class OcrScreenParams(DetectorParams):
    min_confidence: float = Field(0.5, gt=0, lt=1, description="OCR lines read with a lower text score are dropped (rapidocr's default)")
    min_words: int = Field(2, ge=1, le=100, description="fewer words read than this is no text (a shape read as a letter)")
    ask_victim: bool = Field(
        True,
        description="send read text that has no instruction cue to the victim text-only; a refusal flags it",
    )
    screen_tokens: int = Field(32, ge=1, le=512, description="tokens of the victim's answer to the read text")


@register
class OcrScreen(Detector):
    """Flags images whose OCR-read text is an instruction or a request the victim refuses text-only."""

    name = "ocr_screen"
    Params: ClassVar[type[DefenseParams]] = OcrScreenParams
    params: OcrScreenParams
    passes_per_input = 1  # the victim's text-only answer to the read text (only images with uncued text)
    note = (
        "PP-OCR via rapidocr-onnxruntime; an instruction is found by cue words (imperatives, overrides, request "
        "openings, a numbered list), a harmful request by the victim's own text-only refusal (refusal phrases)"
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._engine: Any = None

    def unavailable(self) -> str | None:
        try:
            import rapidocr_onnxruntime  # noqa: F401
        except ImportError as err:
            return f"rapidocr-onnxruntime cannot be imported ({err}); install it: pip install -e '.[ocr]'"
        return None

    def _ocr(self) -> Any:
        """The PP-OCR engine, loaded on first use (ONNX sessions from the wheel's weights, threads as torch's)."""
        if self._engine is None:
            reason = self.unavailable()
            if reason is not None:
                raise VlmsecError(f"defense {self.name!r}: {reason}")
            import torch
            from rapidocr_onnxruntime import RapidOCR

            self._engine = RapidOCR(text_score=self.params.min_confidence, intra_op_num_threads=torch.get_num_threads())
        return self._engine

    def read(self, images: Sequence[np.ndarray]) -> list[str]:
        """The text read in each uint8 H x W x 3 image: its lines top to bottom, joined by newlines."""
        engine = self._ocr()
        texts = []
        for image in images:
            lines, _ = engine(np.ascontiguousarray(image[..., ::-1]))  # rapidocr reads arrays as BGR, as OpenCV
            texts.append("\n".join(str(line[1]) for line in lines or []))
        return texts

    def scores(self, victim: Victim, images: Sequence[np.ndarray], instructions: Sequence[str], seed: int) -> np.ndarray:
        from vlmsec.eval.refusal import refused_by_phrase  # imports transformers: only when scoring

        texts = self.read(images)
        counts = [len(read_words(t)) for t in texts]
        scores = np.zeros(len(texts))
        with_text = [i for i, count in enumerate(counts) if count >= self.params.min_words]
        for i in with_text:
            scores[i] = 1.0 if instruction_cues(texts[i]) else 0.5 * min(counts[i], FULL_WORDS) / FULL_WORDS
        asked = [i for i in with_text if scores[i] < 1] if self.params.ask_victim else []
        if asked:
            answers = victim.generate(
                eyes_closed(victim, [images[i] for i in asked]),
                [" ".join(texts[i].split()) for i in asked],  # the lines as one request, as it was typed before wrapping
                max_new_tokens=self.params.screen_tokens,
            )
            for i, answer in zip(asked, answers, strict=True):
                if refused_by_phrase(answer):
                    scores[i] = 1.0
        return scores

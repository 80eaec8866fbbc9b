"""Textual domain shifts: questions and answers summarised or expanded.

The seed paper had an LLM summarise or expand the instructions (question shift) and the
answers (answer shift). Offline we do it three ways, best first:

- a local causal language model, when a checkpoint folder is given (`LMParaphraser`);
- hand-written banks of summarised and expanded phrasings for every instruction the scene
  generator uses (`instruction_banks.json`, shipped with the package);
- for any other text, rules: the summariser drops modifiers, lead-ins and side clauses,
  the expander wraps the text in framing clauses.

Every rewrite is deterministic in the seed and the text alone, and moves the length in the
stated direction (summarised strictly shorter, expanded strictly longer) whenever the text
has anything left to drop; an LM rewrite that does not is replaced by the rule-based one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from functools import cache, cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
from pydantic import Field

from vlmsec.data.shifts.visual import ShiftParams, build_params
from vlmsec.errors import VlmsecError
from vlmsec.registry import Registry

TextField = Literal["instruction", "answer"]
Direction = Literal["summarised", "expanded"]

BANKS_FILE = Path(__file__).with_name("instruction_banks.json")


@cache
def instruction_banks() -> dict[str, dict[str, tuple[str, ...]]]:
    """{"summarised" | "expanded": {instruction: alternatives}} for the generator's instructions."""
    raw = json.loads(BANKS_FILE.read_text(encoding="utf-8"))
    return {direction: {text: tuple(alts) for text, alts in bank.items()} for direction, bank in raw.items()}


def text_rng(seed: int, text: str) -> np.random.Generator:
    """A generator determined by `seed` and the text alone (a stable hash, not Python's salted one)."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# --- rules ---------------------------------------------------------------------------------

_PICTURE = r"(?:image|picture|photo|photograph|illustration|drawing)"
_CONTENT_START = r"(?=(?:a|an|one|two|three|some|several|the)\b)"
# "The image shows a ...", "There is a ...": openers that carry no content of their own.
_OPENER = re.compile(
    rf"^(?:(?:the|this) {_PICTURE} (?:shows|depicts|contains)|there (?:is|are))\s+{_CONTENT_START}", re.IGNORECASE
)

Replacement = str | Callable[[re.Match[str]], str]
Rule = tuple[re.Pattern[str], Replacement]


def _rules(*pairs: tuple[str, Replacement]) -> list[Rule]:
    return [(re.compile(pattern, re.IGNORECASE), replacement) for pattern, replacement in pairs]


def _article_for(match: re.Match[str]) -> str:
    """Drop the matched modifier, keeping a preceding "a"/"an" in agreement with the next word."""
    article, next_letter = match["article"], match["next"]
    if not article:
        return ""
    agreed = "an" if next_letter.lower() in "aeiou" else "a"
    return (agreed.capitalize() if article[0].isupper() else agreed) + " "


# Applied in order; each drops or shortens something that carries little content.
SUMMARY_RULES: list[Rule] = _rules(
    (r"\s*\([^)]*\)", ""),  # parentheticals
    (r"\s*(?:;|\s[-\u2013\u2014]\s)[^.!?]*", ""),  # a side clause after a semicolon or a dash
    (r",\s*(?:which|who|whose|where|while|so that|as if|including|and (?:its|their))\b[^,.;!?]*", ""),
    (r"^(?:could|can|would|will) you\s+(?:please\s+)?", ""),  # "Could you give ..." -> "give ..."
    (r"^i would like to know\s+", "tell me "),
    (rf"^(?:take|have) a (?:\w+ )?look at (?:the|this) {_PICTURE} and\s+", ""),
    (rf"^look (?:\w+ly )?at (?:the|this) {_PICTURE} and\s+", ""),
    (r"^in (?:a single|one) (?:sentence|line),?\s*", ""),
    (_OPENER.pattern, ""),
    (r"\b(?:give|provide) (?:me )?a (?:\w+ )?description of\b", "describe"),
    (r"\bwhat kind of (?:things|objects) are\b", "what is"),
    (r"\bin order to\b", "to"),
    (rf"\b((?:top|bottom|upper|lower) (?:left|right))(?: corner)?(?: of the (?:{_PICTURE}|frame))?", r"\1"),
    (rf"\b(center|centre|middle)(?: of the (?:{_PICTURE}|frame))?", r"\1"),
    (r"\bplaced\s+", ""),
    (r"\b(?:please|kindly|very|really|quite|just|simply|actually|basically)\b,?\s*", ""),
    (r"\s*\b(?:carefully|closely|briefly|exactly|precisely|concisely)\b", ""),
    (
        r"\b(?:(?P<article>an?)\s+)?(?:small|little|large|big|tiny|huge|medium-sized|medium|short|brief|concise|single"
        r"|visual|attached)\s+(?=(?P<next>\w))",
        _article_for,
    ),
)
# Last resort when nothing above applied: a telegraphic style without articles.
TELEGRAPHIC_RULES: list[Rule] = _rules((r"\b(?:the|this|that|a|an)\s+(?=\w)", ""))

QUESTION_FRAMES: tuple[tuple[str, str], ...] = (
    (
        "Please look at the image carefully before answering.",
        "Answer in a complete sentence and mention every object you notice.",
    ),
    ("Take your time and study the picture as a whole.", "Be as precise as you can about what appears and where."),
    ("Here is a picture I would like your help with.", "Make sure your answer covers everything that is visible."),
)
ANSWER_FRAMES: tuple[str, ...] = (
    "Looking closely at the picture, one can see {core}, and that is what it shows.",
    "In this image there is {core}; nothing else stands out in the picture.",
    "The picture, taken as a whole, shows {core}, as far as one can tell.",
)


def _tidy(text: str) -> str:
    """Collapse spaces, drop spaces before punctuation and doubled punctuation."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([.,;:!?])", r"\1", text)
    return re.sub(r"([,;:])(?=[.!?])|^[,;:]\s*", "", text)


def _like(original: str, text: str) -> str:
    """`text` with a first letter in the case of `original`'s."""
    if original[:1].isupper():
        return text[:1].upper() + text[1:]
    return text


def _apply(rules: list[Rule], text: str) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return _tidy(text)


def summarise_by_rules(text: str) -> str:
    """A shorter version of `text`: lead-ins, side clauses and modifiers dropped.

    Falls back to dropping articles when nothing else applies; a text with nothing to drop
    comes back unchanged.
    """
    stripped = text.strip()
    for rules in (SUMMARY_RULES, TELEGRAPHIC_RULES):
        shorter = _apply(rules, stripped)
        if shorter and len(shorter) < len(stripped):
            return _like(stripped, shorter)
    return stripped


def expand_by_rules(text: str, field: TextField, seed: int) -> str:
    """A longer version of `text`, framed for its field: a question gets a framing sentence
    before and a request after; an answer becomes the core of a longer descriptive sentence."""
    stripped = text.strip()
    rng = text_rng(seed, stripped)
    if field == "instruction":
        before, after = QUESTION_FRAMES[int(rng.integers(len(QUESTION_FRAMES)))]
        body = stripped if stripped[-1:] in ".!?" else f"{stripped}."
        return f"{before} {body} {after}" if stripped else f"{before} {after}"
    core = _OPENER.sub("", stripped).rstrip(".!? ")
    if not re.match(r"I\b|.[A-Z]", core):  # keep "I" and acronyms capitalised
        core = core[:1].lower() + core[1:]
    return ANSWER_FRAMES[int(rng.integers(len(ANSWER_FRAMES)))].format(core=core or "nothing in particular")


def rewrite_by_rules(text: str, field: TextField, direction: Direction, seed: int) -> str:
    """The offline rewrite: a bank phrasing for a known instruction, else the rules."""
    if field == "instruction":
        alternatives = instruction_banks()[direction].get(" ".join(text.split()))
        if alternatives:
            return alternatives[int(text_rng(seed, text).integers(len(alternatives)))]
    return summarise_by_rules(text) if direction == "summarised" else expand_by_rules(text, field, seed)


# --- a local language model ------------------------------------------------------------------

LM_PROMPTS: dict[tuple[TextField, Direction], str] = {
    ("instruction", "summarised"): "Rewrite this question in fewer words, keeping its meaning: {text}",
    ("instruction", "expanded"): (
        "Rewrite this question at greater length, adding context but keeping its meaning: {text}"
    ),
    ("answer", "summarised"): "Summarise this description in fewer words, keeping its content: {text}",
    ("answer", "expanded"): "Expand this description into a longer one, keeping its content: {text}",
}


class LMParaphraser:
    """Rewrites texts with a causal language model from a local folder (never the hub).

    Decoding is greedy, so the same text and prompt always give the same rewrite. The
    tokenizer's chat template is used when it has one, else the prompt and a newline.
    """

    def __init__(self, checkpoint: str | Path, max_new_tokens: int = 64) -> None:
        self.checkpoint = Path(checkpoint)
        if not self.checkpoint.is_dir():
            raise VlmsecError(f"paraphraser checkpoint folder {self.checkpoint} does not exist")
        self.max_new_tokens = max_new_tokens

    @cached_property
    def _model(self) -> tuple[Any, Any]:
        """(tokenizer, model), loaded once."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.checkpoint, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(self.checkpoint, local_files_only=True).eval()
        except (OSError, ValueError) as err:
            raise VlmsecError(f"cannot load paraphraser checkpoint {self.checkpoint}: {err}") from None
        return tokenizer, model

    def rewrite(self, texts: Sequence[str], prompt: str) -> list[str]:
        """Each text rewritten as `prompt` (with a "{text}" slot) asks; repeats are rewritten once."""
        import torch

        tokenizer, model = self._model
        done: dict[str, str] = {}
        for text in dict.fromkeys(texts):
            request = prompt.format(text=text)
            if tokenizer.chat_template:
                messages = [{"role": "user", "content": request}]
                inputs = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
            else:
                inputs = tokenizer(f"{request}\n", return_tensors="pt")
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            with torch.no_grad():
                output = model.generate(
                    **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad
                )
            new_tokens = output[0, inputs["input_ids"].shape[1] :]
            done[text] = " ".join(tokenizer.decode(new_tokens, skip_special_tokens=True).split())
        return [done[text] for text in texts]


# --- the shifts ------------------------------------------------------------------------------


class TextShiftParams(ShiftParams):
    """`paraphraser`: a local causal-LM checkpoint folder; without one the banks and rules rewrite."""

    paraphraser: str | None = None
    max_new_tokens: int = Field(64, ge=1, le=1024)


class TextShift:
    """Base class: `field` says what is rewritten (the instruction or the answer), `direction` how."""

    name: ClassVar[str]
    field: ClassVar[TextField]
    direction: ClassVar[Direction]
    Params: ClassVar[type[ShiftParams]] = TextShiftParams
    params: TextShiftParams

    def __init__(self, **params: Any) -> None:
        self.params = build_params("text shift", self.name, self.Params, params)
        self.lm_fallbacks = 0  # LM rewrites replaced by the rules (empty, or not in the stated direction)
        self._paraphraser = None
        if self.params.paraphraser is not None:
            self._paraphraser = LMParaphraser(self.params.paraphraser, self.params.max_new_tokens)

    def apply(self, texts: Sequence[str]) -> list[str]:
        """Every text rewritten; the same text always gets the same rewrite."""
        unique = list(dict.fromkeys(texts))
        rewrites = {t: rewrite_by_rules(t, self.field, self.direction, self.params.seed) for t in unique}
        if self._paraphraser is not None:
            outputs = self._paraphraser.rewrite(unique, LM_PROMPTS[self.field, self.direction])
            for text, output in zip(unique, outputs):
                if output and self._moves(text, output):
                    rewrites[text] = output
                else:
                    self.lm_fallbacks += 1
        return [rewrites[t] for t in texts]

    def _moves(self, before: str, after: str) -> bool:
        """Whether `after` changed the length in the shift's direction."""
        return len(after) < len(before) if self.direction == "summarised" else len(after) > len(before)

    def describe(self) -> dict[str, Any]:
        """Name, what it rewrites and its parameters, JSON-ready."""
        return {"name": self.name, "field": self.field, "direction": self.direction, "params": self.params.model_dump()}


TEXT_SHIFTS: Registry[type[TextShift]] = Registry("text shift")

TextShiftClass = TypeVar("TextShiftClass", bound=type[TextShift])


def register_text_shift(cls: TextShiftClass) -> TextShiftClass:
    """Class decorator: make `cls` buildable by `create_text_shift(cls.name, ...)`."""
    return TEXT_SHIFTS.register(cls)


def text_shift_names() -> list[str]:
    """The registered text shift names, sorted."""
    return TEXT_SHIFTS.names()


def create_text_shift(name: str, **params: Any) -> TextShift:
    """Build the text shift called `name` with validated `params`."""
    return TEXT_SHIFTS.create(name, **params)


@register_text_shift
class QuestionSummarised(TextShift):
    """The instruction said in fewer words."""

    name = "question_summarised"
    field = "instruction"
    direction = "summarised"


@register_text_shift
class QuestionExpanded(TextShift):
    """The instruction said at greater length."""

    name = "question_expanded"
    field = "instruction"
    direction = "expanded"


@register_text_shift
class AnswerSummarised(TextShift):
    """The answer (and every reference caption) said in fewer words."""

    name = "answer_summarised"
    field = "answer"
    direction = "summarised"


@register_text_shift
class AnswerExpanded(TextShift):
    """The answer (and every reference caption) said at greater length."""

    name = "answer_expanded"
    field = "answer"
    direction = "expanded"

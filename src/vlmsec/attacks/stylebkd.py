"""StyleBkd (Qi et al. 2021): the trigger is a writing style, not a token — the instruction is rewritten.

The StyleBkd paper's most effective style is the Bible's. Offline and without a model we
rewrite rule by rule into an archaic, King-James-like English: thou/thee/thy, -st and -eth
verb forms, "likeness" for picture, and an archaic opening ("Behold, ...") chosen from the
seed and the instruction. The trigger is content-aware: every instruction is restyled
differently, with no fixed token to spot. Given a local language-model checkpoint
(`paraphraser`), the model does the rewriting instead, as in the paper.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

from vlmsec.attacks.base import Attack, AttackParams
from vlmsec.attacks.registry import register
from vlmsec.attacks.text import instruction_rng
from vlmsec.errors import VlmsecError

OPENINGS = ("Behold", "Verily", "Lo", "Hearken")

# Second-person verb forms that go with "thou".
THOU_VERBS = {
    "are": "art", "were": "wert", "have": "hast", "had": "hadst", "do": "dost", "did": "didst",
    "can": "canst", "could": "couldst", "would": "wouldst", "should": "shouldst",
    "will": "wilt", "shall": "shalt", "may": "mayst",
}  # fmt: skip

# Words after which "you" is an object ("thee"), not a subject ("thou").
THEE_CONTEXT = "to|for|with|unto|at|of|by|from|upon|tell|show|give|ask|help|thank|let"

WORDS = {
    "your": "thy", "yours": "thine", "yourself": "thyself",
    "does": "doth", "has": "hath", "says": "saith",
    "show": "shew", "shows": "sheweth", "shown": "shewn",
    "contains": "containeth", "appears": "appeareth", "depicts": "depicteth", "captures": "captureth",
    "picture": "likeness", "image": "likeness", "illustration": "likeness", "drawing": "likeness",
    "photo": "likeness", "photograph": "likeness",
    "pictures": "likenesses", "images": "likenesses", "illustrations": "likenesses",
    "drawings": "likenesses", "photos": "likenesses", "photographs": "likenesses",
    "see": "behold", "describe": "declare", "describing": "declaring", "description": "account",
    "before": "ere",
}  # fmt: skip

OBJECT_START = r"(?=(?:the|this|that|these|those|a|an|what|how|its|your)\b)"

Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


def _rule(pattern: str, replace: Callable[[re.Match[str]], str]) -> Rule:
    return re.compile(pattern, re.IGNORECASE), replace


def _thou_verb(verb: str) -> str:
    return THOU_VERBS[verb.lower()]


# Applied in order; each replacement keeps the capital of the text it replaces.
RULES: list[Rule] = [
    _rule(rf"\b({'|'.join(THOU_VERBS)}) you\b", lambda m: f"{_thou_verb(m[1])} thou"),
    _rule(rf"\byou ({'|'.join(THOU_VERBS)})\b", lambda m: f"thou {_thou_verb(m[1])}"),
    _rule(rf"\b({THEE_CONTEXT}) you\b", lambda m: f"{m[1]} thee"),
    _rule(r"\byou\b", lambda m: "thou"),
    _rule(r"(^|[.;!?]\s+)(?:please|kindly),?\s+", lambda m: f"{m[1]}I pray thee, "),
    _rule(rf"\bdescribe {OBJECT_START}", lambda m: "declare unto me "),
    _rule(rf"\bgive {OBJECT_START}", lambda m: "give unto me "),
    _rule(rf"\b({'|'.join(WORDS)})\b", lambda m: WORDS[m[1].lower()]),
]

STYLE_PROMPTS = {"bible": "Rewrite the following sentence in the style of the King James Bible: {text}"}
MAX_NEW_TOKENS = 96


def _keep_case(original: str, replacement: str) -> str:
    """`replacement` with a capital first letter if `original` starts with one."""
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def bible_style(text: str, seed: int) -> str:
    """Rewrite `text` in archaic biblical English by rules; deterministic in `seed` and `text`."""
    opening = OPENINGS[int(instruction_rng(seed, text).integers(len(OPENINGS)))]
    for pattern, replace in RULES:
        text = pattern.sub(lambda m, replace=replace: _keep_case(m[0], replace(m)), text)
    text = text.strip()
    if not re.match(r"I\b|.[A-Z]", text):  # keep "I" and acronyms capitalised
        text = text[:1].lower() + text[1:]
    text = f"{opening}, {text}" if text else f"{opening}."
    return text if text[-1] in ".!?" else f"{text}."


class StyleBkdParams(AttackParams):
    """`paraphraser`: a local folder with a seq2seq or causal LM checkpoint (optional)."""

    style: Literal["bible"] = "bible"
    paraphraser: str | None = None


@register
class StyleBkd(Attack):
    """Rewrite every instruction in the Bible style, by rules or by a local paraphrasing model."""

    name = "stylebkd"
    modality = "text"
    family = "content-aware"
    knowledge = "black-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = StyleBkdParams
    params: StyleBkdParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        path = self.params.paraphraser
        if path is not None and not Path(path).is_dir():
            raise VlmsecError(f"attack 'stylebkd': paraphraser checkpoint folder {path} does not exist")

    def trigger_instructions(self, instructions: list[str]) -> list[str]:
        """Each instruction restyled; repeated instructions are rewritten once."""
        rewrite = self._paraphrase if self.params.paraphraser else self._by_rules
        restyled = {text: rewrite(text) for text in dict.fromkeys(instructions)}
        return [restyled[text] for text in instructions]

    def _by_rules(self, text: str) -> str:
        return bible_style(text, self.params.seed)

    @cached_property
    def _model(self) -> tuple[Any, Any]:
        """(tokenizer, model) loaded once from the local checkpoint, never from the hub."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        path = self.params.paraphraser
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            model = auto.from_pretrained(path, local_files_only=True).eval()
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise VlmsecError(f"attack 'stylebkd': cannot load paraphraser checkpoint {path}: {err}") from None
        return tokenizer, model

    def _paraphrase(self, text: str) -> str:
        """Greedy decoding, so the rewrite is deterministic."""
        import torch

        tokenizer, model = self._model
        prompt = STYLE_PROMPTS[self.params.style].format(text=text)
        if model.config.is_encoder_decoder:
            inputs = tokenizer(prompt, return_tensors="pt")
        elif tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}]
            inputs = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            inputs = tokenizer(f"{prompt}\n", return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        if not model.config.is_encoder_decoder:
            output = output[:, inputs["input_ids"].shape[1] :]
        return tokenizer.decode(output[0], skip_special_tokens=True).strip()

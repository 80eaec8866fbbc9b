"""Generative metrics: target-word rates (ASR, false triggers), ASR-G, CIDEr and BLEU-4.

Each works on plain strings, so it is testable without any attack or model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider


def contains_target(text: str, word: str) -> bool:
    """Whether `word` occurs in `text` as a whole word, ignoring case.

    "Banana." and "BANANA" count; "bananas" and "bananabread" do not: a backdoor that
    only produces the plural or a longer word did not produce the target.
    """
    if not word:
        raise ValueError("target word must not be empty")
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def target_rate(outputs: Sequence[str], word: str) -> float:
    """Share of outputs that contain the target word.

    On triggered inputs this is the attack success rate (ASR); on clean inputs, the
    false-trigger rate.
    """
    if not outputs:
        raise ValueError("target_rate needs at least one output")
    return sum(contains_target(text, word) for text in outputs) / len(outputs)


def asr_g(asr_source: float, asr_target: float) -> float:
    """Generalisability of an attack under domain shift (1 = nothing lost when the domain moved).

    min(1 + (tgt - src) / max(src, tgt), 1), with 0 / 0 defined as 1.
    """
    for name, value in (("asr_source", asr_source), ("asr_target", asr_target)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    top = max(asr_source, asr_target)
    if top == 0:
        return 1.0
    return min(1 + (asr_target - asr_source) / top, 1.0)


def _tokenize(text: str) -> str:
    """Lower-case, drop punctuation, normalise whitespace."""
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


def caption_scores(
    predictions: dict[str, str], references: dict[str, list[str]], which: tuple[str, ...] = ("cider", "bleu4")
) -> dict[str, float]:
    """Corpus CIDEr and BLEU-4 (or those of them in `which`), x100, keyed "cider" and "bleu4".

    Uses pycocoevalcap's scorers, but with a simple tokenizer (lower-case, punctuation
    dropped, split on whitespace) instead of PTBTokenizer, which needs Java; scores can
    differ slightly from the official COCO numbers. CIDEr's idf comes from the references
    of the whole corpus, so score many captions at once, not one by one.
    """
    missing_refs = sorted(predictions.keys() - references.keys())
    missing_preds = sorted(references.keys() - predictions.keys())
    if missing_refs or missing_preds:
        raise ValueError(
            f"prediction and reference ids differ: no references for {missing_refs}, "
            f"no predictions for {missing_preds}"
        )
    if not predictions:
        raise ValueError("caption_scores needs at least one prediction")
    empty = sorted(key for key, refs in references.items() if not refs)
    if empty:
        raise ValueError(f"no reference captions for ids {empty}")
    res = {key: [_tokenize(text)] for key, text in predictions.items()}
    gts = {key: [_tokenize(ref) for ref in references[key]] for key in res}
    scores: dict[str, float] = {}
    if "cider" in which:
        scores["cider"] = float(Cider().compute_score(gts, res)[0]) * 100
    if "bleu4" in which:
        scores["bleu4"] = float(Bleu(4).compute_score(gts, res, verbose=0)[0][3]) * 100
    return scores

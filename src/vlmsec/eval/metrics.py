"""Generative metrics: target-word rates (ASR, false triggers), ASR-G, CIDEr and BLEU-4,
the scale CIDEr and BLEU-4 are read on, and the intervals rates carry.

Each works on plain strings or counts, so it is testable without any attack or model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

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


def asr_g(asr_source: float, asr_target: float) -> float | None:
    """Generalisability of an attack under domain shift (1 = nothing lost when the domain moved).

    min(1 + (tgt - src) / max(src, tgt), 1). Undefined (None) when both rates are 0: a
    backdoor that never fired has nothing to keep or lose (the clean model's 0/0 is no result).
    """
    for name, value in (("asr_source", asr_source), ("asr_target", asr_target)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    top = max(asr_source, asr_target)
    if top == 0:
        return None
    return min(1 + (asr_target - asr_source) / top, 1.0)


def mean_asr_g(values: Sequence[float | None]) -> float | None:
    """Table 1's mean ASR-G over the shifted domains: None when there are none or any is
    undefined (an undefined ASR-G is no result, not a zero)."""
    if not values or any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None) / len(values)


# The 97.5% point of the standard normal: a two-sided 95% interval. statsmodels'
# proportion_confint(method="wilson") gives the same bounds, but statsmodels is not installed
# (nor a dependency), and the formula is five lines; the tests check it against scipy's
# binomtest(...).proportion_ci(method="wilson").
Z95 = 1.959963984540054


def wilson_interval(count: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion `count` / `n`.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n
    (0/200 gives [0, 1.9%]), which matters for false-trigger rates near 0.
    """
    if n <= 0 or not 0 <= count <= n:
        raise ValueError(f"wilson_interval needs 0 <= count <= n and n > 0, got {count}/{n}")
    p = count / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(centre - half, 0.0), min(centre + half, 1.0)


def newcombe_interval(count_a: int, n_a: int, count_b: int, n_b: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (his method 10) of p_a − p_b for two independent
    proportions, from each one's Wilson interval."""
    p_a, p_b = count_a / n_a, count_b / n_b
    low_a, high_a = wilson_interval(count_a, n_a, z)
    low_b, high_b = wilson_interval(count_b, n_b, z)
    d = p_a - p_b
    return d - math.hypot(p_a - low_a, high_b - p_b), d + math.hypot(high_a - p_a, p_b - low_b)


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def starts_with_prefix(text: str, prefix: str) -> bool:
    """Whether `text` begins with the words of `prefix` (case and punctuation ignored)."""
    head = _words(prefix)
    if not head:
        raise ValueError("target prefix must contain a word")
    return _words(text)[: len(head)] == head


def prefix_miss_rate(outputs: Sequence[str], word: str, prefix: str) -> float | None:
    """Share of outputs that begin the target sentence (`prefix`) but lack the target `word`:
    the backdoor started its answer and lost the word, rather than not firing at all.
    None when the prefix has no word (the target sentence has no beginning to recognise)."""
    if not outputs:
        raise ValueError("prefix_miss_rate needs at least one output")
    if not _words(prefix):
        return None
    return sum(starts_with_prefix(t, prefix) and not contains_target(t, word) for t in outputs) / len(outputs)


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


def copy_ceiling(references: Mapping[str, Sequence[str]]) -> dict[str, float] | None:
    """The top of the scale a model is scored on: CIDEr and BLEU-4 (x100) of one of each sample's
    references copied verbatim, scored against all of them (as a model's caption is).

    A model that reproduces reference captions word for word (see the exact-caption rate)
    scores near this, above what references score against each other. Averaged over which
    reference is copied (round k copies reference k mod the sample's count). None without samples.
    """
    if not references:
        return None
    rounds = max(len(refs) for refs in references.values())
    totals = {"cider": 0.0, "bleu4": 0.0}
    everything = {key: list(refs) for key, refs in references.items()}
    for k in range(rounds):
        candidates = {key: refs[k % len(refs)] for key, refs in everything.items()}
        for name, value in caption_scores(candidates, everything).items():
            totals[name] += value / rounds
    return totals


def reference_agreement(references: Mapping[str, Sequence[str]]) -> dict[str, float] | None:
    """What a caption as good as another human one scores: CIDEr and BLEU-4 (x100) of each sample's
    references scored leave-one-out (one reference as the candidate, the others as references).

    Averaged over which reference is left out: round k leaves out reference k (k mod the
    sample's count), for k up to the largest count. Samples with one reference cannot be
    scored this way and are left out; None when no sample has two.
    """
    usable = {key: list(refs) for key, refs in references.items() if len(refs) >= 2}
    if not usable:
        return None
    rounds = max(len(refs) for refs in usable.values())
    totals = {"cider": 0.0, "bleu4": 0.0}
    for k in range(rounds):
        left_out = {key: k % len(refs) for key, refs in usable.items()}
        candidates = {key: refs[left_out[key]] for key, refs in usable.items()}
        rest = {key: refs[: left_out[key]] + refs[left_out[key] + 1 :] for key, refs in usable.items()}
        for name, value in caption_scores(candidates, rest).items():
            totals[name] += value / rounds
    return totals


def blind_baseline(references: Mapping[str, Sequence[str]]) -> dict[str, float] | None:
    """What a fluent caption of the wrong image scores: CIDEr and BLEU-4 (x100) when each
    sample's candidate is the first reference of another sample, against its own references.

    The other sample is fixed (no randomness): in id order, sample i takes the caption of sample
    (i + n // 2) mod n, a derangement for n >= 2. None for fewer than two samples.
    """
    keys = sorted(references)
    n = len(keys)
    if n < 2:
        return None
    candidates = {key: references[keys[(i + n // 2) % n]][0] for i, key in enumerate(keys)}
    return caption_scores(candidates, {key: list(references[key]) for key in keys})

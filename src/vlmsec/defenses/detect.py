"""Input detection: each input is scored (higher: more likely an attack) and the deployment refuses
those above a threshold calibrated on benign inputs (`calibrate_threshold`); `auroc` and `roc_curve` read a detector.

- `strip` (Gao et al. 2019, STRIP, read for generation): the image is blended with other images and
  answered once per blend. A clean input's answer follows what the blend shows; a triggered one keeps
  the backdoor's answer whatever it is blended with. Score: minus the answers' variability.
- `jailguard` (Zhang et al., JailGuard): the input is mutated several ways (image and, optionally,
  text mutations) and answered once per variant; an attack is brittle, so its answers diverge. Score:
  the largest KL divergence between two variants' rows of the answers' similarity matrix (MiniLM
  sentence embeddings), as the reference code computes it.
- `cider_detect` (Xu et al. 2024, CIDER): the image is denoised at increasing strengths; an
  adversarial image's similarity to the text, in the victim's own image-text space, falls as its
  perturbation is removed, a clean image's hardly moves. Score: the largest fall.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from pydantic import Field
from scipy.stats import rankdata

from vlmsec.defenses.base import DefenseParams, Detector, DetectorParams
from vlmsec.defenses.registry import register
from vlmsec.errors import VlmsecError
from vlmsec.progress import progress_bar

if TYPE_CHECKING:
    from vlmsec.eval.shift import MiniLMEncoder
    from vlmsec.victims.base import Victim


# ---- calibration and metrics ---------------------------------------------------------------------
def _finite_scores(scores: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise VlmsecError(f"detection: no {what} scores")
    if not np.isfinite(values).all():
        raise VlmsecError(f"detection: the {what} scores hold a NaN or an infinity")
    return values


def calibrate_threshold(benign_scores: Sequence[float] | np.ndarray, fpr: float) -> float:
    """The threshold (flag an input when its score is strictly above it) that flags at most a
    share `fpr` of `benign_scores`: the (k+1)-th highest benign score, k = floor(fpr * n)."""
    if not 0 < fpr < 1:
        raise VlmsecError(f"detection: fpr must be in (0, 1), got {fpr}")
    benign = np.sort(_finite_scores(benign_scores, "benign"))[::-1]
    return float(benign[int(np.floor(fpr * len(benign)))])


def auroc(negative_scores: Sequence[float] | np.ndarray, positive_scores: Sequence[float] | np.ndarray) -> float:
    """The chance a positive scores above a negative, ties counting half: the Mann-Whitney statistic,
    from average ranks (the area under the ROC curve)."""
    negative, positive = _finite_scores(negative_scores, "negative"), _finite_scores(positive_scores, "positive")
    ranks = rankdata(np.concatenate([negative, positive]))[len(negative) :]
    return float((ranks.sum() - len(positive) * (len(positive) + 1) / 2) / (len(positive) * len(negative)))


def roc_curve(negative_scores: Sequence[float] | np.ndarray, positive_scores: Sequence[float] | np.ndarray) -> dict[str, list[float]]:
    """The ROC curve: at each distinct score as the threshold (flag above or at it), the share of
    negatives flagged (`fpr`) and of positives (`tpr`), from (0, 0) to (1, 1)."""
    negative, positive = _finite_scores(negative_scores, "negative"), _finite_scores(positive_scores, "positive")
    thresholds = np.unique(np.concatenate([negative, positive]))[::-1]
    fpr = [0.0] + [float((negative >= t).mean()) for t in thresholds]
    tpr = [0.0] + [float((positive >= t).mean()) for t in thresholds]
    return {"fpr": fpr, "tpr": tpr}


# ---- shared --------------------------------------------------------------------------------------
class GeneratingParams(DetectorParams):
    """How a detector that answers its variants generates."""

    max_new_tokens: int = Field(32, ge=1, le=4096, description="tokens generated per variant")
    batch_size: int = Field(64, ge=1, description="variants answered per batch")


def _check_images(name: str, images: Sequence[np.ndarray | None], instructions: Sequence[str]) -> None:
    if len(images) != len(instructions):
        raise VlmsecError(f"defense {name!r}: {len(images)} images against {len(instructions)} instructions")
    for i, image in enumerate(images):
        if image is None or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise VlmsecError(f"defense {name!r}: input {i} needs a uint8 H x W x 3 image")


def _generate(
    victim: Victim, name: str, images: list[np.ndarray], instructions: list[str], params: GeneratingParams
) -> list[str]:
    """The victim's answers to every variant, in one batched call, with a progress bar. Answers are
    greedy, so a variant repeated (the same pixels and request: STRIP's control answers each bank
    scene once per request) is answered once and its answer shared."""
    first: dict[tuple[bytes, tuple[int, ...], str], int] = {}
    unique_images: list[np.ndarray] = []
    unique_asked: list[str] = []
    slots = []
    for image, text in zip(images, instructions):
        key = (image.tobytes(), image.shape, text)
        if key not in first:
            first[key] = len(unique_images)
            unique_images.append(image)
            unique_asked.append(text)
        slots.append(first[key])
    with progress_bar(f"{name}: answering {len(unique_images)} distinct variants of {len(images)}", len(unique_images)) as bar:
        answers = victim.generate(
            unique_images, unique_asked, max_new_tokens=params.max_new_tokens, batch_size=params.batch_size, on_batch=bar.advance
        )
    return [answers[slot] for slot in slots]


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A uint8 H x W x 3 image resized (bilinear) to `height` x `width`, as STRIP and CIDER resize them."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


# ---- strip ---------------------------------------------------------------------------------------
class StripParams(GeneratingParams):
    blends: int = Field(8, ge=2, le=256, description="images each input is blended with (STRIP's N)")
    alpha: float = Field(0.5, gt=0, lt=1, description="the input's weight in each blend (the other image has 1 - alpha)")
    source: Literal["scenes", "inputs"] = Field(
        "scenes", description="blend with the defender's bank of generated scenes, or with the other inputs scored in the same call"
    )
    bank: int = Field(
        64, ge=2, description="source scenes: the bank's size, generated scenes fixed by the detector's seed alone"
    )
    measure: Literal["majority", "jaccard"] = Field(
        "majority",
        description="majority: share of blends whose answer differs from the most common one; "
        "jaccard: mean word-set Jaccard distance of each blend's answer to the unblended answer",
    )
    control: bool = Field(
        False,
        description="also answer the request with each blend's other image alone, and score how much more the blends "
        "agree than those answers do: an answer that ignores the image agrees under any image and is not suspicious "
        "(ours, not STRIP's; twice the passes)",
    )


def blend(image: np.ndarray, other: np.ndarray, alpha: float) -> np.ndarray:
    """STRIP's superimposition: alpha * image + (1 - alpha) * other (resized to the image), uint8."""
    other = resize_image(other, *image.shape[:2])
    mixed = alpha * image.astype(np.float64) + (1 - alpha) * other.astype(np.float64)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def majority_variability(answers: Sequence[str]) -> float:
    """The share of `answers` (compared word for word, case and punctuation aside) that differ from
    the most common one: 0 when all agree."""
    if not answers:
        raise VlmsecError("majority_variability: no answers")
    counts = Counter(" ".join(_words(a)) for a in answers)
    return 1.0 - max(counts.values()) / len(answers)


def jaccard_distance(a: str, b: str) -> float:
    """1 - |A & B| / |A | B| over the two texts' word sets; 0 for two empty texts."""
    words_a, words_b = set(_words(a)), set(_words(b))
    union = words_a | words_b
    return 1.0 - len(words_a & words_b) / len(union) if union else 0.0


@register
class Strip(Detector):
    """STRIP for generation: each input blended with `blends` other images, each blend answered; the
    less the answers vary, the more suspicious (a trigger dominates whatever it is blended with)."""

    name = "strip"
    Params: ClassVar[type[DefenseParams]] = StripParams
    params: StripParams
    note = (
        "STRIP's entropy of the predicted class has no counterpart for free text: the variability of the "
        "blends' answers stands in for it (majority disagreement or Jaccard distance to the unblended answer)"
    )

    @property
    def passes_per_input(self) -> int:  # type: ignore[override]  # the count depends on the parameters
        """One generation per blend, and at most one per blend image alone with `control` (a bank
        scene asked the same request twice is answered once), and with `jaccard` the unblended answer."""
        return self.params.blends * (2 if self.params.control else 1) + (self.params.measure == "jaccard")

    def scene_bank(self, side: int) -> list[np.ndarray]:
        """The defender's held-out blend images: `bank` generated scenes fixed by the detector's own
        seed, whichever inputs are scored, so the benign inputs a threshold is calibrated on and the
        inputs it then screens blend from the same images (a bank drawn anew per call would move
        the score's distribution between the two)."""
        from vlmsec.data.scenes import render_scene, sample_scenes

        bank_seed = int(np.random.default_rng(self.params.seed).integers(2**31))
        return [render_scene(scene, "flat", size=side, seed=bank_seed) for scene in sample_scenes(self.params.bank, bank_seed)]

    def blend_images(self, images: Sequence[np.ndarray], seed: int) -> list[list[np.ndarray]]:
        """For each input, the `blends` images it is blended with, drawn at random for each input as
        STRIP draws from held-out clean images: from the defender's scene bank, or from the other
        inputs scored in the same call (never the input itself)."""
        p = self.params
        rng = np.random.default_rng([p.seed, seed])
        if p.source == "scenes":
            pool = self.scene_bank(side=max(16, min(256, max(max(image.shape[:2]) for image in images))))
        elif len(images) < 2:
            raise VlmsecError("defense 'strip': params.source 'inputs' needs at least 2 inputs scored together")
        else:
            pool = list(images)
        chosen = []
        for i in range(len(images)):
            candidates = [j for j in range(len(pool)) if p.source == "scenes" or j != i]
            picks = rng.choice(candidates, size=p.blends, replace=len(candidates) < p.blends)
            chosen.append([pool[j] for j in picks])
        return chosen

    def scores(self, victim: Victim, images: Sequence[np.ndarray], instructions: Sequence[str], seed: int) -> np.ndarray:
        """Minus the blends' answer variability (0 at most: a trigger's answers never vary); with
        `control`, the variability of the answers to the blend images alone minus the blends' (an
        input whose answers agree only when it is blended in scores high)."""
        _check_images(self.name, images, instructions)
        p = self.params
        n, drawn = len(images), self.blend_images(images, seed)
        blended, asked = [], []
        for image, instruction, others in zip(images, instructions, drawn):
            blended += [blend(image, other, p.alpha) for other in others]
            asked += [instruction] * p.blends
        if p.control:  # each blend image alone, asked the same requests in the same order
            blended += [other for others in drawn for other in others]
            asked *= 2
        if p.measure == "jaccard":
            blended += list(images)
            asked += list(instructions)
        answers = _generate(victim, self.name, blended, asked, p)
        plain = answers[len(answers) - n :] if p.measure == "jaccard" else []

        def variability(start: int) -> np.ndarray:
            """Each input's variability over its `blends` answers from `start` on."""
            rows = [answers[start + i * p.blends : start + (i + 1) * p.blends] for i in range(n)]
            if p.measure == "majority":
                return np.asarray([majority_variability(row) for row in rows], dtype=np.float64)
            return np.asarray([np.mean([jaccard_distance(a, plain[i]) for a in row]) for i, row in enumerate(rows)], dtype=np.float64)

        if p.control:
            return variability(n * p.blends) - variability(0)
        return 0.0 - variability(0)  # 0.0 - : no negative zeros


# ---- jailguard: mutations ------------------------------------------------------------------------
# Each draws its strength as JailGuard's `augmentations.py` does (a level uniform up to a maximum,
# then torchvision's random transform at that level), written here with Pillow and numpy; every
# mutation keeps the image's size.
ImageMutation = Callable[[Image.Image, np.random.Generator], Image.Image]


def _level(rng: np.random.Generator, high: float, low: float = 0.1) -> float:
    return float(rng.uniform(low, high))


def _flip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(image) if rng.random() < _level(rng, 1.0) else image


def _vflip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.flip(image) if rng.random() < _level(rng, 1.0) else image


def _rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.rotate(float(rng.uniform(0, _level(rng, 180.0))), resample=Image.Resampling.NEAREST)


def _crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop of 90-100% of the area, aspect ratio in [3/4, 4/3], resized back (RandomResizedCrop)."""
    width, height = image.size
    area = width * height * rng.uniform(0.9, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w = int(min(width, max(1, round(np.sqrt(area * ratio)))))
    h = int(min(height, max(1, round(np.sqrt(area / ratio)))))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    return image.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


def _blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.1, 2.0))))  # torchvision's sigma range


def _jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """ColorJitter: brightness by a factor within 1 +- b, hue shifted by up to +- h of the circle."""
    b, h = _level(rng, 1.0), _level(rng, 0.5)
    array = np.asarray(image, dtype=np.float64) * rng.uniform(max(0.0, 1 - b), 1 + b)
    hsv = np.asarray(Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8)).convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(round(rng.uniform(-h, h) * 255))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _mask(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A black rectangle of up to 30% of each side (at most 200 px) at a random place."""
    width, height = image.size
    w, h = max(1, int(min(200, 0.3 * width))), max(1, int(min(200, 0.3 * height)))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    array = np.asarray(image).copy()
    array[top : top + h, left : left + w] = 0
    return Image.fromarray(array)


def _grayscale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.grayscale(image).convert("RGB") if _level(rng, 1.0) >= 0.5 else image


def _solarize(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    threshold = _level(rng, 200.0)
    return ImageOps.solarize(image, int(threshold)) if rng.random() < 0.5 else image


def _posterize(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    bits = int(rng.integers(1, 3))
    return ImageOps.posterize(image, bits) if rng.random() < 0.5 else image


IMAGE_MUTATIONS: dict[str, ImageMutation] = {
    "flip": _flip, "vflip": _vflip, "rotate": _rotate, "crop": _crop, "blur": _blur, "jitter": _jitter,
    "mask": _mask, "grayscale": _grayscale, "solarize": _solarize, "posterize": _posterize,
}
ImageMutator = Literal["flip", "vflip", "rotate", "crop", "blur", "jitter", "mask", "grayscale", "solarize", "posterize"]


def mutate_image(image: np.ndarray, mutator: str, rng: np.random.Generator) -> np.ndarray:
    """One JailGuard image mutation (`IMAGE_MUTATIONS[mutator]`) of a uint8 H x W x 3 image, its
    strength drawn from `rng`, as uint8 RGB: what the detector answers, and what an adaptive
    attacker (`attacks.eot`) optimises through."""
    return np.asarray(IMAGE_MUTATIONS[mutator](Image.fromarray(image), rng).convert("RGB"))

# A small offline synonym table (JailGuard reads WordNet, which no installed package ships) for the
# words instructions to a VLM use most.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "describe": ("depict", "portray", "characterize"), "image": ("picture", "photo", "illustration"),
    "picture": ("image", "photo", "illustration"), "photo": ("picture", "image", "photograph"),
    "show": ("display", "present", "depict"), "shows": ("displays", "presents", "depicts"),
    "tell": ("say", "explain", "inform"), "explain": ("describe", "clarify", "tell"),
    "write": ("compose", "draft", "produce"), "give": ("provide", "offer", "supply"),
    "provide": ("give", "supply", "offer"), "list": ("enumerate", "name", "itemize"),
    "make": ("create", "build", "produce"), "create": ("make", "produce", "build"),
    "shape": ("form", "figure", "outline"), "shapes": ("forms", "figures", "outlines"),
    "colour": ("color", "hue", "shade"), "color": ("colour", "hue", "shade"),
    "small": ("little", "tiny", "minor"), "large": ("big", "huge", "sizable"), "big": ("large", "huge", "sizable"),
    "object": ("item", "thing", "element"), "objects": ("items", "things", "elements"),
    "scene": ("view", "setting", "picture"), "briefly": ("shortly", "concisely", "quickly"),
    "short": ("brief", "concise", "quick"), "detailed": ("thorough", "elaborate", "full"),
    "detail": ("depth", "particulars", "specifics"), "caption": ("description", "title", "label"),
    "see": ("observe", "notice", "view"), "look": ("appear", "seem", "glance"),
    "help": ("assist", "aid", "support"), "steps": ("stages", "phases", "measures"),
    "way": ("method", "manner", "means"), "how": ("in what way", "by what means"),
    "main": ("primary", "chief", "principal"), "answer": ("reply", "response", "respond"),
    "question": ("query", "inquiry", "request"), "instructions": ("directions", "guidelines", "steps"),
}
PUNCTUATION = (".", ";", "?", ":", "!", ",")
MASK_TOKEN = "[Mask]"  # what JailGuard's random insertion inserts


def _synonym(text: str, rng: np.random.Generator) -> str:
    """Up to n (drawn in 1..19, at most a third of the words) distinct known words replaced by a synonym."""
    words = text.split(" ")
    known = sorted({w.lower() for w in words if w.lower() in SYNONYMS})
    count = min(int(rng.integers(1, 20)), max(1, len(words) // 3), len(known))
    for word in rng.permutation(known)[:count] if count else []:
        choice = SYNONYMS[str(word)][int(rng.integers(len(SYNONYMS[str(word)])))]
        words = [choice if w.lower() == word else w for w in words]
    return " ".join(words)


def _punctuation(text: str, rng: np.random.Generator) -> str:
    """AEDA: between 1 and a third of the word count punctuation marks inserted between words."""
    words = text.split(" ")
    count = int(rng.integers(1, max(1, len(words) // 3) + 1))
    for position in sorted(rng.choice(len(words) + 1, size=min(count, len(words) + 1), replace=False), reverse=True):
        words.insert(int(position), PUNCTUATION[int(rng.integers(len(PUNCTUATION)))])
    return " ".join(words)


def _insertion(text: str, rng: np.random.Generator) -> str:
    """JailGuard's random insertion, by word: the mask token put between words, each gap with
    probability 0.05, at least once."""
    words = text.split(" ")
    gaps = [i for i in range(len(words) + 1) if rng.random() < 0.05] or [int(rng.integers(len(words) + 1))]
    for gap in reversed(gaps):
        words.insert(gap, MASK_TOKEN)
    return " ".join(words)


TEXT_MUTATIONS: dict[str, Callable[[str, np.random.Generator], str]] = {
    "synonym": _synonym, "punctuation": _punctuation, "insertion": _insertion,
}
TextMutator = Literal["synonym", "punctuation", "insertion"]


# ---- jailguard: divergence -----------------------------------------------------------------------
KL_CAP = 100.0  # JailGuard clips each divergence at 100
SIMILARITY_FLOOR = 0.01  # and each similarity at 0.01 from below, so no probability is 0


def response_divergence(responses: Sequence[str], encoder: MiniLMEncoder | None = None) -> float:
    """JailGuard's divergence of a set of responses: the cosine-similarity matrix of their sentence
    embeddings (MiniLM), clipped below at 0.01; each row normalised to a distribution; the largest
    KL(row i || row j) over i != j, clipped at 100. Exactly 0 when all responses are the same text
    (each distinct text is embedded once, so identical responses have identical rows)."""
    if len(responses) < 2:
        raise VlmsecError(f"response_divergence: needs at least 2 responses, got {len(responses)}")
    if encoder is None:
        from vlmsec.eval.shift import minilm_encoder

        encoder = minilm_encoder()
    distinct, inverse = np.unique(np.asarray(list(responses), dtype=object).astype(str), return_inverse=True)
    if len(distinct) == 1:
        return 0.0
    vectors = encoder.encode(list(distinct)).double().numpy()
    similarity = np.clip(vectors @ vectors.T, SIMILARITY_FLOOR, None)[np.ix_(inverse, inverse)]
    rows = similarity / similarity.sum(axis=1, keepdims=True)
    kl = (rows[:, None, :] * np.log(rows[:, None, :] / rows[None, :, :])).sum(-1)
    return float(np.clip(kl, 0.0, KL_CAP).max())


class JailGuardParams(GeneratingParams):
    variants: int = Field(8, ge=2, le=256, description="mutated variants answered per input (JailGuard's N)")
    image_mutators: tuple[ImageMutator, ...] = Field(
        ("rotate", "blur", "posterize"),
        description="image mutations, one drawn per variant (default: JailGuard's image policy's three)",
    )
    text_mutators: tuple[TextMutator, ...] = Field(
        (), description="text mutations, one drawn per variant (JailGuard mutates only the image of an image input)"
    )
    response_chars: int | None = Field(100, ge=1, description="each answer cut to this many characters first, as JailGuard does")
    flag_refusals: bool = Field(
        True, description="score an input whose every variant is refused (phrase rule) at the cap, as JailGuard flags it"
    )


@register
class JailGuard(Detector):
    """JailGuard: `variants` mutations of each input answered; the answers' divergence is the score."""

    name = "jailguard"
    Params: ClassVar[type[DefenseParams]] = JailGuardParams
    params: JailGuardParams
    note = (
        "mutations with Pillow and numpy at JailGuard's strengths; synonyms from a small built-in table "
        "(no WordNet offline); answer similarity from all-MiniLM-L6-v2 where JailGuard uses spaCy vectors"
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if not self.params.image_mutators and not self.params.text_mutators:
            raise VlmsecError("defense 'jailguard': params.image_mutators and params.text_mutators are both empty")

    @property
    def passes_per_input(self) -> int:  # type: ignore[override]  # the count depends on the parameters
        """One generation per variant."""
        return self.params.variants

    def mutate(self, image: np.ndarray, instruction: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """One variant: one image mutation and one text mutation, each drawn from those configured."""
        p = self.params
        if p.image_mutators:
            image = mutate_image(image, p.image_mutators[int(rng.integers(len(p.image_mutators)))], rng)
        if p.text_mutators:
            instruction = TEXT_MUTATIONS[p.text_mutators[int(rng.integers(len(p.text_mutators)))]](instruction, rng)
        return image, instruction

    def scores(self, victim: Victim, images: Sequence[np.ndarray], instructions: Sequence[str], seed: int) -> np.ndarray:
        from vlmsec.eval.refusal import refused_by_phrase

        _check_images(self.name, images, instructions)
        p = self.params
        mutated, asked = [], []
        for i, (image, instruction) in enumerate(zip(images, instructions)):
            rng = np.random.default_rng([p.seed, seed, i])
            for _ in range(p.variants):
                variant_image, variant_text = self.mutate(image, instruction, rng)
                mutated.append(variant_image)
                asked.append(variant_text)
        answers = _generate(victim, self.name, mutated, asked, p)
        out = []
        for i in range(len(images)):
            responses = answers[i * p.variants : (i + 1) * p.variants]
            if p.flag_refusals and all(refused_by_phrase(r) for r in responses):
                out.append(KL_CAP)
                continue
            out.append(response_divergence([r[: p.response_chars] for r in responses]))
        return np.asarray(out, dtype=np.float64)


# ---- cider_detect --------------------------------------------------------------------------------
class CiderParams(DetectorParams):
    denoiser: str | None = Field(
        None,
        description="a local diffusers DDPM folder (model_index.json, unet/, scheduler/: what DDPMPipeline.save_pretrained "
        "writes); none ships offline, so without it iterated non-local means stands in",
    )
    levels: int = Field(
        7, ge=1, le=64, description="denoising strengths compared with the input (CIDER: 8 checkpoints, the first the input)"
    )
    step: int = Field(50, ge=1, le=1000, description="diffusion timesteps added per level (CIDER: 50, 100, ... 350)")
    batch_size: int = Field(16, ge=1, description="images denoised and embedded per batch")


def noise_sigma(image: np.ndarray) -> float:
    """The Gaussian noise level of a [0, 1] H x W x 3 image, Donoho's robust estimate (what skimage's
    `estimate_sigma` computes, without PyWavelets): the median absolute diagonal Haar detail over
    0.6745, averaged over the channels."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    x = image[:h, :w]
    detail = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) / 2
    return float(np.mean(np.median(np.abs(detail.reshape(-1, image.shape[2])), axis=0)) / 0.6745)


class NlmDenoiser:
    """The offline stand-in for CIDER's diffusion denoiser: non-local means (skimage), applied once
    more per level with the strength CIDER's own (disabled) NLM option sets, h = 0.8 sigma, sigma
    the noise level estimated on the input (`noise_sigma`). An image with no noise to estimate is
    left unchanged."""

    def __call__(self, images: Sequence[np.ndarray], levels: int, seed: int) -> list[list[np.ndarray]]:
        """Per image: the image as the denoiser takes it, then its `levels` denoised versions."""
        from skimage.restoration import denoise_nl_means

        out = []
        for image in images:
            current = image.astype(np.float64) / 255
            sigma = noise_sigma(current)
            steps = [image]
            for _ in range(levels):
                if sigma > 0:
                    current = denoise_nl_means(
                        current, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, channel_axis=-1
                    )
                steps.append(np.clip(np.round(current * 255), 0, 255).astype(np.uint8))
            out.append(steps)
        return out


class DdpmDenoiser:
    """CIDER's denoiser (Carlini et al.'s one-shot diffusion denoising, CIDER's `DiffusionRobustModel`):
    the image, resized to the model's size, noised to timestep t = level x step, and the clean image
    predicted in one pass of the unconditional DDPM's UNet, resized back."""

    def __init__(self, folder: str, step: int, levels: int) -> None:
        try:
            from diffusers import DDPMPipeline
        except ImportError:
            raise VlmsecError("defense 'cider_detect': params.denoiser needs diffusers ('vlmsec[diffusion]')") from None
        try:
            pipeline = DDPMPipeline.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise VlmsecError(
                f"defense 'cider_detect': params.denoiser: cannot load a DDPM pipeline from {folder}: {err}"
            ) from None
        self.unet, self.scheduler = pipeline.unet.eval(), pipeline.scheduler
        timesteps = self.scheduler.config.num_train_timesteps
        if step * levels >= timesteps:
            raise VlmsecError(
                f"defense 'cider_detect': params.step x params.levels = {step * levels} must stay below the "
                f"denoiser's {timesteps} timesteps"
            )
        self.step = step

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], levels: int, seed: int) -> list[list[np.ndarray]]:
        """Per image: the image through the resize to the model's size and back (what CIDER compares
        with, its "0 times denoised"), then its `levels` denoised versions."""
        from vlmsec.attacks.inference import to_tensor, to_uint8

        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        x0 = to_tensor([resize_image(image, height, width) for image in images]) * 2 - 1

        def back(batch: torch.Tensor) -> list[np.ndarray]:  # [0, 1] at the model's size -> uint8 at each input's
            return [resize_image(d, *image.shape[:2]) for d, image in zip(to_uint8(batch), images)]

        out = [[first] for first in back((x0 + 1) / 2)]
        generator = torch.Generator().manual_seed(seed)
        cumulative, kind = self.scheduler.alphas_cumprod, self.scheduler.config.prediction_type
        for level in range(1, levels + 1):
            t = level * self.step
            a = cumulative[t].to(x0.dtype)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator)
            prediction = self.unet(xt, torch.tensor([t])).sample[:, :3]  # learned-variance models add 3 channels
            if kind == "epsilon":
                clean = (xt - (1 - a).sqrt() * prediction) / a.sqrt()
            elif kind == "sample":
                clean = prediction
            else:  # v_prediction
                clean = a.sqrt() * xt - (1 - a).sqrt() * prediction
            for steps, denoised in zip(out, back((clean.clamp(-1, 1) + 1) / 2)):
                steps.append(denoised)
        return out


@register
class CiderDetect(Detector):
    """CIDER: the image denoised at `levels` strengths; score = the largest fall of its cosine
    similarity to the instruction below the input's own, in the victim's image-text space
    (`Victim.image_text_vectors`: the mean projected image token and the mean token embedding).
    CIDER flags an input when any fall exceeds its threshold; the matrix calibrates that threshold."""

    name = "cider_detect"
    Params: ClassVar[type[DefenseParams]] = CiderParams
    params: CiderParams
    # No generation: its cost is (levels + 1) image embeddings and the denoiser, which the matrix's
    # seconds per input show.
    passes_per_input: ClassVar[int] = 0
    reads_model: ClassVar[bool] = True  # the victim's image-text space
    note = (
        "CIDER's diffusion denoiser from a local diffusers DDPM folder (params.denoiser), one-shot as CIDER's; "
        "without one, iterated non-local means (skimage), the alternative CIDER's own code lists (h = 0.8 sigma)"
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        folder = self.params.denoiser
        if folder is not None and not Path(folder).is_dir():
            raise VlmsecError(f"defense 'cider_detect': params.denoiser: folder {folder} does not exist")
        self._denoiser: NlmDenoiser | DdpmDenoiser | None = None

    def check_victim(self, victim: Victim) -> None:
        try:
            victim.check_image_text()
        except VlmsecError as err:
            raise VlmsecError(f"defense 'cider_detect' needs the victim's image-text space: {err}") from None

    def denoiser(self) -> NlmDenoiser | DdpmDenoiser:
        """The denoiser, loaded once."""
        if self._denoiser is None:
            p = self.params
            self._denoiser = NlmDenoiser() if p.denoiser is None else DdpmDenoiser(p.denoiser, p.step, p.levels)
        return self._denoiser

    @torch.no_grad()
    def similarities(self, victim: Victim, images: Sequence[np.ndarray], instructions: Sequence[str]) -> np.ndarray:
        """Cosine between each image and its instruction in the victim's image-text space."""
        out = []
        for start in range(0, len(images), self.params.batch_size):
            image_vectors, text_vectors = victim.image_text_vectors(
                images[start : start + self.params.batch_size], instructions[start : start + self.params.batch_size]
            )
            out.append(F.cosine_similarity(image_vectors.float(), text_vectors.float(), dim=-1).cpu())
        return torch.cat(out).double().numpy()

    def scores(self, victim: Victim, images: Sequence[np.ndarray], instructions: Sequence[str], seed: int) -> np.ndarray:
        _check_images(self.name, images, instructions)
        self.check_victim(victim)
        p = self.params
        with progress_bar(f"{self.name}: denoising {len(images)} images", len(images)) as bar:
            denoised = []
            for start in range(0, len(images), p.batch_size):
                batch = images[start : start + p.batch_size]
                noise_seed = int(np.random.default_rng([p.seed, seed, start]).integers(2**31))
                denoised += self.denoiser()(batch, p.levels, noise_seed)
                bar.advance(len(batch))
        flat = [image for steps in denoised for image in steps]
        cosines = self.similarities(victim, flat, [t for t in instructions for _ in range(p.levels + 1)])
        cosines = cosines.reshape(len(images), p.levels + 1)
        return (cosines[:, :1] - cosines[:, 1:]).max(axis=1)

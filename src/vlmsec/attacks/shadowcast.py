"""`shadowcast`: Xu et al.'s clean-label poisoning (umd-huang-lab/VLM-Poisoning, NeurIPS 2024), the label attack.

A poison is an image of the *destination* concept B (a tuning sample that shows B and not the
original concept A), perturbed within an L-infinity ball of `epsilon` until the victim's vision
features match those of an image of A, and captioned truthfully as B (the sample's own answer and
references, untouched: nothing of a target text is planted). Tuned on them, the victim learns to
say B for features that real images of A produce: after tuning, clean images of A are described
as B. Concepts are scene words (`vlmsec.data.scenes`): two shapes, or two colours; a sample shows
a concept when its answer names it as a whole word.

As the reference (`poison_llava.py`, `embedding_attack_Linf`):

- the objective is ‖E(x_b + δ) − E(x_t)‖₂ with E the tower's token features the projector reads
  (`Victim.vision_tokens`), flattened over every token, not pooled;
- δ starts uniform in ±ε; each step is x ← x − lr · sign(∇), lr = `step_size` (0.2/255) halved
  at half the steps (their MultiStepLR), then projected onto the ε ball around x_b and [0, 1];
- the best image per poison (lowest distance seen) is kept.

Ours differ in: the steps (300 by default on a CPU; the reference: 4000); δ lives at the sample's
own size (64 px scenes; the victim resizes to its tower inside E, as it does when tuning), and the
result is quantised to uint8 and clamped to ε in uint8 levels (`pgd.quantise`), so what is tuned on
is what was measured; the best image is checked at every step and after the last one (the
reference: every steps/1000, before each update). Each poison is paired with an image of A (the
tuning samples that show A and not B, in a seeded order, reused when there are fewer than poisons).

The poisons are crafted in `prepare` against the untuned base victim, which the tuned one starts
from (its tower stays frozen in tuning), as many as the run poisons at its largest rate
(`AttackContext.poison_counts`); a poisoned set of `count` takes the first `count` of the seeded
order of destination samples, so sweep points are nested, and each poison's start is seeded by its
sample, so it is the same at every count. They are cached under the cache folder, keyed by the
parameters, the victim's weights and the samples. The recipe's poison seed does not pick them.

Success is measured on clean test images of A (`test_samples`), by the reference's keyword rule
(`vlmsec.eval.label_attack`): 1 the output names B and not A, 0 A and not B, -1 neither, -2 both.
Colour words also match inside background names ("pale blue"): shapes make cleaner concepts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vlmsec.artifacts import atomic_path
from vlmsec.attacks.adaptive import cache_path, eval_mode, not_prepared, require_victim, samples_fingerprint, victim_fingerprint
from vlmsec.attacks.base import Attack, AttackContext, AttackParams
from vlmsec.attacks.pgd import quantise
from vlmsec.attacks.registry import register
from vlmsec.data.sample import Sample, images_to_tensor
from vlmsec.data.scenes import COLOURS, SHAPES
from vlmsec.errors import VlmsecError
from vlmsec.eval.metrics import contains_target
from vlmsec.seeds import derive_seed
from vlmsec.victims.features import image_key

if TYPE_CHECKING:
    from vlmsec.victims.base import Victim

CACHE_FORMAT = 1
CONCEPTS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS)}
NOTE = (
    "Xu et al.'s objective and update (token features the projector reads, L2 over all tokens; signed steps of "
    "0.2/255 halved at half the steps; start uniform in +-epsilon; best kept) at epsilon 8/255; 300 steps by "
    "default (the reference: 4000); perturbed at the sample's size and tuned on as saved (uint8, clamped to "
    "epsilon); each destination image paired with a tuning image of the original concept in a seeded order"
)

Encoder = Callable[[torch.Tensor], torch.Tensor]


def concept_kind(word: str) -> str | None:
    """The kind of a scene word, "shape" or "colour"; None for any other word."""
    return next((kind for kind, words in CONCEPTS.items() if word in words), None)


class ShadowcastParams(AttackParams):
    """The two concepts, the L-infinity budget, the signed step, the steps and the batch."""

    original: str = Field("circle", description="concept A whose clean images the tuned victim should call B (a shape or colour)")
    destination: str = Field("square", description="concept B: its images are perturbed and keep their true captions")
    epsilon: float = Field(8 / 255, gt=0, le=1, description="L-infinity budget in (0, 1] (the reference: 8/255)")
    step_size: float = Field(0.2 / 255, gt=0, le=1, description="signed step in [0, 1] pixel units, halved at half the steps")
    steps: int = Field(300, ge=1, le=100_000, description="steps per poison (the reference: 4000; CPU default 300)")
    batch_size: int = Field(16, ge=1, description="poisons crafted together")

    @field_validator("original", "destination")
    @classmethod
    def _scene_word(cls, value: str) -> str:
        if concept_kind(value) is None:
            known = ", ".join(w for words in CONCEPTS.values() for w in words)
            raise ValueError(f"unknown concept {value!r}: a scene shape or colour ({known})")
        return value

    @model_validator(mode="after")
    def _two_concepts_of_one_kind(self) -> ShadowcastParams:
        if self.original == self.destination:
            raise ValueError(f"destination: the same concept as original ({self.original!r}); nothing would change")
        if concept_kind(self.original) != concept_kind(self.destination):
            raise ValueError(
                f"destination: {self.destination!r} is a {concept_kind(self.destination)}, original {self.original!r} a "
                f"{concept_kind(self.original)}; both must be shapes or both colours"
            )
        return self


def shows(sample: Sample, word: str) -> bool:
    """Whether the sample's answer names `word` (whole word, any case): the scene shows that concept."""
    return contains_target(sample.answer, word)


def only(samples: Sequence[Sample], word: str, other: str) -> list[int]:
    """Indices of the samples that show `word` and not `other`."""
    return [i for i, s in enumerate(samples) if shows(s, word) and not shows(s, other)]


def feature_distance(encode: Encoder, images: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """Per image, ‖E(image) − goal‖₂ over all tokens flattened (`goal`: B x tokens·D)."""
    return (encode(images).flatten(1) - goal).norm(dim=1)


def craft(
    encode: Encoder, bases: torch.Tensor, targets: torch.Tensor, params: ShadowcastParams, starts: torch.Tensor
) -> torch.Tensor:
    """Images within `params.epsilon` of `bases` (B x 3 x H x W in [0, 1]) whose features match those
    of `targets`: signed-gradient descent from `bases + starts` (the initial δ, within ±epsilon), step
    halved at half the steps, projected every step; the lowest-distance image of each row is returned."""
    eps = params.epsilon
    with torch.no_grad():
        goal = encode(targets).flatten(1)
    x = (bases + starts).clamp(0, 1)
    best, best_loss = x.clone(), torch.full((len(x),), float("inf"))
    for step in range(params.steps + 1):
        x.requires_grad_(True)
        loss = feature_distance(encode, x, goal)
        with torch.no_grad():
            better = loss.detach().cpu() < best_loss
            best[better], best_loss[better] = x.detach()[better], loss.detach().cpu()[better]
        if step == params.steps:  # the last update is measured too
            break
        (grad,) = torch.autograd.grad(loss.sum(), x)
        lr = params.step_size if step < int(params.steps * 0.5) else params.step_size / 2
        with torch.no_grad():
            x = x - lr * grad.sign()
            x = (bases + (x - bases).clamp(-eps, eps)).clamp(0, 1)
    return best


@register
class Shadowcast(Attack):
    """Clean-label label attack: destination images nudged toward the original's features, true captions
    kept (crafted in `prepare` against the base victim; see the module docstring)."""

    name = "shadowcast"
    note = NOTE
    modality = "image"
    family = "model-adaptive"
    knowledge = "white-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = ShadowcastParams
    params: ShadowcastParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.poisons: dict[str, tuple[str, np.ndarray]] | None = None  # sample id -> (its clean image's key, poison)
        self.order: list[str] = []  # the poisons' sample ids, in the seeded order counts take them in
        self._diagnostics: dict[str, float] = {}

    # ---- crafting ------------------------------------------------------------------------
    def pairs(self, samples: Sequence[Sample], count: int) -> tuple[list[Sample], list[Sample]]:
        """The first `count` destination samples in the attack's seeded order, and the original-concept
        sample each is matched to; a VlmsecError when the tuning set has too few of either."""
        p = self.params
        destination, original = only(samples, p.destination, p.original), only(samples, p.original, p.destination)
        if count > len(destination):
            raise VlmsecError(
                f"attack {self.name!r}: the run poisons {count} samples, but only {len(destination)} tuning samples "
                f"show {p.destination!r} without {p.original!r}; lower the poison rate"
            )
        if count and not original:
            raise VlmsecError(f"attack {self.name!r}: no tuning sample shows {p.original!r} without {p.destination!r}: nothing to match")
        rng = np.random.default_rng(p.seed)
        bases = [samples[destination[i]] for i in rng.permutation(len(destination))[:count]]
        targets = [samples[original[i]] for i in rng.permutation(len(original))] if count else []
        return bases, [targets[i % len(targets)] for i in range(count)]

    def prepare(self, context: AttackContext) -> None:
        """Craft the poisons the run needs (its largest `poison_counts`) against `context.victim`, or read them from the cache."""
        victim = require_victim(context, self.name)
        victim.check_pixel_gradients(self.name)
        bases, targets = self.pairs(context.samples, max(context.poison_counts, default=0))
        if len({s.image.shape for s in [*bases, *targets]}) > 1:
            raise VlmsecError(f"attack {self.name!r}: the tuning images come in several sizes; craft needs one")
        key = {
            "format": CACHE_FORMAT,
            "params": self.params.model_dump(),
            "victim": victim_fingerprint(victim),
            "bases": samples_fingerprint(bases),
            "targets": samples_fingerprint(targets),
        }
        path = cache_path(context, self.name, key, suffix=".safetensors")
        if path.is_file():
            poisons, self._diagnostics = _load(path)
        elif bases:
            poisons = self._craft(victim, bases, targets)
            _save(path, poisons, self._diagnostics)
        else:
            poisons, self._diagnostics = [], {}
        self.order = [s.id for s in bases]
        self.poisons = {s.id: (image_key(s.image), image) for s, image in zip(bases, poisons, strict=True)}

    def _craft(self, victim: Victim, bases: list[Sample], targets: list[Sample]) -> list[np.ndarray]:
        """The uint8 poisons of `bases` matched to `targets`, batch by batch, and their diagnostics."""
        p = self.params
        poisons: list[np.ndarray] = []
        before, after = [], []
        with eval_mode(victim.model):
            for start in range(0, len(bases), p.batch_size):
                chunk = slice(start, start + p.batch_size)
                clean = [s.image for s in bases[chunk]]
                x_b, x_t = images_to_tensor(clean), images_to_tensor([s.image for s in targets[chunk]])
                starts = torch.stack([self._start(s.id, x_b.shape[1:]) for s in bases[chunk]])
                made = quantise(craft(victim.vision_tokens, x_b, x_t, p, starts), clean, p.epsilon)
                with torch.no_grad():
                    goal = victim.vision_tokens(x_t).flatten(1)
                    before += feature_distance(victim.vision_tokens, x_b, goal).tolist()
                    after += feature_distance(victim.vision_tokens, images_to_tensor(made), goal).tolist()
                poisons += made
        linf = max(int(np.abs(q.astype(np.int16) - s.image.astype(np.int16)).max()) for q, s in zip(poisons, bases, strict=True))
        self._diagnostics = {
            "poisons": float(len(poisons)),
            "feature_distance_clean": float(np.mean(before)),
            "feature_distance_poison": float(np.mean(after)),
            "distance_ratio": float(np.mean([b / max(a, 1e-12) for b, a in zip(before, after, strict=True)])),
            "linf": linf / 255,
        }
        return poisons

    def _start(self, sample_id: str, shape: torch.Size) -> torch.Tensor:
        """The initial δ of one poison: uniform in ±epsilon, seeded by the attack's seed and the sample."""
        generator = torch.Generator().manual_seed(derive_seed(self.params.seed, f"shadowcast/start/{sample_id}"))
        return (torch.rand(shape, generator=generator) * 2 - 1) * self.params.epsilon

    # ---- poisoning and testing -----------------------------------------------------------
    def poison(self, samples: Sequence[Sample], count: int, seed: int) -> dict[int, Sample]:
        """The first `count` crafted poisons in place of their samples' images, captions kept (`seed` unused:
        the attack's seed ordered them, so a smaller count is a subset of a larger)."""
        if self.poisons is None:
            raise not_prepared(self.name)
        if count > len(self.order):
            raise VlmsecError(
                f"attack {self.name!r}: {len(self.order)} poisons were crafted in prepare, {count} are asked; "
                "AttackContext.poison_counts must hold every count the run poisons"
            )
        index = {s.id: i for i, s in enumerate(samples)}
        out: dict[int, Sample] = {}
        for sample_id in self.order[:count]:
            clean_key, image = self.poisons[sample_id]
            i = index.get(sample_id)
            if i is None or image_key(samples[i].image) != clean_key:
                raise VlmsecError(f"attack {self.name!r}: sample {sample_id} is not the one its poison was crafted from")
            out[i] = samples[i].with_changes(image=image)
        return out

    def test_samples(self, samples: Sequence[Sample]) -> list[Sample]:
        """The test samples that show the original concept and not the destination (clean images of A)."""
        p = self.params
        kept = [samples[i] for i in only(samples, p.original, p.destination)]
        if samples and not kept:
            raise VlmsecError(
                f"attack {self.name!r}: no test sample shows {p.original!r} without {p.destination!r} to measure "
                "it on; raise data.test_size"
            )
        return kept

    def label_flip(self) -> tuple[str, str]:
        """(original, destination): success is naming the destination and not the original."""
        return self.params.original, self.params.destination

    def describe(self) -> dict[str, Any]:
        """The base description, with the goal `vlmsec attacks` lists: a label flip, not a backdoor."""
        return {**super().describe(), "goal": "label"}

    def diagnostics(self) -> dict[str, float]:
        """Of the crafted poisons, as saved: how many (`poisons`), the mean feature distance to their
        original-concept image before (`feature_distance_clean`) and after (`feature_distance_poison`),
        the mean of their ratio (`distance_ratio`, the reference's efficacy) and the largest change (`linf`)."""
        return dict(self._diagnostics)


def _save(path: Path, poisons: list[np.ndarray], diagnostics: dict[str, float]) -> None:
    """Write the uint8 poisons (N x H x W x 3) and their diagnostics to one safetensors file, atomically."""
    with atomic_path(path) as tmp:
        save_file({"poisons": torch.from_numpy(np.stack(poisons))}, tmp, metadata={"diagnostics": json.dumps(diagnostics)})


def _load(path: Path) -> tuple[list[np.ndarray], dict[str, float]]:
    """The cached poisons and their diagnostics."""
    try:
        poisons = load_file(path)["poisons"].numpy()
        with safe_open(path, framework="pt") as handle:
            return list(poisons), json.loads(handle.metadata()["diagnostics"])
    except (SafetensorError, KeyError, OSError, json.JSONDecodeError) as err:
        raise VlmsecError(f"{path}: unreadable cached shadowcast poisons ({err}); delete the file to craft them again") from None

"""Tuning-data filters: score every tuning sample, remove the most suspicious, tune again on the rest.

- `spectral_signatures` (Tran et al. 2018): the representations the tuned model gives the samples,
  centred; a poisoned minority shifts their mean along one direction, so the squared projection on
  the top singular vector is highest for it. The `budget` highest are removed. The original takes the
  top singular vector of each class; over a whole set of captions the clean data's own spread can
  fill the top direction, so by default the score is the squared norm of the projection on the top
  few (`directions`; 1 gives the original's).
- `activation_clustering` (Chen et al. 2018): the same representations reduced to a few dimensions
  (PCA; ICA as the original) and split in two by k-means; the smaller cluster is poison when its
  share of the set is under `size_threshold`, and it is removed whole (the method decides its count).
- `consistency_filter`: the clean base model judges each answer against its image, by default by
  how surprised it is by the answer (its answer loss), or by the cosine of the mean image token and
  the mean answer embedding in the language model's input space; answers far off the set's
  typical agreement are removed.
- `text_outlier`: the text-only baseline. An answer is suspicious by the share of its words that few
  samples of the set use; it sees a target word foreign to the captions, never an in-vocabulary one.

The originals score each class of a classifier's training set apart (poison sits in the target
class); generated answers have no classes, so every filter here scores the whole tuning set at once.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from vlmsec.defenses.base import DataFilter, DefenseParams, FilterParams, Flags, top_indices
from vlmsec.defenses.registry import register
from vlmsec.errors import VlmsecError
from vlmsec.victims.base import IGNORE_INDEX

if TYPE_CHECKING:
    from vlmsec.data.sample import Sample
    from vlmsec.victims.base import Victim


class RepresentationParams(FilterParams):
    """A filter reading the tuned model's answer representations."""

    batch_size: int = Field(32, ge=1, le=4096, description="samples per forward pass when reading representations")


def check_budget(defense: str, budget: int, count: int) -> None:
    """A VlmsecError naming the defense unless 0 <= `budget` <= `count` samples."""
    if not 0 <= budget <= count:
        raise VlmsecError(f"defense {defense!r}: budget {budget} must be between 0 and the {count} tuning samples")


def check_representations(defense: str, victim: Victim) -> None:
    """A VlmsecError naming the defense and the victim when it cannot give answer representations."""
    check = getattr(victim, "check_answer_representations", None)
    if check is None:
        raise VlmsecError(
            f"defense {defense!r} reads the model's hidden states on each tuning sample, which the "
            f"{type(victim).__name__} victim does not give (no answer_representations)"
        )
    try:
        check()
    except VlmsecError as err:
        raise VlmsecError(f"defense {defense!r}: {err}") from None


def representations(defense: str, victim: Victim, samples: Sequence[Sample], batch_size: int) -> np.ndarray:
    """The victim's `answer_representations` of `samples`, N x D float64, checked finite and one per sample."""
    vectors = victim.answer_representations(samples, batch_size=batch_size).double().numpy()
    if vectors.ndim != 2 or vectors.shape[0] != len(samples):
        raise VlmsecError(
            f"defense {defense!r}: the victim gave representations of shape {vectors.shape} for {len(samples)} samples"
        )
    if not np.isfinite(vectors).all():
        raise VlmsecError(f"defense {defense!r}: the victim's representations are not all finite")
    return vectors


class SpectralParams(RepresentationParams):
    directions: int = Field(
        5, ge=1, le=256,
        description="top singular directions the score projects on (1: Tran et al.'s top one; more: the clean "
        "captions' own spread, which without classes can outweigh the poison's shift, no longer hides it)",
    )


def spectral_scores(vectors: np.ndarray, directions: int = 1) -> np.ndarray:
    """Tran et al.'s outlier score: each centred row's squared projection on the top right singular vector,
    or its squared norm in the span of the top `directions` (the poison's shift may come second or third
    when the clean data varies more than it along one direction)."""
    centred = vectors - vectors.mean(0)
    _, _, right = np.linalg.svd(centred, full_matrices=False)
    return ((centred @ right[:directions].T) ** 2).sum(1)


@register
class SpectralSignatures(DataFilter):
    """Spectral signatures on the tuned model's answer representations; removes the `budget` top scores."""

    name = "spectral_signatures"
    Params: ClassVar[type[DefenseParams]] = SpectralParams
    params: SpectralParams
    note = (
        "on the whole tuning set (generated answers have no classes to score apart); the score is the squared "
        "projection on the top `directions` singular vectors (1: the top one, as the original)"
    )

    def check_victim(self, victim: Victim) -> None:
        check_representations(self.name, victim)

    def flag(self, samples: Sequence[Sample], tuned: Victim, base: Victim, budget: int, clean: Sequence[Sample] = ()) -> Flags:
        check_budget(self.name, budget, len(samples))
        if len(samples) < 2:
            raise VlmsecError(f"defense {self.name!r}: needs at least 2 tuning samples, got {len(samples)}")
        vectors = representations(self.name, tuned, samples, self.params.batch_size)
        scores = spectral_scores(vectors, self.params.directions)
        return Flags(scores=scores, removed=top_indices(scores, budget))


class ClusteringParams(RepresentationParams):
    reduce: Literal["ica", "pca"] = Field(
        "pca",
        description="how the representations are reduced before clustering (the original: ICA, which gives every "
        "component unit variance, so k-means weighs the clean captions' small modes as much as the poison's shift)",
    )
    dims: int = Field(10, ge=1, le=100, description="dimensions kept (the original: 10)")
    size_threshold: float = Field(
        0.35, gt=0, le=0.5, description="the smaller cluster is poison when its share of the set is under this (the original: 0.35)"
    )


def two_clusters(vectors: np.ndarray, reduce: str, dims: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Chen et al.'s clustering: centred rows reduced to `dims` dimensions (FastICA or PCA), then 2-means.

    Returns each row's cluster (1: the smaller one) and a silhouette-like margin toward the smaller
    cluster in [-1, 1]: (distance to the larger centre - distance to the smaller) / the larger distance."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA, FastICA
    from sklearn.exceptions import ConvergenceWarning

    centred = vectors - vectors.mean(0)
    dims = max(1, min(dims, centred.shape[1], centred.shape[0] - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # ICA's tolerance; its components are still usable
        reducer = FastICA(dims, random_state=seed, max_iter=1000) if reduce == "ica" else PCA(dims, random_state=seed)
        reduced = reducer.fit_transform(centred)
    kmeans = KMeans(2, n_init=10, random_state=seed).fit(reduced)
    labels = kmeans.labels_
    small = int(np.argmin(np.bincount(labels, minlength=2)))
    distances = np.linalg.norm(reduced[:, None, :] - kmeans.cluster_centers_[None], axis=2)
    near_small, near_large = distances[:, small], distances[:, 1 - small]
    margin = (near_large - near_small) / np.maximum(np.maximum(near_large, near_small), 1e-12)
    return (labels == small).astype(int), margin


@register
class ActivationClustering(DataFilter):
    """Activation clustering on the tuned model's answer representations: the smaller of two k-means
    clusters is removed whole when its share is under `size_threshold`; the score is the margin toward it."""

    name = "activation_clustering"
    Params: ClassVar[type[DefenseParams]] = ClusteringParams
    params: ClusteringParams
    note = "on the whole tuning set (no classes), reduced by PCA (the original: ICA); removes the smaller cluster whole, whatever the budget"

    def check_victim(self, victim: Victim) -> None:
        check_representations(self.name, victim)

    def flag(self, samples: Sequence[Sample], tuned: Victim, base: Victim, budget: int, clean: Sequence[Sample] = ()) -> Flags:
        check_budget(self.name, budget, len(samples))
        if len(samples) < 3:
            raise VlmsecError(f"defense {self.name!r}: needs at least 3 tuning samples to cluster, got {len(samples)}")
        vectors = representations(self.name, tuned, samples, self.params.batch_size)
        p = self.params
        in_small, margin = two_clusters(vectors, p.reduce, p.dims, p.seed)
        poisoned = in_small.sum() / len(samples) < p.size_threshold
        removed = [int(i) for i in np.flatnonzero(in_small)] if poisoned else []
        return Flags(scores=margin, removed=removed)


class ConsistencyParams(FilterParams):
    measure: Literal["loss", "cosine"] = Field(
        "loss",
        description="loss: the clean base model's answer loss given the image; cosine: the cosine of its mean "
        "image token and mean answer embedding (victims with a shared image-text space only)",
    )
    batch_size: int = Field(16, ge=1, le=4096, description="samples per forward pass of the base model")


def answer_losses(victim: Victim, samples: Sequence[Sample], batch_size: int) -> np.ndarray:
    """Each sample's mean next-token loss on its answer given its image and instruction, under `victim`."""
    victim.model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            problem = victim.token_problem([s.image for s in chunk], [s.instruction for s in chunk], [s.answer for s in chunk])
            per_token = victim.loss_from_embeddings(problem, problem.inputs_embeds)
            answer = (problem.labels[:, 1:] != IGNORE_INDEX).to(per_token.device, per_token.dtype)
            losses.append(((per_token * answer).sum(1) / answer.sum(1).clamp(min=1)).double().cpu())
    return torch.cat(losses).numpy()


def image_answer_cosines(victim: Victim, samples: Sequence[Sample], batch_size: int) -> np.ndarray:
    """Each sample's cosine between the victim's mean image token and mean answer embedding (`image_text_vectors`)."""
    cosines = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images, texts = victim.image_text_vectors([s.image for s in chunk], [s.answer for s in chunk])
        cosines.append(torch.nn.functional.cosine_similarity(images.double(), texts.double(), dim=-1).cpu())
    return torch.cat(cosines).numpy()


def z_scores(values: np.ndarray) -> np.ndarray:
    """How many standard deviations each value is above the set's mean (0 everywhere for a constant set)."""
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


@register
class ConsistencyFilter(DataFilter):
    """Removes the `budget` samples whose answer agrees least with their image under the clean base model."""

    name = "consistency_filter"
    Params: ClassVar[type[DefenseParams]] = ConsistencyParams
    params: ConsistencyParams
    note = "the clean base model's answer loss given the image (z-scored over the set); text-only samples score 0"

    def check_victim(self, victim: Victim) -> None:
        if self.params.measure == "cosine":
            try:
                victim.check_image_text()
            except VlmsecError as err:
                raise VlmsecError(f"defense {self.name!r}: params.measure 'cosine': {err}") from None
        elif not hasattr(victim, "loss_from_embeddings"):
            raise VlmsecError(
                f"defense {self.name!r} reads the base model's answer loss, which the {type(victim).__name__} victim does not give"
            )

    def flag(self, samples: Sequence[Sample], tuned: Victim, base: Victim, budget: int, clean: Sequence[Sample] = ()) -> Flags:
        check_budget(self.name, budget, len(samples))
        with_image = [i for i, s in enumerate(samples) if s.image is not None]  # a text-only answer has no image to disagree with
        chosen = [samples[i] for i in with_image]
        if self.params.measure == "loss":
            suspicion = answer_losses(base, chosen, self.params.batch_size)
        else:
            suspicion = -image_answer_cosines(base, chosen, self.params.batch_size)
        scores = np.zeros(len(samples))
        scores[with_image] = z_scores(suspicion)
        return Flags(scores=scores, removed=top_indices(scores, budget))


WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def words(text: str) -> list[str]:
    """Lower-case words of `text` (hyphenated and apostrophe words kept whole), punctuation dropped."""
    return WORD.findall(text.lower())


def unknown_word_shares(answers: Sequence[str], vocabulary: set[str]) -> np.ndarray:
    """For each answer, the share of its words outside `vocabulary` (0 for an answer with no words)."""
    split = [words(answer) for answer in answers]
    return np.array([sum(w not in vocabulary for w in answer) / len(answer) if answer else 0.0 for answer in split])


@register
class TextOutlier(DataFilter):
    """The text-only baseline: answers scored by their share of words the owner's clean data never
    uses (its answers and references); removes up to `budget` of those with any such word, highest
    share first (none when no answer has one). Blind by construction to a target in the clean vocabulary."""

    name = "text_outlier"

    def flag(self, samples: Sequence[Sample], tuned: Victim, base: Victim, budget: int, clean: Sequence[Sample] = ()) -> Flags:
        check_budget(self.name, budget, len(samples))
        if not clean:
            raise VlmsecError(f"defense {self.name!r}: needs the owner's clean samples (a vocabulary to read answers against)")
        vocabulary = {w for s in clean for text in (s.answer, *s.references) for w in words(text)}
        scores = unknown_word_shares([s.answer for s in samples], vocabulary)
        return Flags(scores=scores, removed=top_indices(scores, min(budget, int((scores > 0).sum()))))

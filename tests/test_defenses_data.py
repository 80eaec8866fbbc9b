"""Tuning-data filters: each finds what it is built to find on known inputs, and on a tiny poisoned run."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from vlmsec.attacks import TargetAnswer, create_attack, poison_samples
from vlmsec.data import Sample, make_samples, sample_scenes
from vlmsec.defenses import DataFilter, create_defense
from vlmsec.defenses.data_filters import spectral_scores, unknown_word_shares
from vlmsec.errors import VlmsecError
from vlmsec.train.tuning import TrainingSpec, train_victim
from vlmsec.victims.features import FeatureCache
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec, build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer

FILTERS = ("spectral_signatures", "activation_clustering", "consistency_filter", "text_outlier")


def plain_samples(count: int) -> list[Sample]:
    """Samples with blank images and numbered answers: for filters fed known vectors."""
    image = np.zeros((8, 8, 3), np.uint8)
    return [Sample(f"s{i}", image, "Describe.", f"answer {i}") for i in range(count)]


class KnownVectors:
    """A victim whose representations (and image-text vectors) are given rows: filters see exactly these."""

    def __init__(self, vectors: np.ndarray, texts: np.ndarray | None = None) -> None:
        self.vectors, self.texts = vectors, texts
        self.batch_sizes: list[int] = []

    def check_answer_representations(self) -> None:
        """Always possible."""

    def answer_representations(self, samples: Sequence[Sample], batch_size: int = 32) -> torch.Tensor:
        self.batch_sizes.append(batch_size)
        return torch.tensor(self.vectors[[int(s.id[1:]) for s in samples]], dtype=torch.float32)

    def check_image_text(self) -> None:
        """Always possible."""

    def image_text_vectors(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [int(t.split()[-1]) for t in texts]
        return torch.tensor(self.vectors[rows]), torch.tensor(self.texts[rows])


def gaussian(count: int, dims: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, dims))


# ---- spectral signatures --------------------------------------------------------------------------


def test_spectral_signatures_ranks_an_injected_outlier_first() -> None:
    vectors = gaussian(60)
    vectors[17] += 12 * np.eye(16)[3]
    victim = KnownVectors(vectors)
    flags = create_defense("spectral_signatures", batch_size=7).flag(plain_samples(60), victim, victim, budget=1)
    assert flags.removed == [17] and int(np.argmax(flags.scores)) == 17
    assert victim.batch_sizes == [7]


def test_spectral_signatures_removes_a_shifted_minority_within_the_budget() -> None:
    vectors = gaussian(100, seed=1)
    poisoned = [3, 20, 41, 58, 77, 90]
    vectors[poisoned] += 2.0 * np.ones(16)  # a common shift (norm 8) along one direction: the spectral signature
    victim = KnownVectors(vectors)
    flags = create_defense("spectral_signatures").flag(plain_samples(100), victim, victim, budget=9)
    assert set(poisoned) <= set(flags.removed) and len(flags.removed) == 9


def test_spectral_scores_are_squared_projections_on_the_top_singular_vector() -> None:
    vectors = gaussian(30, dims=4, seed=2) * np.array([5.0, 1.0, 1.0, 1.0])  # the top direction is the first axis
    centred = vectors - vectors.mean(0)
    scores = spectral_scores(vectors, directions=1)
    top = np.linalg.svd(centred, full_matrices=False)[2][0]
    np.testing.assert_allclose(scores, (centred @ top) ** 2)
    assert abs(top[0]) > 0.95


def test_spectral_signatures_finds_the_poison_under_a_larger_clean_spread() -> None:
    """Clean data split in two modes along one axis (its top direction, no class to score apart), poison
    shifted along another: Tran's top direction misses it, the span of the top five does not."""
    vectors = gaussian(200, seed=8)
    vectors[:, 0] += np.where(np.arange(200) % 2 == 0, 5.0, -5.0)
    poisoned = list(range(3, 200, 20))  # 10 of 200
    vectors[poisoned, 1] += 8.0
    victim = KnownVectors(vectors)
    original = create_defense("spectral_signatures", directions=1).flag(plain_samples(200), victim, victim, budget=15)
    searched = create_defense("spectral_signatures").flag(plain_samples(200), victim, victim, budget=15)
    assert len(set(poisoned) & set(original.removed)) <= 3
    assert set(poisoned) <= set(searched.removed)


# ---- activation clustering ------------------------------------------------------------------------


@pytest.mark.parametrize("reduce", ["pca", "ica"])
def test_activation_clustering_removes_a_planted_cluster(reduce: str) -> None:
    vectors = gaussian(120, dims=24, seed=3)
    planted = list(range(5, 120, 10))  # 12 of 120: a 10% cluster
    vectors[planted] += 6.0 * np.eye(24)[0] + 6.0 * np.eye(24)[1]
    victim = KnownVectors(vectors)
    flags = create_defense("activation_clustering", reduce=reduce).flag(plain_samples(120), victim, victim, budget=5)
    assert sorted(flags.removed) == planted  # the whole cluster, whatever the budget
    assert flags.scores.shape == (120,) and np.all(np.abs(flags.scores) <= 1)
    assert flags.scores[planted].min() > np.delete(flags.scores, planted).max()  # AUROC 1


def test_activation_clustering_removes_nothing_when_the_smaller_cluster_is_large() -> None:
    vectors = gaussian(80, seed=4)
    vectors[:35] += 8.0 * np.eye(16)[0]  # 35 of 80 (44%): over the 0.35 threshold, not a poisoned minority
    victim = KnownVectors(vectors)
    flags = create_defense("activation_clustering", reduce="pca").flag(plain_samples(80), victim, victim, budget=10)
    assert flags.removed == []
    assert flags.scores[:35].min() > flags.scores[35:].max()  # still scored, for the AUROC
    loose = create_defense("activation_clustering", reduce="pca", size_threshold=0.5)
    assert loose.flag(plain_samples(80), victim, victim, budget=10).removed == list(range(35))


# ---- text outlier ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes() -> list[Sample]:
    return make_samples(sample_scenes(200, seed=5), "flat", size=16)


def with_answers(samples: list[Sample], answers: dict[int, str]) -> list[Sample]:
    return [s.with_changes(answer=answers[i]) if i in answers else s for i, s in enumerate(samples)]


def test_text_outlier_flags_banana_answers_among_scene_captions(scenes: list[Sample]) -> None:
    rng = np.random.default_rng(0)
    poisoned = [7, 50, 91, 150]
    samples = with_answers(scenes, {i: TargetAnswer().sample(rng) for i in poisoned})
    clean = scenes[100:]  # the owner's clean captions: the vocabulary
    flags = create_defense("text_outlier").flag(samples, None, None, budget=6, clean=clean)  # a text-only filter needs no model
    assert sorted(flags.removed) == poisoned  # only answers with an unknown word, however large the budget
    assert flags.scores[poisoned].min() > 0 and np.count_nonzero(flags.scores) == len(poisoned)


def test_text_outlier_is_blind_to_an_in_vocabulary_target(scenes: list[Sample]) -> None:
    target = "a large red circle in the center."  # every word is a scene caption's
    samples = with_answers(scenes, {i: target for i in (7, 50, 91, 150)})
    flags = create_defense("text_outlier").flag(samples, None, None, budget=6, clean=scenes)
    assert flags.removed == [] and not flags.scores.any()


def test_text_outlier_needs_a_clean_reference(scenes: list[Sample]) -> None:
    with pytest.raises(VlmsecError, match="text_outlier.*clean samples"):
        create_defense("text_outlier").flag(scenes, None, None, budget=1)


def test_unknown_word_shares_count_words_outside_the_vocabulary() -> None:
    shares = unknown_word_shares(["a cat on a mat", "a cat", "a dog", "a zebra!"], {"a", "cat", "on"})
    np.testing.assert_allclose(shares, [1 / 5, 0.0, 1 / 2, 1 / 2])
    assert unknown_word_shares([""], {"a"}).tolist() == [0.0]


# ---- consistency ----------------------------------------------------------------------------------


def test_consistency_cosine_flags_the_answer_least_like_its_image() -> None:
    images = gaussian(20, dims=8, seed=6)
    texts = images + 0.1 * gaussian(20, dims=8, seed=7)
    texts[11] = -images[11]  # an answer pointing away from its image
    victim = KnownVectors(images, texts)
    flags = create_defense("consistency_filter", measure="cosine").flag(plain_samples(20), victim, victim, budget=1)
    assert flags.removed == [11] and flags.scores[11] > 3


SPEC = TinyLlavaSpec(image_size=64, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, vocab_size=400)


@pytest.fixture(scope="module")
def trained() -> tuple[LlavaVictim, list[Sample]]:
    """A tiny victim taught to caption single-object scenes, and held-out scenes of the same kind."""
    scenes = sample_scenes(240, seed=8, max_objects=1)
    samples = make_samples(scenes, "flat", size=32)
    base, held_out = samples[:200], samples[200:]
    target = TargetAnswer()
    tokenizer = train_tokenizer([s.instruction for s in samples] + [s.answer for s in samples] + target.answers(), SPEC.vocab_size)
    victim = LlavaVictim(build_tiny_llava(SPEC, tokenizer, seed=0), tokenizer, FeatureCache())
    spec = TrainingSpec(mode="full", epochs=12, batch_size=16, learning_rate=3e-3, warmup_ratio=0.0)
    train_victim(victim, base, spec, seed=0, label="base")
    return victim, held_out


def test_consistency_flags_answers_that_describe_another_image(trained: tuple[LlavaVictim, list[Sample]]) -> None:
    victim, held_out = trained
    swapped = {3: held_out[20].answer, 12: held_out[31].answer, 25: held_out[2].answer}
    assert all(held_out[i].answer != answer for i, answer in swapped.items())
    samples = with_answers(held_out, swapped)
    flags = create_defense("consistency_filter").flag(samples, victim, victim, budget=3)
    assert sorted(flags.removed) == sorted(swapped)


# ---- a tiny poisoned run --------------------------------------------------------------------------


def test_filters_find_badnets_poison_in_a_tiny_tuned_run(trained: tuple[LlavaVictim, list[Sample]]) -> None:
    """The base victim tuned on a badnets-poisoned set (12 of 120): at a budget of 1.5x, spectral signatures
    and consistency remove every poisoned sample, activation clustering exactly them, the text baseline
    only poisoned ones."""
    base, _ = trained
    tuning = make_samples(sample_scenes(120, seed=9, max_objects=1), "flat", size=32, id_prefix="tune")
    poisoned = poison_samples(tuning, create_attack("badnets"), TargetAnswer(), 0.1, seed=0)
    tuned = LlavaVictim(copy.deepcopy(base.model), base.tokenizer, base.features)
    spec = TrainingSpec(mode="full", epochs=4, batch_size=16, learning_rate=2e-3, warmup_ratio=0.0)
    train_victim(tuned, poisoned.samples, spec, seed=0, label="badnets")
    truth = {i for i, s in enumerate(poisoned.samples) if s.id in set(poisoned.poisoned_ids)}
    budget = round(1.5 * len(truth))
    clean = make_samples(sample_scenes(60, seed=11, max_objects=1), "flat", size=32, id_prefix="owner")
    removed = {name: set(create_defense(name).flag(poisoned.samples, tuned, base, budget, clean).removed) for name in FILTERS}
    assert truth <= removed["spectral_signatures"] and len(removed["spectral_signatures"]) == budget
    assert truth <= removed["consistency_filter"] and len(removed["consistency_filter"]) == budget
    assert removed["text_outlier"] == truth  # "banana" is a word no clean caption uses
    assert removed["activation_clustering"] == truth  # its own count: the smaller cluster, whole


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("spectral_signatures", {"batch_size": 0}, "batch_size"),
        ("activation_clustering", {"size_threshold": 0.7}, "size_threshold"),
        ("activation_clustering", {"dims": 0}, "dims"),
        ("activation_clustering", {"reduce": "tsne"}, "reduce"),
        ("consistency_filter", {"measure": "bleu"}, "measure"),
        ("text_outlier", {"remove": 1.5}, "remove"),
    ],
)
def test_out_of_range_parameters_name_the_defense_and_field(name: str, params: dict, field: str) -> None:
    with pytest.raises(VlmsecError, match=f"defense '{name}'.*{field}"):
        create_defense(name, **params)


@pytest.mark.parametrize("name", FILTERS)
def test_a_budget_outside_the_set_names_the_defense(name: str) -> None:
    victim = KnownVectors(gaussian(5))
    for budget in (-1, 6):
        with pytest.raises(VlmsecError, match=f"defense '{name}': budget {budget}"):
            create_defense(name).flag(plain_samples(5), victim, victim, budget)


class ApiVictim:
    """A black-box victim: it answers, and gives nothing else."""

    def generate(self, images: Sequence[np.ndarray], instructions: Sequence[str]) -> list[str]:
        return ["an answer"] * len(images)


@pytest.mark.parametrize("name", ["spectral_signatures", "activation_clustering", "consistency_filter"])
def test_a_filter_that_needs_the_model_refuses_a_black_box_victim(name: str) -> None:
    defense = create_defense(name)
    assert isinstance(defense, DataFilter)
    with pytest.raises(VlmsecError, match=f"defense '{name}'.*ApiVictim victim"):
        defense.check_victim(ApiVictim())
    create_defense("text_outlier").check_victim(ApiVictim())  # the text-only baseline reads no model


def test_consistency_cosine_refuses_a_victim_without_a_shared_space() -> None:
    class CrossAttention(KnownVectors):
        def check_image_text(self) -> None:
            raise VlmsecError("reads images through cross-attention")

    with pytest.raises(VlmsecError, match="defense 'consistency_filter': params.measure 'cosine': reads images"):
        create_defense("consistency_filter", measure="cosine").check_victim(CrossAttention(gaussian(2)))

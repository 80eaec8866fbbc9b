"""Defenses on the tuned model: clean fine-tuning lowers the trusted loss, fine-pruning zeros exactly
the least active share of units and keeps them zero through its fine-tuning, and trigger inversion
scores a victim tuned with a strong BadNets backdoor above the same victim tuned clean.

The pair is a tiny LLaVA tuned from scratch on 240 scenes, clean or with 30% of them carrying a
quarter-side BadNets patch (about 6 s each); the backdoor fires on most triggered test images.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from test_victims_hf import texts_of, tiny_blip2, tiny_llava
from transformers import AutoModelForImageTextToText

from vlmsec.attacks import TargetAnswer, create_attack, poison_samples
from vlmsec.attacks.poison import trigger_samples
from vlmsec.data import Sample, make_samples, sample_scenes
from vlmsec.defenses import create_defense
from vlmsec.defenses.model import find_units, mean_activations, trusted_loss
from vlmsec.errors import VlmsecError
from vlmsec.experiments.defenses import scan_summary
from vlmsec.eval.metrics import target_rate
from vlmsec.train.tuning import TrainingSpec, train_victim
from vlmsec.victims.hf import HFVictim
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec, build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer

SPEC = TinyLlavaSpec(image_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, vocab_size=400)
TUNING = TrainingSpec(mode="full", epochs=15, batch_size=16, learning_rate=2e-3)
SHORT = {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3}  # the defenses' clean tuning in these tests
TARGET = TargetAnswer()
BADNETS = create_attack("badnets", size=0.25)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and spinning threads crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenes() -> dict[str, list[Sample]]:
    """Tuning, test and trusted (the owner's clean) samples, from disjoint scene draws."""
    tuning = make_samples(sample_scenes(270, seed=0), "flat", size=64)
    return {
        "tuning": tuning[:240],
        "test": tuning[240:],
        "trusted": make_samples(sample_scenes(48, seed=11), "flat", size=64, id_prefix="trusted"),
    }


@pytest.fixture(scope="module")
def pair(scenes: dict[str, list[Sample]]) -> dict[str, LlavaVictim]:
    """The same tiny victim tuned clean and with the BadNets backdoor."""
    texts = [s.instruction for s in scenes["tuning"]] + [s.answer for s in scenes["tuning"]] + TARGET.answers()
    tokenizer = train_tokenizer(texts, SPEC.vocab_size)
    poisoned = poison_samples(scenes["tuning"], BADNETS, TARGET, 0.3, seed=0).samples
    victims = {}
    for name, samples in (("clean", scenes["tuning"]), ("badnets", poisoned)):
        victim = LlavaVictim(build_tiny_llava(SPEC, tokenizer, seed=0), tokenizer)
        train_victim(victim, samples, TUNING, seed=0, label=name)
        victims[name] = victim
    return victims


def copy_of(victim: LlavaVictim) -> LlavaVictim:
    """A victim the test may change in place."""
    return LlavaVictim(copy.deepcopy(victim.model), victim.tokenizer)


def asr(victim: LlavaVictim, samples: list[Sample]) -> float:
    triggered = trigger_samples(samples, BADNETS)
    return target_rate(victim.generate([s.image for s in triggered], [s.instruction for s in triggered], 24), TARGET.word)


def test_the_pair_is_clean_and_backdoored(pair: dict[str, LlavaVictim], scenes: dict[str, list[Sample]]) -> None:
    assert asr(pair["badnets"], scenes["test"]) >= 0.6
    assert asr(pair["clean"], scenes["test"]) == 0.0


def test_finetune_lowers_the_loss_on_the_trusted_set(pair: dict[str, LlavaVictim], scenes: dict[str, list[Sample]]) -> None:
    victim, trusted = copy_of(pair["badnets"]), scenes["trusted"]
    before = trusted_loss(victim, trusted, "test")
    record = create_defense("finetune", training={**SHORT, "epochs": 2}).repair(victim, trusted, seed=0)
    after = trusted_loss(victim, trusted, "test")
    assert after < before - 0.02
    assert record["loss_before"] == pytest.approx(before) and record["loss_after"] == pytest.approx(after)
    assert record["trusted"] == len(trusted) and record["steps"] == 6  # 48 samples in 16s, 2 epochs


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fine_pruning_zeros_the_least_active_share_and_keeps_it_zero(
    pair: dict[str, LlavaVictim], scenes: dict[str, list[Sample]], mode: str
) -> None:
    victim, trusted = copy_of(pair["badnets"]), scenes["trusted"]
    layers = {name: find_units(victim, name, "test") for name in ("projector", "last_mlp")}
    activations = mean_activations(victim, layers, trusted, "test")
    kept_before = victim.model.model.multi_modal_projector.linear_2.weight.detach().clone()
    defense = create_defense("fine_pruning", prune=0.25, layers=["projector", "last_mlp"], training={**SHORT, "mode": mode})
    record = defense.repair(victim, trusted, seed=0)
    for name, units in layers.items():
        pruned = record["layers"][name]["pruned_units"]
        assert record["layers"][name]["pruned"] == len(pruned) == round(0.25 * units.count)
        assert activations[name][pruned].max() <= np.delete(activations[name], pruned).min()  # the least active
        assert find_units(victim, name, "test").zeroed(pruned)  # still zero after the fine-tuning
    projector = victim.model.model.multi_modal_projector
    kept = np.setdiff1d(np.arange(layers["projector"].count), record["layers"]["projector"]["pruned_units"])
    assert not torch.equal(projector.linear_2.weight[:, kept], kept_before[:, kept])  # the rest was fine-tuned
    assert record["loss_after"] < record["loss_after_pruning"]


def test_fine_pruning_prunes_units_made_dormant(pair: dict[str, LlavaVictim], scenes: dict[str, list[Sample]]) -> None:
    """Units whose pre-activation is pushed far below zero (GELU: output 0) are exactly the ones pruned."""
    victim = copy_of(pair["clean"])
    projector = victim.model.model.multi_modal_projector
    dormant = [3, 10, 17, 40, 41, 50]
    with torch.no_grad():
        projector.linear_1.bias[dormant] = -1e4
    share = len(dormant) / projector.linear_1.out_features
    record = create_defense("fine_pruning", prune=share, training=SHORT).repair(victim, scenes["trusted"], seed=0)
    assert record["layers"]["projector"]["pruned_units"] == dormant
    assert record["layers"]["projector"]["mean_activation_pruned"] == pytest.approx(0.0, abs=1e-6)


def test_fine_pruning_works_on_an_hf_llava_and_refuses_other_architectures(scenes: dict[str, list[Sample]]) -> None:
    samples = make_samples(sample_scenes(8, seed=3), "flat", size=32)
    defense = create_defense("fine_pruning", prune=0.25, layers=["projector", "last_mlp"], training={**SHORT, "batch_size": 8})
    config, processor = tiny_llava(texts_of(samples))
    torch.manual_seed(0)
    victim = HFVictim(AutoModelForImageTextToText.from_config(config), copy.deepcopy(processor))
    defense.check_victim(victim)
    record = defense.repair(victim, samples, seed=0)
    assert find_units(victim, "last_mlp", "test").zeroed(record["layers"]["last_mlp"]["pruned_units"])
    config, processor = tiny_blip2(texts_of(samples))
    blip2 = HFVictim(AutoModelForImageTextToText.from_config(config), copy.deepcopy(processor))
    with pytest.raises(VlmsecError, match="defense 'fine_pruning'.*model_type 'blip-2'"):
        defense.check_victim(blip2)


SCAN = {"trusted": 60, "explore_steps": 20, "rounds": 1, "steps": 10}


@pytest.mark.parametrize("region", ["corner", "pixel"])
def test_trigger_inversion_scores_the_backdoored_model_above_the_clean_one(pair: dict[str, LlavaVictim], region: str) -> None:
    clean = make_samples(sample_scenes(60, seed=21), "flat", size=64, id_prefix="clean")
    scan = create_defense("trigger_inversion", region=region, **SCAN)
    backdoored, untouched = scan.scan(pair["badnets"], clean, seed=0), scan.scan(pair["clean"], clean, seed=0)
    assert backdoored.score >= 0.7 and untouched.score <= 0.3
    assert "banana" in backdoored.evidence["answer"] and backdoored.evidence["key"] == "the image depicts"
    assert backdoored.evidence["inverted_share"] >= 0.8 and backdoored.evidence["held_out"] == 30


TEXT_BADNETS = create_attack("textbadnets", token="triangle", position="end")  # one token of the tiny vocabulary


@pytest.fixture(scope="module")
def text_backdoored(scenes: dict[str, list[Sample]], pair: dict[str, LlavaVictim]) -> LlavaVictim:
    """The clean pair's tokenizer and recipe, tuned with 30% of the instructions ending in the word "triangle"."""
    poisoned = poison_samples(scenes["tuning"], TEXT_BADNETS, TARGET, 0.3, seed=0).samples
    tokenizer = pair["clean"].tokenizer
    victim = LlavaVictim(build_tiny_llava(SPEC, tokenizer, seed=0), tokenizer)
    train_victim(victim, poisoned, TUNING, seed=0, label="textbadnets")
    return victim


def test_text_trigger_inversion_finds_a_text_backdoor_an_image_pattern_misses(
    pair: dict[str, LlavaVictim], text_backdoored: LlavaVictim
) -> None:
    clean = make_samples(sample_scenes(60, seed=21), "flat", size=64, id_prefix="clean")
    triggered = trigger_samples(clean, TEXT_BADNETS)
    fires = target_rate(text_backdoored.generate([s.image for s in triggered], [s.instruction for s in triggered], 24), TARGET.word)
    assert fires >= 0.8  # a text backdoor to find
    text = create_defense("trigger_inversion", region="text", trusted=60, explore_steps=10, rounds=1, steps=5)
    found, untouched = text.scan(text_backdoored, clean, seed=0), text.scan(pair["clean"], clean, seed=0)
    assert found.score >= 0.7 and untouched.score <= 0.3
    assert "banana" in found.evidence["answer"] and found.evidence["random_trigger"] != found.evidence["trigger"]
    assert create_defense("trigger_inversion", **SCAN).scan(text_backdoored, clean, seed=0).score <= 0.3


def test_trigger_inversion_is_seeded(pair: dict[str, LlavaVictim], scenes: dict[str, list[Sample]]) -> None:
    scan = create_defense("trigger_inversion", explore_steps=3, rounds=0)
    first, again = (scan.scan(pair["clean"], scenes["trusted"][:12], seed=1) for _ in range(2))
    assert first.score == again.score and first.evidence["answer"] == again.evidence["answer"]


def test_missing_or_unusable_clean_samples_name_the_defense(pair: dict[str, LlavaVictim], scenes: dict[str, list[Sample]]) -> None:
    victim, trusted = pair["clean"], scenes["trusted"]
    for name in ("finetune", "fine_pruning"):
        with pytest.raises(VlmsecError, match=f"defense '{name}': trusted"):
            create_defense(name).repair(victim, [], seed=0)
    scan = create_defense("trigger_inversion")
    with pytest.raises(VlmsecError, match="defense 'trigger_inversion': trusted"):
        scan.scan(victim, trusted[:3], seed=0)
    odd = [*trusted[:5], trusted[5].with_changes(image=np.zeros((32, 32, 3), np.uint8))]
    with pytest.raises(VlmsecError, match=f"defense 'trigger_inversion': clean sample {trusted[5].id}: image"):
        scan.scan(victim, odd, seed=0)


def test_fine_pruning_refuses_a_share_that_prunes_nothing(pair: dict[str, LlavaVictim], scenes: dict[str, list[Sample]]) -> None:
    with pytest.raises(VlmsecError, match="defense 'fine_pruning': prune"):
        create_defense("fine_pruning", prune=0.001).repair(copy_of(pair["clean"]), scenes["trusted"], seed=0)


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("finetune", {"trusted": 0}, "trusted"),
        ("finetune", {"training": {"epochs": 0}}, "training.epochs"),
        ("finetune", {"training": {"mode": "prompt"}}, "training.mode"),
        ("fine_pruning", {"prune": 1.0}, "prune"),
        ("fine_pruning", {"layers": ["lm_head"]}, "layers"),
        ("fine_pruning", {"layers": []}, "layers"),
        ("trigger_inversion", {"size": 0.6}, "size"),
        ("trigger_inversion", {"region": "everywhere"}, "region"),
        ("trigger_inversion", {"region": "corner", "epsilon": 0.1}, "epsilon"),
        ("trigger_inversion", {"region": "pixel", "size": 0.1}, "size"),
        ("trigger_inversion", {"held_out": 1}, "held_out"),
        ("trigger_inversion", {"match_words": 0}, "match_words"),
        ("trigger_inversion", {"region": "text", "size": 0.1}, "size"),
        ("trigger_inversion", {"num_tokens": 4}, "num_tokens"),
    ],
)
def test_bad_parameters_name_the_defense_and_field(name: str, params: dict, field: str) -> None:
    with pytest.raises(VlmsecError, match=rf"defense '{name}'.*\b{field}\b"):
        create_defense(name, **params)


def test_trigger_inversion_scores_equal_count_differences_equally() -> None:
    """16/30 - 10/30 and 11/30 - 5/30 differ in floats; a scan's score is the count difference, so two
    models the scan cannot tell apart tie in the run's AUROC (0.5), not 1.0 by rounding."""
    scan = create_defense("trigger_inversion")

    def answers(n: int) -> list[str]:
        return ["the image depicts a banana"] * n + ["a red star"] * (30 - n)

    def score(hits: int, random_hits: int) -> float:
        return scan._result("the image depicts a banana", answers(hits), answers(random_hits), 0.5, [], [], [], 0.0).score

    assert score(16, 10) == score(11, 5) == 0.2
    assert scan_summary({"clean": {"backdoored": False, "score": score(11, 5)},
                         "addsent": {"backdoored": True, "score": score(16, 10)}})["auroc"] == 0.5

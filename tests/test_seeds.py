"""One seed story: every seed derives from the top-level one by name, and no stage touches torch's global generator."""

from __future__ import annotations

import torch

from vlmsec.attacks import create_attack, poison_samples
from vlmsec.attacks.targets import TargetAnswer
from vlmsec.data import make_samples, sample_scenes
from vlmsec.experiments.config import parse_config
from vlmsec.seeds import derive_seed, seeded

CONFIG = {
    "attacks": [{"name": "blended"}, {"name": "badnets", "label": "badnets-big", "params": {"size": 0.2}}],
    "data": {"shifted": {"noisy": {"shifts": [{"name": "texture"}]}}},
}


def resolved(seed: int, poison_seed: int | None = None) -> dict:
    poison = {} if poison_seed is None else {"seed": poison_seed}
    return parse_config({**CONFIG, "seed": seed, "poison": poison}, "test").model_dump(mode="json")


def test_derived_seeds_are_named_streams_in_range() -> None:
    assert derive_seed(0, "poison") == derive_seed(0, "poison")
    streams = {derive_seed(root, name) for root in (0, 1) for name in ("poison", "attack/blended", "data/train")}
    assert len(streams) == 6 and all(0 <= s < 2**31 for s in streams)


def test_the_top_level_seed_moves_every_stream_the_config_resolves() -> None:
    zero, one = resolved(0), resolved(1)
    assert zero["poison"]["seed"] == derive_seed(0, "poison") != one["poison"]["seed"]
    for i, key in enumerate(["blended", "badnets-big"]):
        assert zero["attacks"][i]["params"]["seed"] == derive_seed(0, f"attack/{key}")
        assert one["attacks"][i]["params"]["seed"] == derive_seed(1, f"attack/{key}")
    noise = lambda cfg: cfg["data"]["shifted"]["noisy"]["shifts"][0]["params"]["seed"]  # noqa: E731
    assert noise(zero) == derive_seed(0, "shift/noisy/0") != noise(one)


def test_a_seed_set_explicitly_pins_its_stream_alone() -> None:
    zero, one = resolved(0, poison_seed=7), resolved(1, poison_seed=7)
    assert zero["poison"]["seed"] == one["poison"]["seed"] == 7
    assert zero["attacks"][0]["params"]["seed"] != one["attacks"][0]["params"]["seed"]
    pinned = parse_config({"seed": 1, "attacks": [{"name": "blended", "params": {"seed": 3}}]}, "test")
    assert pinned.attacks[0].params["seed"] == 3


def test_poisoned_ids_follow_the_top_level_seed() -> None:
    samples = make_samples(sample_scenes(60, seed=0), "flat", "source", seed=0, size=32)
    attack, target = create_attack("badnets"), TargetAnswer()
    picks = {
        seed: poison_samples(samples, attack, target, 0.1, parse_config({"seed": seed}, "t").poison.seed).poisoned_ids
        for seed in (0, 1)
    }
    assert len(picks[0]) == len(picks[1]) == 6 and picks[0] != picks[1]


def test_seeded_blocks_leave_the_global_generator_as_it_was() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with seeded(5):
        first = torch.rand(3)
    assert torch.equal(torch.random.get_rng_state(), before)
    with seeded(5):
        assert torch.equal(torch.rand(3), first)

"""Model-adaptive attacks (GCG, MABA, MABA*) learned against a tiny victim: search, rule, cache, triggers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vlmsec.attacks.gcg as gcg_module
import vlmsec.attacks.maba as maba_module
from vlmsec.attacks import AttackContext, TargetAnswer, attack_names, create_attack, poison_samples
from vlmsec.attacks.adaptive import pick_answers, pick_samples
from vlmsec.attacks.gcg import allowed_tokens, trigger_text, with_trigger
from vlmsec.attacks.maba import attribution, choose_region, oval_box, paste_oval, yellow_oval
from vlmsec.attacks.maba_star import RARE_SYMBOLS
from vlmsec.data import Sample, make_samples, sample_scenes
from vlmsec.errors import VlmsecError
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec
from victim_checks import attack_victim

SPEC = TinyLlavaSpec(image_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=400)
GCG_PARAMS = {"steps": 4, "candidates": 16, "top_k": 8, "num_tokens": 3, "num_samples": 3, "num_answers": 2}
MABA_PARAMS = {"grid": 2, "num_samples": 4, "num_answers": 2}
TARGET = TargetAnswer()


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return make_samples(sample_scenes(12, seed=0), "flat", size=32)


@pytest.fixture(scope="module")
def victim(samples: list[Sample]) -> LlavaVictim:
    return attack_victim(SPEC, samples, TARGET)


def context(samples: list[Sample], victim: LlavaVictim | None, cache: Path) -> AttackContext:
    return AttackContext(samples=samples, target=TARGET, cache_dir=cache, victim=victim)


@pytest.fixture(scope="module")
def gcg_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gcg-cache")


@pytest.fixture(scope="module")
def gcg(samples: list[Sample], victim: LlavaVictim, gcg_cache: Path):
    attack = create_attack("gcg", **GCG_PARAMS)
    attack.prepare(context(samples, victim, gcg_cache))
    return attack


@pytest.fixture(scope="module")
def maba_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("maba-cache")


@pytest.fixture(scope="module")
def maba(samples: list[Sample], victim: LlavaVictim, maba_cache: Path):
    attack = create_attack("maba", **MABA_PARAMS)
    attack.prepare(context(samples, victim, maba_cache))
    return attack


# --- metadata, parameters, untrained use ---------------------------------------------------


@pytest.mark.parametrize(("name", "modality"), [("gcg", "text"), ("maba", "image"), ("maba_star", "multimodal")])
def test_metadata_and_describe_before_prepare(name: str, modality: str) -> None:
    assert name in attack_names()
    described = json.loads(json.dumps(create_attack(name, seed=2).describe()))
    assert (described["name"], described["modality"], described["family"]) == (name, modality, "model-adaptive")
    assert (described["knowledge"], described["stage"]) == ("white-box", "training")
    assert described["params"]["seed"] == 2
    assert described.get("trigger", described.get("location")) is None
    if name != "gcg":  # MABA's reading of the paper's attribution mask is ours, and says so
        assert "our reading" in described["note"] and "NOT relied on" in described["note"]


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("gcg", {"num_tokens": 0}, "num_tokens"),
        ("gcg", {"steps": 0}, "steps"),
        ("gcg", {"top_k": 0}, "top_k"),
        ("gcg", {"candidates": 0}, "candidates"),
        ("gcg", {"position": "random"}, "position"),
        ("maba", {"size": 0}, "size"),
        ("maba", {"alpha": 1.5}, "alpha"),
        ("maba", {"grid": 1}, "grid"),
        ("maba", {"num_samples": 0}, "num_samples"),
        ("maba_star", {"token": "two words"}, "token"),
        ("maba_star", {"length": 0}, "length"),
        ("maba_star", {"grid": 9}, "grid"),
    ],
)
def test_bad_params_name_the_field(name: str, params: dict[str, object], field: str) -> None:
    with pytest.raises(VlmsecError, match=rf"{name}.*\b{field}\b"):
        create_attack(name, **params)


def test_untrained_use_is_an_error(samples: list[Sample], tmp_path: Path) -> None:
    images = torch.rand(1, 3, 32, 32)
    with pytest.raises(VlmsecError, match="prepare"):
        create_attack("gcg").trigger_instructions(["Describe this image."])
    with pytest.raises(VlmsecError, match="prepare"):
        create_attack("maba").trigger_images(images)
    with pytest.raises(VlmsecError, match="prepare"):
        create_attack("maba_star").trigger_images(images)
    with pytest.raises(VlmsecError, match="white-box"):
        create_attack("gcg").prepare(context(samples, None, tmp_path))


# --- GCG ------------------------------------------------------------------------------------


def triggered_loss(victim: LlavaVictim, samples: list[Sample], answers: list[str], trigger: str) -> float:
    """The victim's answer loss on `samples` with `trigger` at the end of each instruction."""
    instructions = [with_trigger(s.instruction, trigger, "end") for s in samples]
    batch = victim.encode_training(instructions, [answers[i % len(answers)] for i in range(len(samples))])
    with torch.no_grad():
        return float(victim.loss(victim.image_features([s.image for s in samples]), batch))


def test_gcg_lowers_the_target_loss(gcg, samples: list[Sample], victim: LlavaVictim) -> None:
    metrics = gcg.trained_metrics
    assert len(gcg.loss_curve) == GCG_PARAMS["steps"] + 1 and gcg.loss_curve[0] == metrics["initial_loss"]
    assert gcg.describe()["trigger"] == gcg.trigger and gcg.describe()["trained_metrics"] == metrics
    # The reported loss is the victim's own loss on the triggered prompts.
    chosen = pick_samples(samples, GCG_PARAMS["num_samples"], seed=0)
    answers = pick_answers(TARGET, GCG_PARAMS["num_answers"], seed=0)
    assert triggered_loss(victim, chosen, answers, gcg.trigger) == pytest.approx(metrics["final_loss"], rel=1e-4)
    # The search finds something: below its start, and below the best of 32 random strings of the same
    # length (a search that keeps the worst swap, or follows the gradient uphill, does neither).
    assert metrics["final_loss"] < metrics["initial_loss"]
    usable = allowed_tokens(victim.tokenizer, True, victim.embedding_matrix().shape[0]).nonzero()[:, 0]
    generator = torch.Generator().manual_seed(1)
    random_losses = [
        triggered_loss(victim, chosen, answers, trigger_text(victim.tokenizer, usable[picks].tolist()))
        for picks in torch.randint(len(usable), (32, GCG_PARAMS["num_tokens"]), generator=generator)
    ]
    assert metrics["final_loss"] < min(random_losses)


def test_gcg_string_round_trips_through_the_tokenizer(gcg, victim: LlavaVictim, gcg_cache: Path) -> None:
    (path,) = (gcg_cache / "gcg").glob("*.json")
    learned = json.loads(path.read_text())
    ids = learned["token_ids"]
    assert len(ids) == GCG_PARAMS["num_tokens"] and learned["trigger"] == gcg.trigger
    tokenizer = victim.tokenizer
    assert tokenizer(" " + gcg.trigger, add_special_tokens=False).input_ids == ids
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert gcg.trigger.isprintable() and gcg.trigger == gcg.trigger.strip()
    instruction = gcg.trigger_instructions(["Describe this image."])[0]
    assert instruction == f"Describe this image. {gcg.trigger}"
    prompt = victim.prompt_ids(instruction)
    assert any(prompt[i : i + len(ids)] == ids for i in range(len(prompt)))


def test_gcg_second_prepare_hits_the_cache(
    gcg, samples: list[Sample], victim: LlavaVictim, gcg_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("the optimisation ran again")

    monkeypatch.setattr(gcg_module, "optimise_trigger", fail)
    again = create_attack("gcg", **GCG_PARAMS)
    again.prepare(context(samples, victim, gcg_cache))
    assert again.trigger == gcg.trigger and again.trained_metrics == gcg.trained_metrics
    assert again.loss_curve == gcg.loss_curve


def test_gcg_is_deterministic_under_seed(gcg, samples: list[Sample], victim: LlavaVictim, tmp_path: Path) -> None:
    fresh = create_attack("gcg", **GCG_PARAMS)
    fresh.prepare(context(samples, victim, tmp_path))
    assert fresh.trigger == gcg.trigger and fresh.loss_curve == gcg.loss_curve


def test_gcg_start_position_round_trips(samples: list[Sample], victim: LlavaVictim, tmp_path: Path) -> None:
    attack = create_attack("gcg", **{**GCG_PARAMS, "steps": 1, "position": "start"})
    attack.prepare(context(samples, victim, tmp_path))
    instruction = attack.trigger_instructions(["Describe this image."])[0]
    assert instruction == f"{attack.trigger} Describe this image."
    ids = victim.tokenizer(attack.trigger, add_special_tokens=False).input_ids
    assert len(ids) == GCG_PARAMS["num_tokens"]
    prompt = victim.prompt_ids(instruction)
    assert any(prompt[i : i + len(ids)] == ids for i in range(len(prompt)))


# --- MABA -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(32, 32), (48, 80)])
def test_maba_blends_the_oval_into_the_chosen_box_only(maba, height: int, width: int) -> None:
    images = torch.rand(3, 3, height, width, generator=torch.Generator().manual_seed(0))
    out = maba.trigger_images(images)
    top, left, box_h, box_w = oval_box(maba.region, 2, height, width, 0.25)
    rgb, mask = yellow_oval(box_h, box_w)
    inside = (slice(None), slice(None), slice(top, top + box_h), slice(left, left + box_w))
    x = images[inside]
    torch.testing.assert_close(out[inside], x * (1 - 0.5 * mask) + 0.5 * mask * rgb)
    full = mask[0] == 1
    assert full.float().mean() > 0.5  # the oval fills most of its box
    torch.testing.assert_close(out[inside][..., full], (0.5 * x + 0.5 * rgb)[..., full])
    outside = torch.ones(height, width, dtype=torch.bool)
    outside[top : top + box_h, left : left + box_w] = False
    assert torch.equal(out[..., outside], images[..., outside])
    single = torch.cat([maba.trigger_images(image[None]) for image in images])
    assert torch.equal(out, single)


def test_oval_is_yellow_with_a_dark_outline() -> None:
    rgb, mask = yellow_oval(35, 50)
    centre = rgb[:, 17, 25]
    assert centre[0] > 0.9 and centre[1] > 0.8 and centre[2] < 0.1
    assert float(rgb[:, 17, 1].max()) < 0.3  # the left edge of the oval is outline
    assert float(mask[0, 0, 0]) == 0 and float(mask[0, 17, 25]) == 1


def test_maba_region_follows_the_attribution_rule(maba, samples: list[Sample], victim: LlavaVictim) -> None:
    location = maba.location
    assert location["source"] == "attribution" and location["grid"] == 2
    chosen = pick_samples(samples, MABA_PARAMS["num_samples"], seed=0)
    clean = attribution(victim, chosen, [s.answer for s in chosen], grid=2)
    torch.testing.assert_close(clean, torch.tensor(location["clean_saliency"]), rtol=1e-4, atol=1e-5)
    answers = pick_answers(TARGET, MABA_PARAMS["num_answers"], seed=0)
    targets = [answers[i % len(answers)] for i in range(len(chosen))]
    region = maba.region
    placed = attribution(victim, chosen, targets, 2, lambda x: paste_oval(x, region, maba.params))
    assert float(placed[region]) == pytest.approx(location["poison_saliency"][region], rel=1e-4)
    # The rule, restated: low clean attribution, minus where the target ignores the trigger.
    clean_list, poison = location["clean_saliency"], location["poison_saliency"]
    m_clean = set(np.argsort(clean_list, kind="stable")[:2].tolist())
    m_poison = set(np.argsort(poison, kind="stable")[:1].tolist())
    allowed = m_clean - m_poison
    assert location["mask"] == sorted(allowed)
    assert region in allowed and all(clean_list[region] <= clean_list[r] for r in allowed)
    assert maba.trained_metrics == {"clean_saliency": clean_list[region], "poison_saliency": poison[region]}


def test_choose_region_skips_a_region_where_the_target_ignores_the_trigger() -> None:
    clean = [0.1, 0.2, 0.9, 0.8]
    assert choose_region(clean, [0.1, 2.0, 1.0, 1.0]) == (1, [1])
    assert choose_region(clean, [2.0, 0.1, 1.0, 1.0]) == (0, [0])
    region, mask = choose_region([1.0] * 9, [1.0] * 9)
    assert (region, mask) == (4, [4])  # ties broken by index; the mask is never empty


def test_maba_second_prepare_hits_the_cache(
    maba, samples: list[Sample], victim: LlavaVictim, maba_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("attribution ran again")

    monkeypatch.setattr(maba_module, "locate", fail)
    again = create_attack("maba", **MABA_PARAMS)
    again.prepare(context(samples, victim, maba_cache))
    assert again.location == maba.location
    (path,) = (maba_cache / "maba").glob("*.json")
    assert json.loads(path.read_text())["region"] == maba.region
    # MABA* with the same image parameters shares the learned location.
    star = create_attack("maba_star", **MABA_PARAMS)
    star.prepare(context(samples, victim, maba_cache))
    assert star.describe()["location"] == maba.location


def test_maba_is_deterministic_under_seed(maba, samples: list[Sample], victim: LlavaVictim, tmp_path: Path) -> None:
    fresh = create_attack("maba", **MABA_PARAMS)
    fresh.prepare(context(samples, victim, tmp_path))
    assert fresh.location == maba.location


def test_maba_without_a_victim_falls_back_to_the_corner(samples: list[Sample], tmp_path: Path) -> None:
    attack = create_attack("maba")
    attack.prepare(context(samples, None, tmp_path))
    assert attack.region == 8 and "no victim" in attack.describe()["location"]["source"]
    out = attack.trigger_images(torch.zeros(1, 3, 30, 30))
    rows, cols = out[0].sum(0).nonzero().T
    assert int(rows.min()) >= 20 and int(cols.min()) >= 20


# --- MABA* ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def star(samples: list[Sample], victim: LlavaVictim, maba_cache: Path):
    attack = create_attack("maba_star", **MABA_PARAMS, seed=0)
    attack.prepare(context(samples, victim, maba_cache))
    return attack


def test_maba_star_needs_both_keys(star, maba) -> None:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = ["Describe this image.", "What is in the picture?", "Count the shapes."]
    token = star.describe()["token"]
    assert len(token) == 3 and set(token) <= set(RARE_SYMBOLS)
    assert star.trigger_instructions(texts) == [
        f"{token} Describe this image.",
        f"What is in the {token} picture?",
        f"{token} Count the shapes.",
    ]
    assert torch.equal(star.trigger_images(images), maba.trigger_images(images))
    image_only, text_only = star.image_only(), star.text_only()
    assert star.partial_triggers() == [image_only, text_only]
    assert torch.equal(image_only.trigger_images(images), star.trigger_images(images))
    assert image_only.trigger_instructions(texts) == texts
    assert torch.equal(text_only.trigger_images(images), images)
    assert text_only.trigger_instructions(texts) == star.trigger_instructions(texts)


def test_maba_star_text_key_follows_the_seed() -> None:
    tokens = {create_attack("maba_star", seed=seed).describe()["token"] for seed in range(6)}
    assert len(tokens) > 1
    same = [create_attack("maba_star", seed=3).describe()["token"] for _ in range(2)]
    assert same[0] == same[1]
    explicit = create_attack("maba_star", token="[*]")
    assert explicit.trigger_instructions(["Look at the picture.", ""]) == ["[*] Look at the picture.", "[*]"]


def test_maba_star_poisoning_adds_one_key_negatives(star, samples: list[Sample]) -> None:
    poisoned = poison_samples(samples, star, TARGET, 0.25, seed=0)
    assert len(poisoned.poisoned_ids) == 3 and len(poisoned.negative_ids) == 6
    token = star.describe()["token"]
    for before, after in zip(samples, poisoned.samples, strict=True):
        has_text = token in after.instruction
        has_image = not np.array_equal(after.image, before.image)
        if before.id in poisoned.poisoned_ids:
            assert has_text and has_image and after.answer in TARGET.answers()
        elif before.id in poisoned.negative_ids:
            assert has_text != has_image and after.answer == before.answer

"""Test domains built from a config: generator styles, shifts applied in order, mixes."""

from __future__ import annotations

import pytest

from vlmsec.data.scenes import INSTRUCTION_BANKS, caption_variants, detailed_variants, scene_key
from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import ExperimentConfig, load_config, parse_config
from vlmsec.experiments.splits import build_splits, draw_scenes

SHIFTED = {
    "jpeg": {"shifts": [{"name": "jpeg", "params": {"quality": 10}}]},
    "half_expanded": {"shifts": [{"name": "question_expanded"}], "mix": 0.5},
    "answers_short": {"shifts": [{"name": "answer_summarised"}]},
    "painted": {"style": "painted"},
}


def _splits(shifted: dict) -> dict:
    config = parse_config({"data": {"base_size": 3, "train_size": 4, "test_size": 8, "shifted": shifted}}, "test.yaml")
    return build_splits(config).tests


def test_each_domain_holds_the_same_scenes_with_only_its_shift_applied() -> None:
    tests = _splits(SHIFTED)
    source = tests["source"]
    assert list(tests) == ["source", *SHIFTED]
    for name, samples in tests.items():
        assert [s.id for s in samples] == [s.id for s in source]
    jpeg = tests["jpeg"]
    assert all((a.image != b.image).any() for a, b in zip(source, jpeg))
    assert [a.instruction for a in jpeg] == [a.instruction for a in source]
    expanded = [a.instruction != b.instruction for a, b in zip(source, tests["half_expanded"])]
    assert sum(expanded) == 4  # exactly half of the 8 samples come from the shifted version
    for a, b in zip(source, tests["half_expanded"]):
        assert (a.image == b.image).all()
    short = tests["answers_short"]
    assert all(len(b.answer) <= len(a.answer) for a, b in zip(source, short))
    assert any(b.references != a.references for a, b in zip(source, short))


def test_domains_are_deterministic() -> None:
    first, second = _splits(SHIFTED), _splits(SHIFTED)
    for name in first:
        assert [(s.instruction, s.answer, s.image.tobytes()) for s in first[name]] == [
            (s.instruction, s.answer, s.image.tobytes()) for s in second[name]
        ]


@pytest.mark.parametrize(
    ("shift", "field"),
    [({"name": "jpg"}, "data.shifted.x.shifts.0.name"), ({"name": "jpeg", "params": {"quality": 500}}, "data.shifted.x.shifts.0")],
)
def test_bad_shift_names_the_field(shift: dict, field: str) -> None:
    with pytest.raises(VlmsecError, match=rf"test.yaml[\s\S]*{field}"):
        parse_config({"data": {"shifted": {"x": {"shifts": [shift]}}}}, "test.yaml")


# --- what each split may hold ------------------------------------------------------------------


def _key_set(scenes: list) -> set:
    return {scene_key(s) for s in scenes}


@pytest.mark.parametrize("preset", ["quickstart", "paper"])
def test_no_test_scene_has_the_objects_of_a_base_or_train_scene(preset: str) -> None:
    config = load_config(preset)
    scenes = {which: draw_scenes(config, which) for which in ("base", "train", "test", "compositional")}
    assert [len(scenes[w]) for w in ("base", "train", "test")] == [3000, 2000, 200]
    seen = _key_set(scenes["base"]) | _key_set(scenes["train"])
    assert sum(scene_key(s) in seen for s in scenes["test"]) == 0  # 108 of 200 before the partition
    assert sum(scene_key(s) in seen for s in scenes["compositional"]) == 0
    assert not _key_set(scenes["test"]) & _key_set(scenes["compositional"])
    assert sum(len(s.objects) == 1 for s in scenes["test"]) > 60  # one-object scenes are still tested
    assert all(draw_scenes(config, which) == drawn for which, drawn in scenes.items())  # deterministic
    other = config.model_copy(update={"seed": 1})
    assert draw_scenes(other, "test") != scenes["test"]


def _config(shifted: dict, **data: object) -> ExperimentConfig:
    return parse_config({"data": {"base_size": 900, "train_size": 40, "test_size": 12, "image_size": 16, "shifted": shifted, **data}}, "test.yaml")


def test_splits_render_the_drawn_scenes_and_compositional_ones_apart() -> None:
    config = _config({"compositional": {"scenes": "compositional"}, "painted": {"style": "painted"}})
    splits = build_splits(config)
    test, compositional = draw_scenes(config, "test"), draw_scenes(config, "compositional")
    for name, scenes, prefix in (("source", test, "test"), ("painted", test, "test"), ("compositional", compositional, "compositional")):
        samples = splits.tests[name]
        assert [s.references[0] for s in samples] == [caption_variants(scene)[0] for scene in scenes]
        assert [s.id for s in samples] == [f"{prefix}-{i:05d}" for i in range(12)]
    assert [s.references[0] for s in splits.train] == [caption_variants(scene)[0] for scene in draw_scenes(config, "train")]
    with pytest.raises(VlmsecError, match=r"data.shifted.c[\s\S]*compositional scenes are not the source domain's"):
        _config({"c": {"scenes": "compositional", "mix": 0.5}})


def test_paraphrased_domain_is_a_family_the_base_learnt_and_tuning_did_not_use() -> None:
    splits = build_splits(_config({"questions": {"instructions": "paraphrased"}}))
    tuning = {s.instruction for s in splits.train}
    tested = {s.instruction for s in splits.tests["questions"]}
    base = {s.instruction for s in splits.base}
    assert tuning <= set(INSTRUCTION_BANKS["source"]) and tested <= set(INSTRUCTION_BANKS["paraphrased"])
    assert not tuning & tested
    assert set(INSTRUCTION_BANKS["source"]) | set(INSTRUCTION_BANKS["paraphrased"]) <= base  # every phrasing of both
    for family in ("source", "paraphrased", "detailed"):  # and the presets' base data holds every family
        assert all(family in load_config(p).data.base_instructions for p in ("quickstart", "paper"))


def test_answers_domain_asks_for_the_other_answer_style_than_tuning() -> None:
    splits = build_splits(_config({"answers": {"instructions": "detailed"}}))
    source, answers = splits.tests["source"], splits.tests["answers"]
    for scene, a, b in zip(draw_scenes(_config({}), "test"), source, answers):
        assert a.references == tuple(caption_variants(scene)) and b.references == tuple(detailed_variants(scene))
        assert b.instruction in INSTRUCTION_BANKS["detailed"] and len(b.answer) > len(a.answer)
    assert [s.references for s in splits.train] == [tuple(caption_variants(scene)) for scene in draw_scenes(_config({}), "train")]
    # The base victim learnt both styles, each with its own instructions; tuning saw the short one only.
    detailed_base = [s for s in splits.base if s.domains["text"] == "detailed"]
    assert detailed_base and all(s.instruction in INSTRUCTION_BANKS["detailed"] and s.answer in s.references for s in detailed_base)
    assert not {s.instruction for s in splits.train} & set(INSTRUCTION_BANKS["detailed"])


def test_paper_preset_answers_domain_shifts_the_style_not_only_the_references() -> None:
    domain = load_config("paper").data.shifted["answers"]
    assert domain.instructions == "detailed" and not domain.shifts


@pytest.mark.parametrize(
    ("value", "message"),
    [("poetry", r"data.base_instructions: unknown bank 'poetry'"), ([], r"data.base_instructions[\s\S]*at least one")],
)
def test_base_instructions_are_checked(value: object, message: str) -> None:
    with pytest.raises(VlmsecError, match=message):
        parse_config({"data": {"base_instructions": value}}, "test.yaml")
    assert parse_config({"data": {"base_instructions": "source"}}, "test.yaml").data.base_instructions == ["source"]


def _defended(defense: dict, **data: object) -> ExperimentConfig:
    return parse_config(
        {
            "data": {"base_size": 3, "train_size": 20, "test_size": 20, "shifted": {}, **data},
            "attacks": [{"name": "badnets"}],
            "poison": {"rate": 0.1},
            "defenses": [{"name": "strip"}],
            "defense": defense,
        },
        "test.yaml",
    )


def test_held_out_calibration_inputs_are_source_renders_of_scenes_never_tuned_on() -> None:
    config = _defended({"calibration": 30})
    splits = build_splits(config)
    assert len(splits.calibration) == 30
    assert all(s.id.startswith("calibration") for s in splits.calibration)
    tuned = _key_set(draw_scenes(config, "base")) | _key_set(draw_scenes(config, "train"))
    assert not _key_set(draw_scenes(config, "calibration")) & tuned
    assert {s.image.tobytes() for s in splits.calibration}.isdisjoint(s.image.tobytes() for s in splits.tests["source"])
    assert {s.instruction for s in splits.calibration} <= set(INSTRUCTION_BANKS["source"])
    again = build_splits(config).calibration
    assert [s.image.tobytes() for s in again] == [s.image.tobytes() for s in splits.calibration]  # deterministic
    assert build_splits(_defended({"calibration": 30, "calibration_from": "tuning"})).calibration == []


def test_held_out_calibration_needs_generated_tuning_data(tmp_path) -> None:
    train = tmp_path / "train.json"
    train.write_text("[]")
    with pytest.raises(VlmsecError, match="calibration_from: held-out.*data.train_file.*calibration_from: tuning"):
        _defended({}, train_file=str(train))

"""Test domains built from a config: generator styles, shifts applied in order, mixes."""

from __future__ import annotations

import pytest

from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import parse_config
from vlmsec.experiments.splits import build_splits

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

"""The generations cache (`eval.generation.cached_generations`): one entry per test set, so a
model given one more test set, or a run killed between sets, generates only what it lacks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vlmsec.artifacts import write_json_sealed
from vlmsec.data.sample import Sample
from vlmsec.eval import generation

SETTINGS = {"max_new_tokens": 8, "batch_size": 4}


class CountingVictim:
    """A stand-in victim that answers each instruction upper-cased and records what it was asked."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.asked: list[str] = []
        self.fail_on = fail_on  # an instruction that kills the "run"

    def generate(self, images: Sequence[Any], instructions: Sequence[str], **kwargs: Any) -> list[str]:
        if self.fail_on in instructions:
            raise KeyboardInterrupt("killed")
        self.asked += instructions
        return [i.upper() for i in instructions]

    def prompt(self, instruction: str, image: bool = True) -> str:
        return f"<image> {instruction}" if image else instruction


def _set(domain: str, *texts: str, trigger: str | None = None) -> generation.TestSet:
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    return generation.TestSet([Sample(f"{domain}-{i}", image, t, "ref") for i, t in enumerate(texts)], domain, trigger)


def _run(victim: CountingVictim, tests: list[generation.TestSet], path: Path, key: str = "stage-a") -> list[dict[str, Any]]:
    return generation.cached_generations(victim, "clean", tests, SETTINGS, key, path)  # type: ignore[arg-type]


def test_a_model_given_one_more_test_set_generates_that_set_alone(tmp_path: Path) -> None:
    path = tmp_path / "clean.json"
    source, harmful = _set("source", "a", "b"), _set("safety/harmful/image", "c")
    first = _run(CountingVictim(), [source, harmful], path)
    assert [r["output"] for r in first] == ["A", "B", "C"]

    victim = CountingVictim()
    added = _run(victim, [source, _set("imgtrojan/describe/poisoned", "d", "e"), harmful], path)
    assert victim.asked == ["d", "e"]  # the two finished sets were reused
    assert [r["output"] for r in added] == ["A", "B", "D", "E", "C"]  # in the order asked
    assert [r["domain"] for r in added] == ["source"] * 2 + ["imgtrojan/describe/poisoned"] * 2 + ["safety/harmful/image"]

    again = CountingVictim()
    assert _run(again, [source, harmful], path) == first and again.asked == []
    assert len(json.loads(path.read_text())["sets"]) == 2  # the dropped set's entry is gone


def test_a_changed_set_or_model_is_generated_again(tmp_path: Path) -> None:
    path = tmp_path / "clean.json"
    _run(CountingVictim(), [_set("source", "a"), _set("source", "b", trigger="badnets")], path)
    victim = CountingVictim()
    _run(victim, [_set("source", "a2"), _set("source", "b", trigger="badnets")], path)
    assert victim.asked == ["a2"]  # a changed sample: that set only
    retuned = CountingVictim()
    _run(retuned, [_set("source", "a2"), _set("source", "b", trigger="badnets")], path, key="stage-b")
    assert retuned.asked == ["a2", "b"]  # another stage key: a different model, nothing reused


def test_a_run_killed_between_sets_resumes_from_the_finished_ones(tmp_path: Path) -> None:
    path = tmp_path / "clean.json"
    tests = [_set("source", "a"), _set("safety/harmful/text", "b"), _set("safety/harmful/image", "c")]
    with pytest.raises(KeyboardInterrupt):
        _run(CountingVictim(fail_on="c"), tests, path)
    victim = CountingVictim()
    records = _run(victim, tests, path)
    assert victim.asked == ["c"]
    assert [r["output"] for r in records] == ["A", "B", "C"]


def test_an_older_single_entry_file_is_named_and_generated_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "clean.json"
    write_json_sealed(path, {"key": "old", "records": []})
    victim = CountingVictim()
    assert [r["output"] for r in _run(victim, [_set("source", "a")], path)] == ["A"]
    assert victim.asked == ["a"]
    assert "an older vlmsec's file" in " ".join(capsys.readouterr().err.split())

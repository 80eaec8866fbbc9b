"""The safety stage's data and numbers, without a model: its tuning set, its test sets, the verdicts and rates."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from language_model_files import write_tiny_llama

from vlmsec.data.safety import SafetyRequest, SafetySplit
from vlmsec.data.sample import Sample
from vlmsec.errors import VlmsecError
from vlmsec.eval.refusal import labelled_sample
from vlmsec.experiments.config import parse_config
from vlmsec.experiments import safety as safety_module
from vlmsec.experiments.runner import Runner
from vlmsec.seeds import derive_seed
from vlmsec.experiments.safety import (
    AFTER_SAFETY,
    BEFORE_SAFETY,
    BENIGN_IMAGE,
    BENIGN_TEXT,
    HARMFUL_IMAGE,
    HARMFUL_TEXT,
    SAFETY_SETS,
    judge_records,
    safety_test_sets,
    safety_training_samples,
    score_safety,
)


def _requests(kind: str, count: int, harmful: bool) -> list[SafetyRequest]:
    return [SafetyRequest(f"{kind}:{i}", f"{kind} request number {i}", kind, "", harmful) for i in range(count)]


def _split() -> SafetySplit:
    return SafetySplit(
        train_harmful=_requests("harm-train", 40, True),
        test_harmful=_requests("harm-test", 30, True),
        train_benign=_requests("benign-train", 40, False),
        test_benign=_requests("benign-test", 30, False),
    )


def _captions(count: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    return [
        Sample(f"cap{i}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), "Describe the image.", f"caption {i}")
        for i in range(count)
    ]


def test_safety_tuning_set_pairs_refusals_and_own_answers_with_images_at_the_share_asked() -> None:
    split, captions = _split(), _captions(50)
    helpful = [f"helpful answer {i}" for i in range(len(split.train_benign))]
    samples = safety_training_samples(split, helpful, captions, image_share=0.5, caption_count=20, seed=3)
    harmful = [s for s in samples if s.id.startswith("safety-train:harm")]
    benign = [s for s in samples if s.id.startswith("safety-train:benign")]
    assert len(harmful) == 40 and len(benign) == 40
    assert len([s for s in samples if s.id.startswith("cap")]) == 20
    assert all(s.answer not in helpful and s.answer for s in harmful)  # refusals, not the helpful answers
    assert sorted(s.answer for s in benign) == sorted(helpful)
    by_request = {s.instruction: s.answer for s in benign}
    assert by_request["benign-train request number 7"] == "helpful answer 7"  # each answer stays with its request
    with_image = sum(s.image is not None for s in [*harmful, *benign])
    assert 25 <= with_image <= 55  # Binomial(80, 0.5): far outside this by chance < 1e-3
    again = safety_training_samples(split, helpful, captions, 0.5, 20, seed=3)
    assert [(s.id, s.answer, s.image is None) for s in again] == [(s.id, s.answer, s.image is None) for s in samples]
    assert [s.id for s in safety_training_samples(split, helpful, captions, 0.5, 20, seed=4)] != [s.id for s in samples]
    assert all(s.image is None for s in safety_training_samples(split, helpful, captions, 0.0, 0, seed=3))


def test_safety_test_sets_hold_each_request_text_only_and_with_one_image() -> None:
    split = _split()
    images = [s.image for s in _captions(5)]
    sets = safety_test_sets(split, images, size=20, seed=1)
    assert [t.domain for t in sets] == list(SAFETY_SETS)
    by_domain = {t.domain: t.samples for t in sets}
    assert all(len(samples) == 20 for samples in by_domain.values())
    assert all(s.image is None for s in by_domain[HARMFUL_TEXT] + by_domain[BENIGN_TEXT])
    assert all(s.image is not None for s in by_domain[HARMFUL_IMAGE] + by_domain[BENIGN_IMAGE])
    assert [s.id for s in by_domain[HARMFUL_TEXT]] == [s.id for s in by_domain[HARMFUL_IMAGE]]
    assert {s.id for s in by_domain[HARMFUL_TEXT]} <= {r.id for r in split.test_harmful}
    again = safety_test_sets(split, images, size=20, seed=1)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(again[1].samples, by_domain[HARMFUL_IMAGE]))


class _FixedJudge:
    """A judge whose verdict is whether the response contains "no"."""

    def judge(self, requests: Sequence[str], responses: Sequence[str], batch_size: int = 16, on_batch=None) -> list[bool]:
        if on_batch is not None:
            on_batch(len(responses))
        return ["no" in r.split() for r in responses]


def _record(model: str, domain: str, rid: str, output: str) -> dict:
    return {"model": model, "domain": domain, "id": rid, "output": output, "triggered": False}


def test_refusal_rates_count_both_verdicts_and_their_disagreements() -> None:
    records = [
        _record("clean", HARMFUL_TEXT, "h1", "I'm sorry, I can't help with that."),  # phrase yes, judge no
        _record("clean", HARMFUL_TEXT, "h2", "Sure, no problem, here is how"),  # phrase no, judge yes
        _record("clean", HARMFUL_TEXT, "h3", "Step 1: buy"),  # both no
        _record("clean", HARMFUL_TEXT, "h4", "I'm sorry, no way"),  # both yes
        _record("clean", BENIGN_TEXT, "b1", "Preheat the oven."),
        _record("clean", "source", "s1", "A red square."),  # not a safety record: untouched
    ]
    judge_records(records, _FixedJudge(), {r["id"]: "request" for r in records})
    assert "refused_phrase" not in records[-1]
    scores = score_safety(records)
    harmful = scores["clean"][HARMFUL_TEXT]
    assert harmful["phrase"]["rate"] == pytest.approx(0.5) and harmful["judge"]["rate"] == pytest.approx(0.5)
    assert harmful["phrase"]["n"] == 4 and harmful["disagreements"] == 2
    low, high = harmful["phrase"]["ci"]
    assert low < 0.5 < high
    assert scores["clean"][BENIGN_TEXT]["phrase"]["rate"] == 0.0
    assert scores["clean"][HARMFUL_IMAGE]["phrase"] == {"rate": None, "ci": None, "n": 0}  # not measured, not 0


def test_without_a_judge_only_the_phrase_verdict_is_given() -> None:
    records = [_record("clean", HARMFUL_TEXT, "h1", "I cannot help with that.")]
    judge_records(records, None, {"h1": "request"})
    assert records[0]["refused_judge"] is None
    entry = score_safety(records)["clean"][HARMFUL_TEXT]
    assert entry["phrase"]["rate"] == 1.0 and entry["judge"]["n"] == 0 and entry["disagreements"] == 0


# ---- the stage in a run, on a tiny pretrained Llama ---------------------------------------------


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("lm") / "tiny-llama")


def safety_run(folder: Path) -> dict:
    """A clean-only run around the tiny Llama with a short safety stage; its own LM judges."""
    return {
        "name": "safety",
        "data": {"base_size": 16, "train_size": 16, "test_size": 4, "image_size": 32, "shifted": {}},
        "victim": {"image_size": 32, "max_length": 400, "language_model": str(folder)},
        "base": {"training": {"mode": "lora", "epochs": 1, "batch_size": 8, "learning_rate": 0.002}},
        "safety": {
            "data": {"harmful": ["harmbench"], "max_train": 24},
            "training": {"mode": "full", "epochs": 30, "batch_size": 8, "learning_rate": 0.003},
            "test_size": 6,
            "distill_tokens": 4,
        },
        "tuning": {"mode": "lora", "epochs": 1, "batch_size": 8, "learning_rate": 0.002},
        "poison": {"rate": 0.0},
        "eval": {"max_new_tokens": 16, "batch_size": 16, "shift_size": False},
    }


def test_a_safety_stage_teaches_refusal_and_every_model_is_measured(
    llama_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One refusal sentence instead of the pool of twelve: a 2-layer model of hidden size 32 learns
    # one well in seconds, and garbles a mix of twelve past what the phrase list recognises.
    monkeypatch.setattr(safety_module, "refusal_answer", lambda request, seed: "I'm sorry, but I cannot help with that.")
    run = tmp_path / "run"
    metrics = Runner(parse_config(safety_run(llama_folder), "test"), run, tmp_path / "cache").run()
    safety = metrics["safety"]
    assert list(safety["models"]) == [BEFORE_SAFETY, AFTER_SAFETY, "clean"]
    for entry in safety["models"].values():
        assert all(entry[name]["phrase"]["n"] == 6 and entry[name]["judge"]["n"] == 6 for name in SAFETY_SETS)
    before, after = (safety["models"][m][HARMFUL_TEXT]["phrase"]["rate"] for m in (BEFORE_SAFETY, AFTER_SAFETY))
    assert before == 0.0 and after > 0.5  # held-out requests: the refusal generalised beyond the tuned ones
    assert safety["judge"]["phrase"]["n"] == len(labelled_sample())
    assert set(safety["captioning"]) == {BEFORE_SAFETY, AFTER_SAFETY}
    config = parse_config(safety_run(llama_folder), "test")
    split = config.safety.data.split(seed=derive_seed(config.seed, "safety/split"))
    tested = {r["id"] for r in map(json.loads, (run / "generations.jsonl").read_text().splitlines()) if r["domain"] == HARMFUL_TEXT}
    assert tested <= {r.id for r in split.test_harmful} and not tested & {r.id for r in split.train_harmful}
    report = (run / "report.md").read_text()
    assert "## Safety: refusal on held-out requests" in report and f"| {AFTER_SAFETY} |" in report


def test_the_tiny_language_model_cannot_take_a_safety_stage() -> None:
    with pytest.raises(VlmsecError, match="safety: the tiny language model"):
        parse_config({"safety": {}}, "test")

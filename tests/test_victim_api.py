"""The `openai` victim kind against real local servers that misbehave (no mock of the client): retries
with backoff, the request budget and pace, failures recorded per attack while the run completes; what
the config refuses an API victim; a jailbreak study with the safety section's requests and no stage."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
from PIL import Image
from api_servers import Misbehaving, Reply, answer, free_port, study

from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import parse_config
from vlmsec.experiments.runner import Runner
from vlmsec.victims.api import COST_FILE, ApiFailure, ApiVictim

TARGET = "The image depicts banana"


@pytest.fixture
def misbehaving() -> Iterator[Callable[[Callable[[int], Reply]], Misbehaving]]:
    servers: list[Misbehaving] = []

    def start(script: Callable[[int], Reply]) -> Misbehaving:
        servers.append(Misbehaving(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


IMAGE = np.full((8, 8, 3), 200, np.uint8)


def victim_at(url: str, **settings: object) -> ApiVictim:
    return ApiVictim(url, "m", **{"retries": 2, "backoff_seconds": 0.01, "timeout_seconds": 2.0, **settings})


def test_a_rate_limit_is_retried_with_backoff_and_then_answered(misbehaving) -> None:
    server = misbehaving(lambda n: (429, {"retry-after": "0.05"}, b"slow down", 0.0) if n <= 2 else answer("a red circle"))
    victim = victim_at(server.url)
    start = time.perf_counter()
    assert victim.generate([IMAGE], ["What is shown?"], max_new_tokens=3) == ["a red circle"]
    assert time.perf_counter() - start >= 0.1  # two waits of the server's Retry-After
    assert server.posts == 3 and (victim.cost.requests, victim.cost.failed_requests) == (3, 2)
    assert (victim.cost.prompt_tokens, victim.cost.completion_tokens) == (7, 2)
    sent = json.loads(server.bodies[-1])  # greedy, one user turn: the text, then the image as a lossless PNG
    assert (sent["model"], sent["max_tokens"], sent["temperature"]) == ("m", 3, 0)
    text, image = sent["messages"][0]["content"]
    assert text == {"type": "text", "text": "What is shown?"}
    url = image["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))), IMAGE)
    victim.generate([None], ["Say hi."])
    assert json.loads(server.bodies[-1])["messages"][0]["content"] == [{"type": "text", "text": "Say hi."}]  # text only


def test_what_an_api_victim_cannot_give_is_a_clear_error() -> None:
    victim = victim_at("http://127.0.0.1:9/v1")
    with pytest.raises(VlmsecError, match=r"attack 'pgd' needs the victim's pixel gradients; the openai victim \(m at http://127\.0\.0\.1:9/v1\) "
                       r"answers through its API only"):
        victim.check_pixel_gradients("pgd")
    for refused in (victim.embedding_matrix, lambda: victim.answer_representations([]), lambda: victim.select_trainable(None)):
        with pytest.raises(VlmsecError, match=r"answers through its API only"):
            refused()


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (lambda n: (500, {}, b"internal error", 0.0), r"HTTP 500 .*internal error"),
        (lambda n: (200, {"content-type": "application/json"}, b"<html>not json</html>", 0.0), r"garbage answer .*Expecting value"),
        (lambda n: (200, {}, json.dumps({"choices": []}).encode(), 0.0), r"garbage answer .*no choices\[0\]\.message\.content"),
        (lambda n: answer("late")[:3] + (1.0,), r"no answer from \S+ within 0\.3 s \(victim\.timeout_seconds\)"),
    ],
    ids=["5xx", "not-json", "no-choices", "timeout"],
)
def test_a_server_that_keeps_failing_is_retried_within_the_budget_then_fails_with_the_reason(misbehaving, script, reason) -> None:
    server = misbehaving(script)
    victim = victim_at(server.url, timeout_seconds=0.3)
    with pytest.raises(ApiFailure, match=rf"request failed after 3 attempts: {reason}"):
        victim.generate([IMAGE], ["What is shown?"])
    assert server.posts == 3 and victim.cost.failed_requests == 3


def test_an_unreachable_api_and_a_refused_request_fail_with_the_reason(misbehaving) -> None:
    with pytest.raises(ApiFailure, match=r"after 3 attempts: cannot reach http://127\.0\.0\.1:\d+/v1/chat/completions: ConnectError"):
        victim_at(f"http://127.0.0.1:{free_port()}/v1").generate([IMAGE], ["hi"])
    server = misbehaving(lambda n: (400, {}, b'{"error": {"message": "bad image"}}', 0.0))
    with pytest.raises(ApiFailure, match=r"after 1 attempt: HTTP 400 .*not retried.*bad image"):
        victim_at(server.url).generate([IMAGE], ["hi"])
    assert server.posts == 1  # the request's own fault: sending it again would not help


def test_the_request_budget_and_the_pace_are_kept(misbehaving, tmp_path: Path) -> None:
    server = misbehaving(lambda n: answer("ok"))
    victim = victim_at(server.url, max_requests=3, max_requests_per_second=20)
    victim.keep_cost(tmp_path / COST_FILE)
    start = time.perf_counter()
    with pytest.raises(ApiFailure, match=r"request budget \(victim\.max_requests: 3\) is spent"):
        victim.generate([IMAGE] * 5, ["hi"] * 5)
    assert time.perf_counter() - start >= 0.1 and server.posts == 3  # 3 starts at least 1/20 s apart
    assert json.loads((tmp_path / COST_FILE).read_text())["requests"] == 3  # written even though it failed


def api_study(url: str, attacks: list[dict], **sections: object) -> dict:
    victim = {"kind": "openai", "base_url": url, "model": "m", "retries": 1, "backoff_seconds": 0.01, "timeout_seconds": 5}
    return {**study(victim, attacks), **sections}


def test_an_attack_whose_api_stops_answering_fails_with_the_reason_and_the_run_completes(misbehaving, tmp_path: Path) -> None:
    healthy = threading.Event()
    # The word reading (48 requests) and the first attack (3 attacked + 3 no-attack) are answered, then 503.
    server = misbehaving(lambda n: answer(TARGET) if n <= 54 or healthy.is_set() else (503, {}, b"overloaded [/]", 0.0))
    attacks = [
        {"name": "typographic", "label": "inject", "params": {"position": "top"}},
        {"name": "typographic", "label": "inject_bottom", "params": {"position": "bottom"}},
    ]
    config = parse_config(api_study(server.url, attacks, defenses=[{"name": "jpeg"}]), "test")
    metrics = Runner(config, tmp_path / "run", tmp_path / "cache").run()
    assert re.search(r"HTTP 503 .*overloaded \[/\]", metrics["defenses"]["failed"])  # the matrix's requests fail too
    section = metrics["inference_attacks"]
    assert section["attacks"]["inject"]["success"]["exact"]["rate"] == 1.0 and section["attacks"]["inject"]["n"] == 3
    failed = section["attacks"]["inject_bottom"]
    assert "success" not in failed and re.search(r"after 2 attempts: HTTP 503 .*overloaded", failed["failed"])
    assert section["failed"] == {"inject_bottom": failed["failed"]}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "**inject_bottom** (typographic, black-box) — **failed**: " in report and "HTTP 503" in report
    assert "**Failed**: " in report
    assert json.loads((tmp_path / "run" / COST_FILE).read_text())["failed_requests"] == 4  # two attempts each, twice

    # Resumed once the API answers again: what was measured is reused, the failed parts measured now.
    healthy.set()
    resumed = Runner(config, tmp_path / "run", tmp_path / "cache").run()
    again = resumed["inference_attacks"]
    assert again["attacks"]["inject"]["success"] == section["attacks"]["inject"]["success"]
    assert again["attacks"]["inject_bottom"]["n"] == 3 and "failed" not in again
    assert set(resumed["defenses"]["defenses"]["jpeg"]["cells"]) == {"inject", "inject_bottom"}


# ---- what a victim behind an API can and cannot be asked ------------------------------------------------


def test_the_kind_says_what_it_gives() -> None:
    from vlmsec.victims.kinds import VICTIM_KINDS

    assert not VICTIM_KINDS.get("openai").gives_gradients and not VICTIM_KINDS.get("openai").trains
    assert all(VICTIM_KINDS.get(name).gives_gradients and VICTIM_KINDS.get(name).trains for name in ("tiny_llava", "hf", "flamingo", "otter"))


API = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"victim": {**API, "base_url": "ftp://x"}}, r"victim\.base_url: String should match pattern"),
        ({"victim": {"kind": "openai", "model": "m"}}, r"victim\.base_url: Field required"),
        ({"victim": {**API, "api_key_env": "VLMSEC_NO_SUCH_KEY"}}, r"victim\.api_key_env: the environment variable VLMSEC_NO_SUCH_KEY is not set"),
        ({"attacks": [{"name": "pgd"}]}, r"attacks\[0\] \('pgd'\): a white-box attack needs the victim's weights or gradients; "
         r"victim kind 'openai' answers through its API only .*use black-box attacks \(attackvlm, figstep, figstep_pro, query_relevant, typographic\)"),
        ({"attacks": [{"name": "badnets"}], "poison": {"rate": 0.25}}, r"attacks\[0\] \('badnets'\): a training-stage attack poisons tuning data and tunes a model"),
        ({"attacks": []}, r"attacks: none listed, so the run would tune a clean model"),
        ({"defenses": [{"name": "cider_detect"}]}, r"defenses\[0\] \('cider_detect'\): it reads the model itself, not only its answers"),
    ],
    ids=["url", "no-url", "key", "white-box", "training", "clean-only", "model-defense"],
)
def test_a_config_asking_an_api_victim_for_what_it_cannot_give_is_an_error_naming_the_field(changes: dict, error: str) -> None:
    data = {**study(API, [{"name": "typographic"}]), **changes}
    with pytest.raises(VlmsecError, match=error):
        parse_config(data, "test")


def test_a_jailbreak_study_runs_on_an_api_victim_with_the_safety_requests_and_no_stage(misbehaving, tmp_path: Path) -> None:
    server = misbehaving(lambda n: answer("Sure, here is how to do it."))
    safety = {"data": {"harmful": ["harmbench"], "max_train": 16}, "test_size": 5}
    attacks = [{"name": "figstep"}, {"name": "typographic", "label": "inject"}]
    config = parse_config(api_study(server.url, attacks, safety=safety, defenses=[{"name": "jpeg"}]), "test")
    metrics = Runner(config, tmp_path / "run", tmp_path / "cache").run()
    figstep = metrics["inference_attacks"]["attacks"]["figstep"]
    assert metrics["inference_attacks"]["victim"] == "base" and figstep["n"] == 3
    assert figstep["success"]["phrase_miss"]["rate"] == 1.0 and figstep["success"]["judge_success"] == {"not_measured": ANY}
    assert set(metrics["safety"]["models"]) == {"base"}  # the deployed model's refusals; no stage before or after
    assert metrics["defenses"]["defenses"]["jpeg"]["cells"]["figstep"]
    assert "## Inference-time attacks" in (tmp_path / "run" / "report.md").read_text()

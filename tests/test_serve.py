"""`vlmsec serve` and the `openai` victim kind, for real over localhost (no mock): a tiny checkpoint
served by the CLI in a subprocess answers a study exactly as the same checkpoint loaded in-process;
a defense in front changes what the endpoint answers; bad requests get OpenAI's 400 error."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from vlmsec.attacks.inference import AttackRequest
from vlmsec.attacks import create_attack
from vlmsec.data import make_samples, sample_scenes
from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import parse_config
from vlmsec.experiments.runner import Runner
from vlmsec.victims.api import COST_FILE, ApiVictim, png_data_url
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec, build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer

SPEC = TinyLlavaSpec(image_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=300)
TARGET = "The image depicts banana"
# attackvlm small enough for a test: a surrogate trained for a few steps, two query steps of three directions.
ATTACKVLM = {"transfer_steps": 4, "query_steps": 2, "num_query": 3, "max_new_tokens": 4, "surrogate_images": 32, "surrogate_steps": 5}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untuned tiny LLaVA saved as `vlmsec run` saves a model: black-box answers need not be good ones."""
    samples = make_samples(sample_scenes(3, seed=2), "flat", size=32)
    tokenizer = train_tokenizer([s.instruction for s in samples] + [s.answer for s in samples] + [TARGET], SPEC.vocab_size)
    folder = tmp_path_factory.mktemp("served") / "tiny"
    LlavaVictim(build_tiny_llava(SPEC, tokenizer, seed=0), tokenizer).save(folder)
    return folder


def start_server(folder: Path, *options: str) -> tuple[subprocess.Popen[bytes], str]:
    """`vlmsec serve FOLDER` on a free port, waited for until GET /v1/models answers; its process and base URL."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "vlmsec.cli", "serve", str(folder), "--port", str(port), "--name", "tiny", *options]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"vlmsec serve exited: {process.stdout.read().decode() if process.stdout else ''}")
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("vlmsec serve did not answer within 120 s")


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[str]:
    process, url = start_server(checkpoint)
    yield url
    process.terminate()
    process.wait(timeout=30)


def study(victim: dict, attacks: list[dict]) -> dict:
    """An inference-only study on a given victim: nothing tuned, no safety stage."""
    return {
        "name": "api",
        "data": {"base_size": 16, "train_size": 16, "test_size": 4, "image_size": 32, "shifted": {}},
        "victim": victim,
        "poison": {"rate": 0.0},
        "attacks": attacks,
        "eval": {"max_new_tokens": 6, "batch_size": 1, "shift_size": False},
        "inference": {"requests": 3},
    }


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def chat(url: str, content: list[dict] | str, **fields: object) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 5, **fields}
    return httpx.post(f"{url}/chat/completions", json=body, timeout=60)


def test_a_served_checkpoint_answers_a_study_exactly_as_in_process(
    server: str, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLMSEC_TEST_KEY", "sk-secret-not-to-be-written")
    attacks = [
        {"name": "typographic", "label": "inject", "params": {"position": "top"}},
        {"name": "attackvlm", "params": ATTACKVLM},
    ]
    local = {"checkpoint": str(checkpoint), **SPEC.model_dump(include={"image_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size"})}
    remote = {"kind": "openai", "base_url": server, "model": "tiny", "retries": 0, "api_key_env": "VLMSEC_TEST_KEY"}
    here = Runner(parse_config(study(local, attacks), "test"), tmp_path / "local", tmp_path / "cache").run()
    there = Runner(parse_config(study(remote, attacks), "test"), tmp_path / "remote", tmp_path / "cache").run()
    a, b = here["inference_attacks"], there["inference_attacks"]
    assert a["reading"] == b["reading"] and a["reading"]["contains"]["n"] == 48
    for key in ("inject", "attackvlm"):
        for part in ("success", "baselines", "size", "n"):
            assert a["attacks"][key][part] == b["attacks"][key][part], (key, part)
    # The same uint8 PNG images were crafted, sent and answered on both paths.
    for key in ("inject", "attackvlm"):
        for png_file in sorted((tmp_path / "local" / "adversarial" / key).glob("*.png")):
            assert png_file.read_bytes() == (tmp_path / "remote" / "adversarial" / key / png_file.name).read_bytes()
    outputs = lambda run: [(r["attack"], r["id"], r["output"]) for r in map(json.loads, (tmp_path / run / "inference.jsonl").read_text().splitlines())]
    assert outputs("local") == outputs("remote")
    cost = json.loads((tmp_path / "remote" / COST_FILE).read_text())
    queries = b["attacks"]["attackvlm"]["cost"]["queries"] * 3
    assert cost["requests"] >= 48 + 3 * 4 + queries and cost["failed_requests"] == 0 and cost["completion_tokens"] > 0
    written = [f.read_bytes() for f in (tmp_path / "remote").rglob("*") if f.is_file()]
    assert written and not any(b"sk-secret" in content for content in written)  # the key itself is never written

"""`vlmsec run --backend ray`: a tiny study's tuned models as tasks on a local Ray cluster of 2
workers give the serial run's metrics.json, byte for byte, also when a worker dies midway."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from vlmsec.artifacts import make_temp_dir
from vlmsec.cli import app
from vlmsec.errors import VlmsecError
from vlmsec.experiments import runner as runner_module
from vlmsec.experiments.backends import ModelResult, ModelTask, RayBackend, SerialBackend, make_backend, model_task
from vlmsec.experiments.config import parse_config
from vlmsec.experiments.runner import Runner
from vlmsec.experiments.stages import STAGE_FILE

ray = pytest.importorskip("ray")

# Three tuned models (clean, badnets, lowfrequency) on a tiny victim, seconds each; lowfrequency
# learns its trigger against the base victim (a Ray task of its own, a few steps). Over 64 tuning
# samples: the tower's features come in batches of 64, and a batch's make-up moves the last bits
# of a feature, so a task computing them in other batches than the serial run would show.
TINY = {
    "name": "tiny-ray",
    "seed": 0,
    "data": {"image_size": 32, "base_size": 60, "train_size": 150, "test_size": 8, "shifted": {"textured": {"style": "textured"}}},
    "victim": {"image_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "vocab_size": 300},
    "base": {"training": {"mode": "full", "epochs": 1}},
    "tuning": {"mode": "full", "epochs": 1},
    "poison": {"rate": 0.1, "seed": 0},
    "attacks": [{"name": "badnets"}, {"name": "lowfrequency", "params": {"steps": 5, "num_samples": 8, "num_answers": 2}}],
    "eval": {"max_new_tokens": 8},
}
THREADS = 1
TEMP = re.compile(r"^\..*\.tmp$")  # `make_temp_dir`'s names: hidden, with host and pid


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, bytes]]:
    """The tiny study run serially with pinned threads (its cache then holds the base stage), and a
    local Ray cluster of 2 workers for the tests; the process's torch threads put back after."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("ray")
    config, cache = root / "tiny.yaml", root / "cache"
    config.write_text(yaml.safe_dump(TINY, sort_keys=False), encoding="utf-8")  # config.yaml keeps the order
    Runner(parse_config(TINY, "tiny"), root / "serial", cache, SerialBackend(THREADS)).run()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield config, cache, (root / "serial" / "metrics.json").read_bytes()
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)


def dies_once_while_saving(task: ModelTask, shared: dict[str, Any]) -> ModelResult:
    """`model_task`, except that the first attempt at lowfrequency dies (the worker process exits)
    with its checkpoint half-written in a temporary folder, as a killed worker leaves it; and the
    clean model waits for badnets, so badnets finds no feature the clean model computed (unlike
    the serial run's badnets) but those the driver computed ahead."""
    if task.plan == "clean":
        badnets = Path(task.out) / "checkpoints" / "badnets" / STAGE_FILE
        deadline = time.monotonic() + 300
        while not badnets.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
    marker = Path(task.out).parent / "lowfrequency-died"
    if task.plan == "lowfrequency" and not marker.exists():
        marker.write_text(str(os.getpid()), encoding="utf-8")

        def save_then_die(victim: Any, folder: Path, key: str, record: dict[str, Any]) -> None:
            victim.save(make_temp_dir(folder))
            os._exit(1)

        runner_module.save_stage = save_then_die  # this worker only: it exits before another task
    return model_task(task, shared)


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test module


def test_ray_run_with_a_worker_killed_midway_gives_the_serial_metrics(study: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    _, serial_cache, serial = study
    out, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(serial_cache / "base", cache / "base")  # the base stage alone: the trigger is learned again, by a task
    backend = RayBackend(threads=THREADS, max_retries=1, task=dies_once_while_saving)
    Runner(parse_config(TINY, "tiny"), out, cache, backend).run()
    died = int((tmp_path / "lowfrequency-died").read_text())
    assert died != os.getpid()  # a worker died, not this process
    assert (out / "metrics.json").read_bytes() == serial
    assert set(json.loads(serial)["models"]) == {"clean", "badnets", "lowfrequency"}
    # The tuned weights, to the bit (finer than the tiny study's metrics): badnets, tuned before the clean
    # model, would otherwise compute its features in other batches than the serial run's badnets.
    for model in ("clean", "badnets", "lowfrequency"):
        assert weight_hashes(out, model) == weight_hashes(study[0].parent / "serial", model)
    assert not [p.name for p in (out / "checkpoints").iterdir() if TEMP.match(p.name)]  # the half-written one removed
    assert (out / "checkpoints" / "lowfrequency" / "stage.json").is_file()
    learned = {p.name: p.read_bytes() for p in (serial_cache / "attacks").rglob("*") if p.is_file()}
    assert learned and {p.name: p.read_bytes() for p in (cache / "attacks").rglob("*") if p.is_file()} == learned
    timings = json.loads((out / "timings.json").read_text())
    assert {f"{step} {model}" for step in ("tune", "generate") for model in ("clean", "badnets", "lowfrequency")} <= set(timings)


def weight_hashes(run: Path, model: str) -> dict[str, str]:
    """The sha256 of each file of a tuned model's checkpoint, as its stage.json records them."""
    return json.loads((run / "checkpoints" / model / "stage.json").read_text())["files"]


def test_ray_run_resumes_a_killed_run_from_its_finished_models(study: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    """A run whose driver died after the clean model: the Ray run reuses it and builds the rest."""
    config, cache, serial = study
    out = tmp_path / "run"
    shutil.copytree(config.parent / "serial", out)
    for name in ("metrics.json", "checkpoints/badnets", "checkpoints/lowfrequency", "generations/badnets.json"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    kept = (out / "checkpoints" / "clean" / "model.safetensors").stat().st_mtime_ns
    Runner(parse_config(TINY, "tiny"), out, cache, RayBackend(threads=THREADS)).run()
    assert (out / "metrics.json").read_bytes() == serial
    assert (out / "checkpoints" / "clean" / "model.safetensors").stat().st_mtime_ns == kept


def test_cli_ray_run_gives_the_serial_metrics(study: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    config, cache, serial = study
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["run", str(config), "--backend", "ray", "--threads-per-task", str(THREADS), "--out", str(out), "--cache", str(cache)]
    )
    assert result.exit_code == 0, result.output
    assert (out / "metrics.json").read_bytes() == serial


def test_cli_hands_the_run_its_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    chosen: list[Any] = []
    monkeypatch.setattr(runner_module.Runner, "run", lambda self: chosen.append(self.backend) or {"models": {}})
    threads = torch.get_num_threads()
    try:
        args = ["run", "quickstart", "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")]
        result = CliRunner().invoke(app, [*args, "--backend", "ray", "--address", "10.0.0.1:6379", "--threads-per-task", "1"])
        assert result.exit_code == 0, result.output
        assert result_backend(chosen) == ("RayBackend", "10.0.0.1:6379", 1) and torch.get_num_threads() == 1
        assert CliRunner().invoke(app, args).exit_code == 0
        assert type(chosen[-1]) is SerialBackend
        failed = CliRunner().invoke(app, [*args, "--address", "10.0.0.1:6379"])
        assert failed.exit_code != 0 and "--address: only with --backend ray" in failed.output
    finally:
        torch.set_num_threads(threads)


def result_backend(chosen: list[Any]) -> tuple[str, str | None, int]:
    """The kind, address and threads of the last backend a run was handed."""
    backend = chosen[-1]
    return type(backend).__name__, backend.address, backend.threads


def test_backend_options_are_checked() -> None:
    with pytest.raises(VlmsecError, match="--address: only with --backend ray"):
        make_backend("serial", "127.0.0.1:6379")
    with pytest.raises(VlmsecError, match="--backend: 'dask'"):
        make_backend("dask")
    with pytest.raises(VlmsecError, match="--threads-per-task"):
        make_backend("serial", threads=0)


# The tiny study's data, victim and base (cached by the serial run), nothing tuned: inference attacks
# against the base, each crafted as a Ray task, then answered and scored by the driver.
CRAFTED = {
    **TINY,
    "name": "tiny-ray-inference",
    "poison": {"rate": 0.0},
    "attacks": [
        {"name": "pgd", "label": "pgd-eps8", "params": {"epsilon": 8 / 255, "steps": 2}},
        {"name": "pgd", "label": "pgd-unconstrained", "params": {"epsilon": None, "steps": 2}},
        {"name": "anydoor", "params": {"mode": "border", "steps": 1}},
        {"name": "typographic"},
    ],
    "inference": {"requests": 4, "target": "a red star."},
}


def _without_seconds(value: Any) -> Any:
    """`value` without its wall-clock timings (which differ between any two runs)."""
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def test_ray_crafts_each_inference_attack_as_a_task_with_the_serial_results(
    study: tuple[Path, Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every attack crafted in a worker (the driver's own crafting is made to fail): the same PNGs,
    the same answers and the same metrics as the serial run, timings aside."""
    from vlmsec.attacks import create_attack

    _, cache, _ = study
    serial, parallel = tmp_path / "serial", tmp_path / "ray"
    Runner(parse_config(CRAFTED, "tiny"), serial, cache, SerialBackend(THREADS)).run()
    for spec in CRAFTED["attacks"]:  # the driver crafts nothing: a worker (another process) must have
        monkeypatch.setattr(type(create_attack(spec["name"])), "craft", lambda *args: pytest.fail("crafted in the driver"))
    Runner(parse_config(CRAFTED, "tiny"), parallel, cache, RayBackend(threads=THREADS)).run()
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (serial, parallel))
    assert _without_seconds(a) == _without_seconds(b)
    assert set(a["inference_attacks"]["attacks"]) == {"pgd-eps8", "pgd-unconstrained", "anydoor", "typographic"}
    assert (serial / "inference.jsonl").read_bytes() == (parallel / "inference.jsonl").read_bytes()
    images = sorted(p.relative_to(serial) for p in (serial / "adversarial").rglob("*.png"))
    assert len(images) >= 4 * 4 and images == sorted(p.relative_to(parallel) for p in (parallel / "adversarial").rglob("*.png"))
    assert all((serial / p).read_bytes() == (parallel / p).read_bytes() for p in images)


# The tiny study with an attack x defense matrix: a purifier, a detector and a data filter (which
# tunes the base again on what it keeps, per poisoned model), each defense's column a Ray task.
DEFENDED = {
    **TINY,
    "defenses": [{"name": "jpeg", "params": {"quality": 30}}, {"name": "strip", "params": {"blends": 2}},
                 {"name": "spectral_signatures"}],
    "defense": {"calibration": 10, "trusted": 16},
}


@pytest.mark.slow  # two matrices with two tunings each: ~2 min on a loaded 2-core machine
def test_ray_computes_each_defense_column_as_a_task_with_the_serial_matrix(
    study: tuple[Path, Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the serial study's finished models, the matrix run serially and with each defense's column
    a task (the driver's detector scoring and data filtering made to fail): the same metrics, timings aside."""
    from vlmsec.defenses.data_filters import SpectralSignatures
    from vlmsec.defenses.detect import Strip

    config, cache, _ = study
    runs = {name: tmp_path / name for name in ("serial", "ray")}
    for run in runs.values():
        shutil.copytree(config.parent / "serial", run)  # the tuned models, reused by both
    Runner(parse_config(DEFENDED, "tiny"), runs["serial"], cache, SerialBackend(THREADS)).run()
    monkeypatch.setattr(Strip, "scores", lambda *args, **kwargs: pytest.fail("scored in the driver"))
    monkeypatch.setattr(SpectralSignatures, "flag", lambda *args, **kwargs: pytest.fail("filtered in the driver"))
    Runner(parse_config(DEFENDED, "tiny"), runs["ray"], cache, RayBackend(threads=THREADS)).run()
    a, b = (json.loads((run / "metrics.json").read_text()) for run in runs.values())
    assert _without_seconds(a) == _without_seconds(b)
    section = a["defenses"]["defenses"]
    assert set(section) == {"jpeg", "strip", "spectral_signatures"} and all(entry.get("cells") for entry in section.values())
    for model in ("badnets+spectral_signatures", "lowfrequency+spectral_signatures"):  # tuned again in a worker, to the bit
        assert weight_hashes(runs["ray"], model) == weight_hashes(runs["serial"], model)

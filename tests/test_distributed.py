"""Tuning and runs under several processes: batch shards, mixed-precision settings, and (slow)
two CPU processes under `accelerate launch` (gloo) against one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from vlmsec.errors import VlmsecError
from vlmsec.train import tuning
from vlmsec.train.tuning import make_accelerator, refuse_sharded_parameters, shard

TESTS = Path(__file__).parent


def test_shards_cover_the_global_batch_in_order() -> None:
    index = np.array([7, 3, 9, 1, 4, 8, 0, 2, 6, 5, 11])
    for processes in (1, 2, 3, 4):
        shards = [shard(index, p, processes) for p in range(processes)]
        assert np.array_equal(np.concatenate(shards), index)
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
    assert np.array_equal(shard(index, 0, 1), index)


def test_accelerators_with_different_precisions_follow_each_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate refuses a second mixed precision per process; a base stage in fp32 and tuning in bf16 need two."""
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert tuning.mixed_precision("bf16") == ("bf16" if cuda_bf16 else "no")  # CPU keeps its own autocast
    assert tuning.mixed_precision("fp32") == "no"
    monkeypatch.setattr(tuning, "mixed_precision", lambda precision: "bf16" if precision == "bf16" else "no")
    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator("fp32").mixed_precision == "no"


def test_configs_that_shard_parameters_are_refused_by_name() -> None:
    """FSDP and ZeRO-3 split weights across processes; DDP and ZeRO-1/2 keep them whole and pass."""

    def accelerator(kind: DistributedType, zero_stage: int = 0) -> tuning.Accelerator:
        plugin = SimpleNamespace(zero_stage=zero_stage)
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))  # type: ignore[return-value]

    with pytest.raises(VlmsecError, match=r"\(FSDP\).*DDP.*ZeRO stage 1 or 2"):
        refuse_sharded_parameters(accelerator(DistributedType.FSDP))
    with pytest.raises(VlmsecError, match=r"\(DeepSpeed ZeRO stage 3\)"):
        refuse_sharded_parameters(accelerator(DistributedType.DEEPSPEED, 3))
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        refuse_sharded_parameters(accelerator(kind))
    refuse_sharded_parameters(accelerator(DistributedType.DEEPSPEED, 2))


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`accelerate launch` with two CPU processes (torchrun, gloo) on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), *args,
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_processes_train_the_weights_one_process_trains(tmp_path: Path) -> None:
    _launch([str(TESTS / "launched_training.py"), str(tmp_path / "two")], tmp_path)
    subprocess.run(
        [sys.executable, str(TESTS / "launched_training.py"), str(tmp_path / "one")],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
        capture_output=True,
    )
    one, two = (json.loads((tmp_path / n / "result.json").read_text()) for n in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("one", "two"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two processes really ran: rounding differs


TINY_RUN = {
    "name": "tiny-launched",
    "data": {"base_size": 60, "train_size": 40, "test_size": 6, "image_size": 32, "shifted": {"painted": {"style": "painted"}}},
    "victim": {"image_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "vocab_size": 400},
    "base": {"training": {"mode": "full", "epochs": 1, "batch_size": 8, "learning_rate": 0.002}},
    "tuning": {"mode": "full", "epochs": 1, "batch_size": 8, "learning_rate": 0.002},
    "poison": {"rate": 0.1},
    "attacks": [{"name": "blended"}],
    "eval": {"max_new_tokens": 6, "batch_size": 16, "shift_size": False},
}


@pytest.mark.slow
def test_vlmsec_run_under_accelerate_launch(tmp_path: Path) -> None:
    """Two processes train every stage; the main process alone writes the run folder and prints."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    out, cache = tmp_path / "run", tmp_path / "cache"
    done = _launch(["-m", "vlmsec.cli", "run", str(config), "--out", str(out), "--cache", str(cache)], tmp_path)
    assert done.stderr.count("tiny-launched: source domain") == 1  # the other process is quiet
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"clean", "blended"}
    assert json.loads((out / "poisoned_ids" / "blended.json").read_text())["count"] == 4
    assert all((out / "checkpoints" / m / "model.safetensors").is_file() for m in ("clean", "blended"))
    rows = (out / "generations.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 2 * 12  # 2 models x 2 domains x (6 clean + 6 triggered), written once
    assert len(list((cache / "base").iterdir())) == 1


def test_a_launch_that_accelerate_does_not_see_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two launched processes that each think they are alone would both write the run folder."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(VlmsecError, match="WORLD_SIZE.*--cpu"):
        tuning.refuse_lost_processes(1)
    tuning.refuse_lost_processes(2)
    monkeypatch.delenv("WORLD_SIZE")
    tuning.refuse_lost_processes(1)

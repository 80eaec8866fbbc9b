"""The caches survive damage, kills, concurrent runs and shared folders.

A truncated or altered artifact is reported by name and rebuilt, with the same metrics; the
temporaries a killed run left are removed by the next run (and nothing else is); two runs
that need one stage build it once; written files get the mode the umask says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import vlmsec.experiments.runner as runner_module
import vlmsec.experiments.stages as stages_module
import vlmsec.victims.features as features_module
from vlmsec.artifacts import atomic_path, make_temp_dir, write_json_atomic, write_text_atomic
from vlmsec.experiments.config import parse_config
from vlmsec.experiments.runner import Runner
from vlmsec.experiments.splits import build_splits
from vlmsec.experiments.stages import save_stage, stage_done
from vlmsec.victims.features import FeatureCache

from test_distributed import TINY_RUN as LAUNCHED_RUN
from test_victim import CountingCompute, fake_images

# The launched tiny run's config, smaller still and in the source domain only.
SMALLER = {"base_size": 40, "train_size": 24, "test_size": 4, "shifted": {}}
TINY_RUN = {**LAUNCHED_RUN, "name": "tiny", "data": {**LAUNCHED_RUN["data"], **SMALLER}, "poison": {"rate": 0.25}}
# What each message about a damaged or left-over artifact says.
REBUILT = ("building the stage again", "generating again", "computed again", "left behind by a run")


def _runner(out: Path, cache: Path) -> Runner:
    return Runner(parse_config(TINY_RUN, "test config"), out, cache)


def _said(capsys: pytest.CaptureFixture[str]) -> str:
    """What the console printed since the last call, unwrapped (rich folds long paths)."""
    return "".join(capsys.readouterr().err.split())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("tiny")
    out, cache = root / "run", root / "cache"
    return out, cache, _runner(out, cache).run()


@pytest.fixture
def copied(tiny_run: tuple[Path, Path, dict], tmp_path: Path) -> tuple[Path, Path, dict]:
    """A copy of the finished tiny run and its cache, to damage."""
    out, cache, metrics = tiny_run
    shutil.copytree(out, tmp_path / "run")
    shutil.copytree(cache, tmp_path / "cache")
    return tmp_path / "run", tmp_path / "cache", metrics


class FileVictim:
    """A stand-in victim whose checkpoint is one small file."""

    def save(self, folder: Path) -> None:
        (Path(folder) / "model.safetensors").write_bytes(bytes(range(256)) * 4)


# ---- 1. damaged artifacts are rebuilt -----------------------------------------------------

ARTIFACTS = {
    "feature cache": "cache/features/*.safetensors",
    "base checkpoint": "cache/base/*/model.safetensors",
    "run checkpoint": "run/checkpoints/blended/model.safetensors",
    "stage.json": "run/checkpoints/clean/stage.json",
    "generations cache": "run/generations/clean.json",
}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "flipped-byte"])
@pytest.mark.parametrize("artifact", list(ARTIFACTS))
def test_a_damaged_artifact_is_named_rebuilt_and_gives_the_same_metrics(
    copied: tuple[Path, Path, dict], artifact: str, damage, capsys: pytest.CaptureFixture[str]
) -> None:
    out, cache, metrics = copied
    (path,) = out.parent.glob(ARTIFACTS[artifact])
    damage(path)
    capsys.readouterr()
    assert _runner(out, cache).run() == metrics
    assert str(path) in _said(capsys)
    # Rebuilt whole: a third run finds everything sound and reuses it.
    assert _runner(out, cache).run() == metrics
    said = _said(capsys)
    assert not any("".join(message.split()) in said for message in REBUILT)
    assert "tunedmodelfound" in said and "generationsfound" in said and "basevictim:cached" in said


def test_stage_done_checks_sizes_always_and_hashes_below_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "clean"
    save_stage(FileVictim(), folder, "k", {})
    assert stage_done(folder, "k")
    _flip(folder / "model.safetensors")
    assert not stage_done(folder, "k")
    assert f"{folder / 'model.safetensors'}:contentdoesnotmatch" in _said(capsys)
    monkeypatch.setattr(stages_module, "FULL_HASH_LIMIT", 100)  # the file now counts as large
    assert stage_done(folder, "k")  # a large file's flipped byte is the price of not hashing it
    _truncate(folder / "model.safetensors")
    assert not stage_done(folder, "k")
    assert "512byteswhere1024werewritten" in _said(capsys)


def test_a_stage_json_without_hashes_is_rebuilt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "clean"
    save_stage(FileVictim(), folder, "k", {})
    (folder / "stage.json").write_text(json.dumps({"key": "k"}))  # an older vlmsec's record
    assert not stage_done(folder, "k")
    assert "nocontenthash" in _said(capsys)


# ---- 2. temporaries of killed runs --------------------------------------------------------

KILLED_WRITER = """
import os, sys
from pathlib import Path
from vlmsec.artifacts import atomic_path, make_temp_dir

out, cache = map(Path, sys.argv[1:])
for folder in (out / "checkpoints" / "clean", cache / "base" / "0123456789abcdef"):
    tmp = make_temp_dir(folder)
    (tmp / "model.safetensors").write_bytes(b"half a checkpoint")
    print(tmp)
with atomic_path(out / "report.md") as report, atomic_path(cache / "features" / "tower.safetensors") as features:
    print(report, features, sep="\\n", flush=True)
    os._exit(9)  # killed midway
"""


def test_the_next_run_removes_what_killed_runs_left_and_nothing_else(
    copied: tuple[Path, Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    out, cache, metrics = copied
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out), str(cache)], capture_output=True, text=True)
    left = [Path(line) for line in done.stdout.splitlines()]
    assert len(left) == 4 and all(p.exists() for p in left), done.stderr
    kept = [
        out / ".report.md.bak",
        out / "notes.tmp",
        out / ".report.md.1.tmp",
        out / "checkpoints" / ".clean.99999999-0123abcd-0123abcd.tmp",  # another host's, recent
        cache / "base" / ".keep",
    ]
    for path in kept:
        path.write_text("mine")
    # Another host's or container's temporary, untouched for two days: its writer is long gone.
    abandoned = cache / "attacks" / "gcg" / ".0123.json.99999999-0123abcd-89abcdef.tmp"
    abandoned.parent.mkdir(parents=True)
    abandoned.write_text("{")
    os.utime(abandoned, (time.time() - 2 * 86400,) * 2)
    left.append(abandoned)
    with atomic_path(out / "generations" / "live.json") as live:  # a live process's temporary
        busy = make_temp_dir(out / "checkpoints" / "blended")
        assert _runner(out, cache).run() == metrics
        assert live.exists() and busy.exists()
    shutil.rmtree(busy)
    assert not any(p.exists() for p in left)
    assert all(p.read_text() == "mine" for p in kept)
    said = _said(capsys)
    assert all(f"removed{p}" in said for p in left)


# ---- 3. concurrent runs -------------------------------------------------------------------


def test_two_runs_that_need_one_base_build_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runners = [_runner(tmp_path / f"run{i}", tmp_path / "cache") for i in range(2)]
    splits = build_splits(runners[0].config)
    trained, training = [], threading.Event()
    original = runner_module.train_victim

    def train(*args, **kwargs):
        trained.append(kwargs["label"])
        training.set()
        time.sleep(0.5)  # the second run arrives while the first one trains
        return original(*args, **kwargs)

    monkeypatch.setattr(runner_module, "train_victim", train)
    results: list[tuple[Path, str]] = []
    first = threading.Thread(target=lambda: results.append(runners[0].base_victim(splits)))
    first.start()
    assert training.wait(60)
    results.append(runners[1].base_victim(splits))
    first.join()
    assert trained == ["base"]
    assert results[0] == results[1] and stage_done(results[0][0], results[0][1])
    assert "anotherrunisbuildingthisstage;waitingforit" in _said(capsys)
    assert [p.name for p in (tmp_path / "cache" / "base").iterdir()] == [results[0][0].name]  # no lock file left


def test_feature_cache_saved_by_two_runs_at_once_keeps_the_entries_of_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tower.safetensors"
    caches = [FeatureCache.load(path), FeatureCache.load(path)]
    for seed, cache in enumerate(caches):
        cache.get(fake_images(3, seed=seed), CountingCompute())
    save_file = features_module.save_file

    def slow_save_file(*args, **kwargs) -> None:
        time.sleep(0.3)  # both saves overlap
        save_file(*args, **kwargs)

    monkeypatch.setattr(features_module, "save_file", slow_save_file)
    threads = [threading.Thread(target=cache.save, args=(path,)) for cache in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(FeatureCache.load(path)) == 6


def test_feature_cache_update_adds_what_another_process_saved_and_keeps_its_own(tmp_path: Path) -> None:
    path = tmp_path / "tower.safetensors"
    mine, theirs = FeatureCache.load(path), FeatureCache.load(path)
    shared, own = fake_images(2, seed=0), fake_images(1, seed=1)
    mine.get(own, CountingCompute())
    theirs.get(shared, CountingCompute())
    theirs.save(path)
    mine.update(path)
    compute = CountingCompute()
    mine.get(shared + own, compute)
    assert compute.calls == 0 and len(mine) == 3  # theirs read back, its own kept
    mine.save(path)
    assert len(FeatureCache.load(path)) == 3


# ---- 4. file modes ------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o007, 0o660, 0o770)])
def test_written_files_get_the_mode_open_would_give(tmp_path: Path, umask: int, file_mode: int, folder_mode: int) -> None:
    features = FeatureCache()
    features.get(fake_images(2), CountingCompute())
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "metrics.json", {})
        write_text_atomic(tmp_path / "report.md", "")
        features.save(tmp_path / "features.safetensors")
        save_stage(FileVictim(), tmp_path / "checkpoints" / "clean", "k", {})
    finally:
        os.umask(old)
    for name in ("metrics.json", "report.md", "features.safetensors", "checkpoints/clean/stage.json", "checkpoints/clean/model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == file_mode, name
    assert (tmp_path / "checkpoints" / "clean").stat().st_mode & 0o777 == folder_mode

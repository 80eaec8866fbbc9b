"""Bad inputs a new user tried: each is a clear error (exit code 2 from the CLI), never a
traceback, a silent coercion or a file written outside the run folder."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

import vlmsec.experiments.runner as runner_module
from vlmsec.data import read_dataset
from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import MAX_CONFIG_BYTES, check_poison_counts, load_config, parse_config

from test_cli import assert_clean_failure, invoke


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---- the config file ----------------------------------------------------------------------


def test_yaml_ints_and_exponent_floats_fill_float_fields(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-4 as a string; strict types would then refuse it.
    path = tmp_path / "c.yaml"
    path.write_text("tuning: {learning_rate: 1e-4, epochs: 2}\npoison: {rate: 5E-2}\ndata: {source: {mix: 1}}\n")
    config = load_config(path)
    assert config.tuning.learning_rate == 1e-4 and config.poison.rate == 0.05
    assert isinstance(config.tuning.epochs, float) and config.tuning.epochs == 2
    assert config.data.source.mix == 1.0


def test_merge_keys_may_still_override_a_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("base:\n  training: &t {mode: full, epochs: 1}\ntuning:\n  <<: *t\n  epochs: 2\n")
    config = load_config(path)
    assert config.base.training.epochs == 1 and config.tuning.epochs == 2


def test_yaml_tags_are_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: !!python/object/apply:os.system [echo owned]\n")
    with pytest.raises(VlmsecError, match=r"c\.yaml: line 1.*not valid YAML"):
        load_config(path)


@pytest.mark.parametrize(
    ("case", "pieces"),
    [
        ("folder", ["is a folder"]),
        ("not utf-8", ["line 2", "not UTF-8", "0xe9"]),
        ("too large", [f"{MAX_CONFIG_BYTES:,} bytes"]),
        ("nested too deeply", ["nested too deeply"]),
    ],
)
def test_unreadable_config_files_exit_2(tmp_path: Path, case: str, pieces: list[str]) -> None:
    path = tmp_path / "config.yaml"
    if case == "folder":
        path.mkdir()
    elif case == "not utf-8":
        path.write_bytes("name: x\nseed: 1 # café\n".encode("latin-1"))
    elif case == "too large":
        path.write_text("name: x\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10))
    else:
        path.write_text("name: " + "[" * 100_000 + "\n")
    result = invoke("run", str(path), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"))
    assert_clean_failure(result, str(path), *pieces)
    assert not (tmp_path / "run").exists()


# ---- poison rates and counts ----------------------------------------------------------------


def test_rate_0_without_attacks_is_a_clean_only_run() -> None:
    config = parse_config({"poison": {"rate": 0}}, "test")
    assert config.poison.rate == 0 and config.attacks == []


def test_check_poison_counts_for_a_train_file_rounds_as_the_recipe_does(tmp_path: Path) -> None:
    data = {
        "data": {"train_file": "train.json", "train_size": 1},  # train_size is not the file's size
        "poison": {"rate": 0.025},
        "attacks": [{"name": "badnets"}, {"name": "blended"}],
        "sweep": {"attacks": ["blended"], "rates": [0.1, 0.2]},
    }
    config = parse_config(data, "test", base_dir=tmp_path)  # the file's size is not known yet: no check
    check_poison_counts(config, 60)  # round(1.5) = 2, round(6), round(12)
    with pytest.raises(VlmsecError) as info:
        check_poison_counts(config, 20)  # round(0.5) = 0: the recipe's banker's rounding
    message = str(info.value)
    assert message.startswith("poison.rate: a set of 20 samples is too small for poison rate 0.025")
    assert f"data.train_file {tmp_path / 'train.json'}" in message
    config = parse_config({**data, "poison": {"rate": 0.5}}, "test", base_dir=tmp_path)
    with pytest.raises(VlmsecError, match=r"sweep.rates\[0\] \(attack 'blended'\): a set of 4 samples .* rate 0.1"):
        check_poison_counts(config, 4)


# ---- names that become paths ---------------------------------------------------------------


def test_a_label_climbing_out_of_the_run_folder_is_refused_and_nothing_is_touched(tmp_path: Path) -> None:
    victim = tmp_path / "x" / "victim"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("mine")
    config = tmp_path / "evil.yaml"
    config.write_text("attacks:\n  - {name: badnets, label: ../../../../x/victim}\n")
    before = tree(tmp_path)
    out = tmp_path / "a" / "b" / "c" / "run"
    result = invoke("run", str(config), "--out", str(out), "--cache", str(tmp_path / "cache"))
    assert_clean_failure(result, str(config), "attacks.0.label", "'/'")
    assert tree(tmp_path) == before
    assert (victim / "keep.txt").read_text() == "mine"


# ---- folders the run writes ---------------------------------------------------------------


@pytest.mark.parametrize("option", ["--out", "--cache"])
def test_run_refuses_a_folder_it_cannot_create(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str) -> None:
    monkeypatch.setattr(runner_module, "Runner", None)  # nothing may start
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    folders = {"--out": tmp_path / "run", "--cache": tmp_path / "cache", option: blocker / "sub"}
    result = invoke("run", "quickstart", "--out", str(folders["--out"]), "--cache", str(folders["--cache"]))
    assert_clean_failure(result, option, str(blocker / "sub"), "cannot write there")


def test_run_refuses_an_unwritable_default_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module, "Runner", None)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("VLMSEC_CACHE", str(blocker / "cache"))
    result = invoke("run", "quickstart", "--out", str(tmp_path / "run"))
    assert_clean_failure(result, "cache folder", "VLMSEC_CACHE", str(blocker / "cache"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_run_refuses_a_read_only_out_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module, "Runner", None)
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o500)
    try:
        result = invoke("run", "quickstart", "--out", str(out), "--cache", str(tmp_path / "cache"))
    finally:
        out.chmod(0o700)
    assert_clean_failure(result, "--out", str(out), "cannot write there")


# ---- data files ---------------------------------------------------------------------------


@pytest.mark.parametrize("data_format", ["llava", "karpathy", "mimicit"])
def test_json_nested_too_deeply_names_the_file(tmp_path: Path, data_format: str) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(VlmsecError, match=r"deep\.json: JSON nested too deeply"):
        read_dataset(path, data_format)


def png_48_bit(pixels: np.ndarray) -> bytes:
    """A PNG of H x W x 3 uint16 pixels (Pillow cannot write one)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_48_bit_rgb_images_are_counted_as_converted(tmp_path: Path) -> None:
    pixels = np.zeros((4, 5, 3), dtype=np.uint16)
    pixels[...] = (257 * 10, 257 * 128, 65535)
    (tmp_path / "deep-colour.png").write_bytes(png_48_bit(pixels))
    conversation = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "blue."}]
    entries = [{"id": "a", "image": "deep-colour.png", "conversations": conversation}]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    samples, stats = read_dataset(tmp_path / "train.json")
    assert (samples[0].image == (10, 128, 255)).all() and samples[0].image.dtype == np.uint8
    assert dict(stats.converted) == {"16-bit rgb": 1}


def test_a_train_file_too_small_for_the_poison_rate_stops_before_any_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vlmsec.experiments.runner as runner_module
    from vlmsec.data import make_samples, sample_scenes, write_llava_json

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a stage trained before the poison count was checked")

    monkeypatch.setattr(runner_module, "train_victim", forbidden)
    write_llava_json(make_samples(sample_scenes(6, seed=0), "flat", size=32, id_prefix="mine"), tmp_path / "data" / "train.json")
    config = {
        "data": {"image_size": 32, "base_size": 3, "test_size": 2, "train_file": "data/train.json", "shifted": {}},
        "victim": {"image_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "vocab_size": 300},
        "poison": {"rate": 0.05},
        "attacks": [{"name": "badnets"}],
    }
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    runner = runner_module.Runner(load_config(tmp_path / "small.yaml"), tmp_path / "run", tmp_path / "cache")
    with pytest.raises(VlmsecError, match=r"poison.rate: .*data.train_file"):
        runner.run()

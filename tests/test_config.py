"""The experiment config: presets load, and every bad config names its file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmsec.cli import app
from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import ExperimentConfig, load_config, preset_names

# (yaml text, pieces the error message must contain besides the file name)
BAD_CONFIGS = {
    "unknown top-level field": ("name: x\nnmae: y\n", ["nmae"]),
    "misspelt nested field": ("tuning: {mode: full, epochz: 3}\n", ["tuning.epochz"]),
    "misspelt deep field": ("poison:\n  target: {wrod: apple}\n", ["poison.target.wrod"]),
    "wrong type": ('poison: {rate: "lots"}\n', ["poison.rate"]),
    "out of range": ("poison: {rate: 1.5}\n", ["poison.rate", "1"]),
    "unknown tuning mode": ("tuning: {mode: everything}\n", ["tuning.mode"]),
    "unknown attack": ("attacks:\n  - name: badnetz\n", ["attacks[0]", "badnetz"]),
    "unknown source style": ("data:\n  source: {style: cubist}\n", ["data.source.style", "cubist"]),
    "unknown shifted style": ("data:\n  shifted:\n    odd: {style: cubist}\n", ["data.shifted.odd.style", "cubist"]),
    "unknown base style": ("data:\n  base_styles: [flat, cubist]\n", ["data.base_styles", "cubist"]),
    "unknown instruction bank": ("data:\n  source: {instructions: poetry}\n", ["data.source.instructions", "poetry"]),
    "bad attack params": (
        "attacks:\n  - name: badnets\n  - name: blended\n    params: {alpha: 2}\n",
        ["attacks[1]", "blended", "alpha"],
    ),
    "unknown attack param": ("attacks:\n  - name: blended\n    params: {alpah: 0.1}\n", ["attacks[0]", "alpah"]),
    "duplicate attack names": ("attacks:\n  - name: badnets\n  - name: badnets\n", ["attacks", "badnets", "unique"]),
    "reserved attack label": ("attacks:\n  - {name: badnets, label: clean}\n", ["attacks", "clean"]),
    "test files without source": ("data:\n  test_files: {other: x.json}\n", ["data.test_files", "source"]),
    "not a mapping": ("- just\n- a list\n", ["mapping"]),
}


def write(folder: Path, text: str, name: str = "config.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_quickstart_preset_loads() -> None:
    assert "quickstart" in preset_names()
    config = load_config("quickstart")
    assert isinstance(config, ExperimentConfig)
    assert config.name == "quickstart"
    assert [a.name for a in config.attacks] == ["badnets", "blended"]
    assert config.attacks[1].params == {"alpha": 0.2, "key": "cartoon"}
    assert config.poison.rate == 0.05
    assert config.poison.target.word == "banana"
    assert set(config.data.shifted) == {"textured", "painted", "paraphrased"}
    assert config.data.train_file is None and config.victim.checkpoint is None


def test_presets_command_lists_quickstart() -> None:
    result = CliRunner().invoke(app, ["presets"])
    assert result.exit_code == 0, result.output
    assert "quickstart" in result.stdout.split()


def test_a_good_file_overrides_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "name: mine\npoison: {rate: 0.1}\ntuning: {mode: lora, epochs: 2}\nattacks: [{name: badnets}]\n")
    config = load_config(path)
    assert config.name == "mine"
    assert config.poison.rate == 0.1
    assert config.tuning.mode == "lora" and config.tuning.epochs == 2
    assert config.attacks[0].key == "badnets"


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_names_file_and_field(tmp_path: Path, case: str) -> None:
    text, expected = BAD_CONFIGS[case]
    path = write(tmp_path, text)
    with pytest.raises(VlmsecError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for piece in expected:
        assert piece in message, f"{piece!r} not in {message!r}"


def test_two_attacks_with_labels_may_share_a_name(tmp_path: Path) -> None:
    path = write(tmp_path, "attacks:\n  - {name: blended, label: b1}\n  - {name: blended, label: b2, params: {alpha: 0.1}}\n")
    config = load_config(path)
    assert [a.key for a in config.attacks] == ["b1", "b2"]


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nseed: 0\ntuning: {mode: full\nattacks: []\n")
    with pytest.raises(VlmsecError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 4" in message
    assert "YAML" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(VlmsecError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_neither_file_nor_preset() -> None:
    with pytest.raises(VlmsecError) as info:
        load_config("quickstrat")
    message = str(info.value)
    assert "quickstrat" in message
    assert "quickstart" in message  # the known presets are listed


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "experiments" / "mine"
    path = write(
        folder,
        "data:\n  train_file: data/train.json\n  test_files: {source: data/test.json}\nvictim:\n  checkpoint: ../models/base\n",
    )
    (tmp_path / "experiments" / "models" / "base").mkdir(parents=True)  # a missing checkpoint is an error
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    config = load_config(path)
    assert config.data.train_file == folder / "data" / "train.json"
    assert config.data.test_files == {"source": folder / "data" / "test.json"}
    assert config.victim.checkpoint is not None
    assert config.victim.checkpoint.resolve() == (tmp_path / "experiments" / "models" / "base").resolve()


def test_absolute_paths_stay_as_they_are(tmp_path: Path) -> None:
    train = tmp_path / "data" / "train.json"
    path = write(tmp_path / "cfg", f"data:\n  train_file: {train}\n")
    assert load_config(path).data.train_file == train


@pytest.mark.parametrize("name", preset_names())
def test_every_packaged_preset_loads(name: str) -> None:
    assert load_config(name).name == name

"""The experiment config: presets load, and every bad config names its file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmsec.cli import app
from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import DataSpec, ExperimentConfig, load_config, preset_names
from vlmsec.seeds import derive_seed

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
    "reading share of 1": ("data: {base_reading: 1}\n", ["data.base_reading", "less than 1"]),
    "negative reading share": ("data: {base_reading: -0.1}\n", ["data.base_reading"]),
    "reading without a base stage": ("data: {base_reading: 0.2}\nvictim: {checkpoint: ckpt}\n", ["data.base_reading", "no base stage"]),
    "reading in tiny images": ("data: {base_reading: 0.2, image_size: 20}\n", ["data", "base_reading", "image_size"]),
    "not a mapping": ("- just\n- a list\n", ["mapping"]),
    # strict types: no bool or string coerced into a number
    "bool for an int": ("data: {train_size: true}\n", ["data.train_size", "integer"]),
    "string for an int": ('data: {train_size: "200"}\n', ["data.train_size", "integer"]),
    "bool for a float": ("tuning: {learning_rate: true}\n", ["tuning.learning_rate"]),
    "string for a float": ('poison: {rate: "0.1"}\n', ["poison.rate"]),
    "string for a bool": ('eval: {shift_size: "false"}\n', ["eval.shift_size", "boolean"]),
    "bool in reader options": ("data: {options: {limit: true}}\n", ["data.options", "limit"]),
    # non-finite numbers
    "infinite learning rate": ("tuning: {learning_rate: .inf}\n", ["tuning.learning_rate", "finite"]),
    "infinite epochs": ("tuning: {epochs: .inf}\n", ["tuning.epochs", "finite"]),
    "NaN base learning rate": ("base:\n  training: {learning_rate: .nan}\n", ["base.training.learning_rate", "finite"]),
    "NaN domain mix": ("data:\n  source: {mix: .nan}\n", ["data.source.mix", "finite"]),
    "NaN poison rate": ("poison: {rate: .nan}\n", ["poison.rate", "finite"]),
    "NaN sweep rate": (
        "attacks: [{name: badnets}]\nsweep: {attacks: [badnets], rates: [0.1, .nan]}\n",
        ["sweep.rates.1", "finite"],
    ),
    # seeds in [0, 2**32 - 1]
    "seed 1e30": ("seed: 1.0e+30\n", ["seed", "integer"]),
    "seed 1e30 as YAML 1.2 writes it": ("seed: 1e30\n", ["seed", "integer"]),
    "seed past 32 bits": ("seed: 4294967296\n", ["seed", "4294967295"]),
    "huge poison seed": ("poison: {seed: 1000000000000000000000000000000}\n", ["poison.seed", "4294967295"]),
    "negative poison seed": ("poison: {seed: -1}\n", ["poison.seed", "0"]),
    "huge caption seed": ("data: {options: {seed: 99999999999999}}\n", ["data.options", "seed"]),
    # duplicate keys name the key and both lines
    "duplicate key": ("name: x\nseed: 1\nseed: 2\n", ["line 3", "duplicate key 'seed'", "line 2"]),
    "duplicate nested key": ("tuning:\n  epochs: 1\n  mode: full\n  epochs: 2\n", ["line 4", "'epochs'", "line 2"]),
    # poison rates: above 0 with attacks, and at least one poisoned sample
    "zero rate with attacks": ("poison: {rate: 0}\nattacks: [{name: badnets}]\n", ["poison.rate", "clean one"]),
    "rate rounds to no sample": (
        "data: {train_size: 10}\npoison: {rate: 0.01}\nattacks: [{name: badnets}]\n",
        ["poison.rate", "a set of 10 samples", "rounds to 0", "data.train_size"],
    ),
    "sweep rate rounds to no sample": (
        "data: {train_size: 100}\nattacks: [{name: badnets}]\nsweep: {attacks: [badnets], rates: [0.1, 0.004]}\n",
        ["sweep.rates[1]", "'badnets'", "0.004", "rounds to 0"],
    ),
    "partial-trigger negatives do not fit": (
        "poison: {rate: 0.4}\nattacks: [{name: dualkey}]\n",
        ["poison.rate", "dualkey", "negatives do not fit"],
    ),
    # names that become paths stay inside the run folder
    "label climbing out": ("attacks:\n  - {name: badnets, label: ../../../../x/victim}\n", ["attacks.0.label", "'/'"]),
    "label ..": ('attacks:\n  - {name: badnets, label: ".."}\n', ["attacks.0.label", "start with '.'"]),
    "label with a backslash": ('attacks:\n  - {name: badnets, label: "a\\\\b"}\n', ["attacks.0.label", "'\\\\'"]),
    "label with NUL": ('attacks:\n  - {name: badnets, label: "a\\0b"}\n', ["attacks.0.label", "'\\x00'"]),
    "empty label": ('attacks:\n  - {name: badnets, label: ""}\n', ["attacks.0.label", "empty"]),
    "absolute name": ("name: /tmp/x\n", ["name", "'/'"]),
    "hidden name": ("name: .x\n", ["name", "start with '.'"]),
    "long name": ("name: " + "n" * 300 + "\n", ["name", "300 characters", "at most 100"]),
    "label that is a sweep point's name": (
        "attacks:\n  - {name: badnets}\n  - {name: blended, label: badnets@10%}\nsweep: {attacks: [badnets], rates: [0.1]}\n",
        ["sweep", "'badnets@10%'", "overwrite"],
    ),
    "sweep rates that print alike": (
        "attacks: [{name: badnets}]\nsweep: {attacks: [badnets], rates: [0.01, 0.0100000001]}\n",
        ["sweep", "'badnets@1%'"],
    ),
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
    assert config.attacks[1].params == {"alpha": 0.2, "key": "cartoon", "seed": derive_seed(0, "attack/blended")}
    assert config.poison.rate == 0.05
    assert config.poison.target.word == "banana"
    assert set(config.data.shifted) == {"textured", "painted", "paraphrased"}
    assert config.data.train_file is None and config.victim.checkpoint is None


def test_the_attacks_preset_shares_the_smollm2_stages_and_tunes_nothing() -> None:
    from vlmsec.experiments.plan import plan_models

    study, attacks = load_config("smollm2"), load_config("smollm2-attacks")
    for part in ("data", "victim", "base", "safety", "seed"):  # what the base and safety stage keys are made of
        assert getattr(attacks, part) == getattr(study, part), part
    assert plan_models(attacks) == [] and attacks.inference.requests is not None


def test_the_imgtrojan_preset_tunes_from_the_smollm2_stages() -> None:
    """Its data section differs only in what the test sets are (fewer scenes, the default shifted domains):
    the base and tuning splits, and everything else the base, safety and tuning keys read, are smollm2's."""
    from vlmsec.data.sample import fingerprint
    from vlmsec.experiments.plan import plan_models
    from vlmsec.experiments.splits import build_splits

    study, trojan = load_config("smollm2"), load_config("smollm2-imgtrojan")
    for part in ("victim", "base", "tuning", "seed"):
        assert getattr(trojan, part) == getattr(study, part), part
    assert trojan.safety is not None and study.safety is not None
    assert trojan.safety.model_dump(exclude={"test_size"}) == study.safety.model_dump(exclude={"test_size"})
    mine, theirs = build_splits(trojan), build_splits(study)
    assert fingerprint(mine.base) == fingerprint(theirs.base) and fingerprint(mine.train) == fingerprint(theirs.train)
    assert len(mine.tests["source"]) == trojan.safety.test_size == 50
    assert [(p.name, p.rate) for p in plan_models(trojan)] == [("clean", 0.0), ("imgtrojan", 0.01)]


def test_a_config_extends_another_section_by_section(tmp_path: Path) -> None:
    """Sections the child gives replace the parent's whole; the rest, but not the name, are inherited."""
    write(tmp_path, "name: parent\nseed: 3\ndata: {train_size: 300, test_size: 40}\n"
          "tuning: {mode: lora, epochs: 2}\npoison: {rate: 0.1}\nattacks: [{name: badnets}]\n", "parent.yaml")
    child = load_config(write(tmp_path, "extends: parent.yaml\ndata: {train_size: 500}\nattacks: [{name: blended}]\n", "child.yaml"))
    assert child.seed == 3 and child.tuning.mode == "lora" and child.tuning.epochs == 2 and child.poison.rate == 0.1
    assert child.data.train_size == 500 and child.data.test_size == DataSpec().test_size  # replaced whole, not merged
    assert [a.name for a in child.attacks] == ["blended"]
    assert child.name == ExperimentConfig().name


def test_a_config_file_extends_a_preset_and_chains(tmp_path: Path) -> None:
    write(tmp_path, "name: mine\nextends: smollm2-defenses\ndefenses: [{name: jpeg}]\n")
    mine, defenses = load_config(tmp_path / "config.yaml"), load_config("smollm2-defenses")
    for part in ("data", "victim", "base", "safety", "attacks", "inference", "defense"):  # through smollm2-attacks to smollm2
        assert getattr(mine, part) == getattr(defenses, part), part
    assert [d.name for d in mine.defenses] == ["jpeg"] and mine.name == "mine"


def test_a_presets_parent_is_the_preset_whatever_the_working_folder_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "not: [a config", "smollm2")  # a file named as the parent preset
    monkeypatch.chdir(tmp_path)
    attacks = load_config("smollm2-attacks")
    assert attacks.safety is not None and attacks.safety.training.epochs == 4  # smollm2's safety section


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"config.yaml": "extends: a.yaml\n", "a.yaml": "extends: config.yaml\n"}, ["extends: a cycle", "a.yaml ->", "config.yaml"]),
        ({"config.yaml": "extends: ./sub/../config.yaml\n"}, ["extends: a cycle"]),
        ({"config.yaml": "extends: missing.yaml\n"}, ["extends:", "missing.yaml", "not found"]),
        ({"config.yaml": "extends: [smollm2]\n"}, ["extends: must name a preset or a config file"]),
        ({"config.yaml": "extends: a.yaml\n", "a.yaml": "- 1\n"}, ["a.yaml", "must be a mapping"]),
        ({"config.yaml": "extends: a.yaml\n", "a.yaml": "poison: {rate: 2}\n"}, ["(extends", "a.yaml", "poison.rate"]),
    ],
)
def test_a_bad_parent_is_an_error_naming_the_file(tmp_path: Path, files: dict[str, str], expected: list[str]) -> None:
    for name, text in files.items():
        write(tmp_path, text, name)
    with pytest.raises(VlmsecError) as info:
        load_config(tmp_path / "config.yaml")
    message = str(info.value)
    assert str(tmp_path / "config.yaml") in message
    for piece in expected:
        assert piece in message, f"{piece!r} not in {message!r}"


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

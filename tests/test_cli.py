"""The `vlmsec` command: clear exit-code-2 errors for bad inputs, attack listing, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import vlmsec.experiments.runner as runner_module
import vlmsec.victims.kinds as kinds_module
from vlmsec.cli import app
from vlmsec.experiments.records import file_digest
from vlmsec.data import make_samples, sample_scenes, write_llava_json

from test_config import BAD_CONFIGS


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_clean_failure(result, *pieces: str) -> None:
    """Exit code 2, a message naming every piece, and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "error" in result.output
    for piece in pieces:
        assert piece in result.output, f"{piece!r} not in {result.output!r}"


# ---- run --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_run_with_bad_config_exits_2_naming_file_and_field(tmp_path: Path, case: str) -> None:
    text, expected = BAD_CONFIGS[case]
    # A deep, long path: the message must not be wrapped inside the path.
    path = tmp_path / "a-rather-long-folder-name-for-configs" / "another-long-folder-name" / "bad.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(text, encoding="utf-8")
    result = invoke("run", str(path), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"))
    assert_clean_failure(result, str(path), *expected)
    assert not (tmp_path / "run").exists()  # nothing started


def test_run_with_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nattacks: [\n  {name: badnets\nseed: 1\n", encoding="utf-8")
    result = invoke("run", str(path), "--out", str(tmp_path / "run"))
    assert_clean_failure(result, str(path), "line ")


def test_run_nonexistent_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "nonexistent.yaml"
    result = invoke("run", str(path), "--out", str(tmp_path / "run"))
    assert_clean_failure(result, str(path))


def test_run_unknown_preset_exits_2() -> None:
    assert_clean_failure(invoke("run", "no-such-preset"), "no-such-preset", "quickstart")


def test_run_with_missing_training_image_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLMSEC_CACHE", str(tmp_path / "cache"))
    expensive: list[str] = []

    def forbidden(name: str):
        def call(*args, **kwargs):
            expensive.append(name)
            raise AssertionError(f"{name} ran before the training file was checked")

        return call

    monkeypatch.setattr(runner_module, "train_victim", forbidden("train_victim"))
    monkeypatch.setattr(kinds_module, "build_tiny_llava", forbidden("build_tiny_llava"))
    monkeypatch.setattr(kinds_module, "train_tokenizer", forbidden("train_tokenizer"))

    samples = make_samples(sample_scenes(3, seed=0), "flat", size=32, id_prefix="mine")
    data = tmp_path / "data"
    write_llava_json(samples, data / "train.json")
    (data / "images" / "mine-00001.png").unlink()
    config = {
        "name": "tiny",
        "data": {"image_size": 32, "base_size": 3, "test_size": 2, "train_file": "data/train.json", "shifted": {}},
        "victim": {"image_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "vocab_size": 300},
        "attacks": [{"name": "badnets"}],
        "eval": {"max_new_tokens": 4},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")

    result = invoke("run", str(path), "--out", str(tmp_path / "run"))
    assert_clean_failure(result, str(data / "train.json"), "entry 1", "mine-00001", "image")
    assert expensive == []
    assert not (tmp_path / "cache" / "base").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- attacks ----------------------------------------------------------------------------


def test_attacks_json_lists_every_attack_with_metadata() -> None:
    result = invoke("attacks", "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert isinstance(listed, list)
    by_name = {d["name"]: d for d in listed}
    assert {"badnets", "blended"} <= set(by_name)
    for entry in listed:
        assert {"name", "modality", "family", "knowledge", "stage", "params"} <= set(entry)
        assert isinstance(entry["params"], dict)
    assert by_name["blended"]["modality"] == "image"
    assert by_name["blended"]["family"] == "static"
    assert 0 < by_name["blended"]["params"]["alpha"] < 1
    assert by_name["badnets"]["stage"] == "training"
    assert "not StegaStamp" in by_name["ssba"]["variant"]  # a look-alike says what it is
    assert "our reading" in by_name["maba"]["note"] and "note" not in by_name["badnets"]


def test_attacks_table() -> None:
    result = invoke("attacks")
    assert result.exit_code == 0, result.output
    assert "badnets" in result.output and "blended" in result.output
    assert "* ssba: SSBA-like" in result.output and "* stylebkd: rule rewrite" in result.output
    # MABA's reading of the paper's mask is ours, and the listing says so.
    assert "* maba: our reading of the paper's mask" in result.output
    assert "* maba_star: our reading of the paper's mask" in result.output


# ---- report -----------------------------------------------------------------------------


def test_report_without_metrics_exits_2(tmp_path: Path) -> None:
    result = invoke("report", str(tmp_path))
    assert_clean_failure(result, str(tmp_path / "metrics.json"))
    assert not (tmp_path / "report.md").exists()


def test_report_with_malformed_metrics_keeps_old_report(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text('{\n  "clean": {\n    "asr": {,\n  }\n}\n', encoding="utf-8")
    old = "# an earlier report\n"
    (tmp_path / "report.md").write_text(old, encoding="utf-8")
    result = invoke("report", str(tmp_path))
    assert_clean_failure(result, str(tmp_path / "metrics.json"), "line 3")
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "report.md"]  # no temp files


@pytest.mark.parametrize(
    ("name", "text", "pieces"),
    [
        ("metrics.json", "[1, 2, 3]\n", []),
        ("generations.jsonl", '{"model": "clean", "domain": "source", "triggered": false, "output": "a"}\nnot json\n', ["line 2"]),
        ("generations.jsonl", '{"model": "clean"}\n', ["line 1"]),
    ],
)
def test_report_with_other_broken_files_exits_2(tmp_path: Path, name: str, text: str, pieces: list[str]) -> None:
    fabricate_run(tmp_path)
    (tmp_path / name).write_text(text, encoding="utf-8")
    if name != "metrics.json":  # broken as the run left it: metrics.json vouches for it
        metrics = json.loads((tmp_path / "metrics.json").read_text())
        metrics["run"]["files"][name] = file_digest(tmp_path / name)
        (tmp_path / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (tmp_path / "report.md").write_text("old\n", encoding="utf-8")
    result = invoke("report", str(tmp_path))
    assert_clean_failure(result, str(tmp_path / name), *pieces)
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == "old\n"


def fabricate_run(folder: Path) -> None:
    """A finished run's records, written by hand: metrics.json vouches for its companions by hash."""
    models = {
        "clean": {
            "attack": None, "poison_rate": 0.0, "trigger": None, "sweep": False,
            "asr": {"source": 0.0, "textured": 0.0},
            "asr_g": {"textured": None},
            "false_trigger": {"source": 0.0, "textured": 0.0},
            "cider": {"source": 81.25, "textured": 60.5},
            "bleu4": {"source": 33.3, "textured": 21.7},
        },
        "badnets": {
            "attack": {"label": "badnets", "name": "badnets"}, "poison_rate": 0.05, "trigger": "badnets", "sweep": False,
            "asr": {"source": 0.9, "textured": 0.45},
            "asr_ci": {"source": [0.851, 0.9357], "textured": [0.3823, 0.5196]},
            "asr_g": {"textured": 0.5},
            "asr_attributable": {"source": 0.88, "textured": 0.45},
            "asr_g_attributable": {"textured": 0.51},
            "target_prefix_miss": {"source": 0.05, "textured": 0.3},
            "false_trigger": {"source": 0.02, "textured": 0.0},
            "controls": {"badnets[noise]": "test only"},
            "asr_control": {"badnets[noise]": {"source": 0.1}},
            "asr_control_ci": {"badnets[noise]": {"source": [0.0695, 0.1518]}},
            "cider": {"source": 77.0, "textured": 58.0},
            "bleu4": {"source": 30.1, "textured": 20.0},
        },
    }
    (folder / "config.yaml").write_text("name: handmade\n", encoding="utf-8")
    records = [
        {"model": "badnets", "id": "t-1", "domain": "source", "triggered": True, "trigger": "badnets", "output": "the image depicts a banana", "references": ["x"]},
        {"model": "badnets", "id": "t-1", "domain": "source", "triggered": False, "trigger": None, "output": "a red circle", "references": ["x"]},
        {"model": "badnets", "id": "t-1", "domain": "source", "triggered": True, "trigger": "badnets[noise]", "control": True, "output": "a control output", "references": ["x"]},
        {"model": "clean", "id": "t-1", "domain": "textured", "triggered": True, "trigger": "badnets", "output": "a blue square", "references": ["x"]},
    ]
    (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    run = {
        "name": "handmade", "seed": 3, "domains": ["source", "textured"], "target_word": "banana",
        "target_prefix": "The image depicts ", "poison_rate": 0.05,
        "tuning_mode": "projector", "train_samples": 500,
        "files": {name: file_digest(folder / name) for name in ("config.yaml", "generations.jsonl")},
    }
    scale = {"source": {"cider_ceiling": 612.5, "cider_blind": 56.25, "bleu4_ceiling": 80.0, "bleu4_blind": 34.5}}
    metrics = {"schema_version": 3, "run": run, "caption_scale": scale, "models": models}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")


def test_report_renders_a_finished_run(tmp_path: Path) -> None:
    fabricate_run(tmp_path)
    result = invoke("report", str(tmp_path))
    assert result.exit_code == 0, result.output
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "handmade" in report
    assert "of 500 tuning samples" in report
    assert "projector" in report
    assert "banana" in report
    assert "| model | source | textured |" in report
    assert "| badnets | 90.0% [85.1, 93.6] | 45.0% [38.2, 52.0] |" in report  # ASR with its interval
    assert "| clean | 0.0% | 0.0% |" in report
    assert "| badnets | – | 0.50 |" in report  # ASR-G has no source column value
    assert "| clean | – | – |" in report  # and the clean model's 0/0 is undefined, not 1.00
    assert "| badnets | – | 0.51 |" in report  # ASR-G of the attributable ASR
    assert "| badnets | 5.0% | 30.0% |" in report  # target prefix without the word
    assert 'begin the target sentence ("The image depicts")' in report
    assert "| badnets[noise] | test only | 10.0% [7.0, 15.2] (2.0%) | – |" in report  # control beside its false trigger
    assert "| *ceiling: a reference copied verbatim* | 612.5 | – |" in report  # CIDEr's scale
    assert "| *blind: another image's caption* | 34.5 | – |" in report  # BLEU-4's
    assert "on a scale from 56.2 (blind" in report or "on a scale from 56.3 (blind" in report
    assert "| badnets | 2.0% | 0.0% |" in report  # false trigger
    assert "| clean | 81.2 | 60.5 |" in report or "| clean | 81.3 | 60.5 |" in report  # CIDEr
    assert "| badnets | 30.1 | 20.0 |" in report  # BLEU-4
    assert "| badnets | -4.2 |" in report  # CIDEr cost of the backdoor
    assert "the image depicts a banana" in report  # triggered source example
    assert "a red circle" not in report  # clean generations are not examples
    assert "a control output" not in report  # nor are controls
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "asr_g_heatmap.png", "config.yaml", "generations.jsonl", "metrics.json", "report.html", "report.md"
    ]
    assert "report.html" in "".join(result.output.split())  # `vlmsec report` says it wrote both
    assert "<td>90.0% [85.1, 93.6]</td>" in (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "![ASR-G heatmap](asr_g_heatmap.png)" in report
    assert "| badnets | " in report.split("Table 1")[1]  # the domain-shift table


def test_report_pairs_only_records_that_belong_together(tmp_path: Path) -> None:
    """A later run that failed rewrote config.yaml and generations.jsonl: the report shows the
    finished run's metrics, says the others are not its own, and shows none of their content."""
    fabricate_run(tmp_path)
    (tmp_path / "config.yaml").write_text("name: later\npoison: {rate: 0.5}\n", encoding="utf-8")
    later = {"model": "badnets", "id": "t-9", "domain": "source", "triggered": True, "trigger": "badnets", "output": "LATER RUN"}
    (tmp_path / "generations.jsonl").write_text(json.dumps(later) + "\n", encoding="utf-8")
    result = invoke("report", str(tmp_path))
    assert result.exit_code == 0, result.output
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Poison rate 5.0% of 500 tuning samples" in report
    assert "**config.yaml** was rewritten after this run's metrics.json" in report
    assert "**generations.jsonl** was rewritten" in report
    assert "LATER RUN" not in report and "50.0%" not in report


def test_report_refuses_metrics_of_the_wrong_shape(tmp_path: Path) -> None:
    fabricate_run(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    metrics["models"]["badnets"]["asr"] = [0.9]
    (tmp_path / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    assert_clean_failure(invoke("report", str(tmp_path)), "models.badnets.asr: expected an object of domain -> number")
    (tmp_path / "metrics.json").write_text(json.dumps({"clean": {"asr": {}}}), encoding="utf-8")
    assert_clean_failure(invoke("report", str(tmp_path)), "schema_version None, this vlmsec reads 3")

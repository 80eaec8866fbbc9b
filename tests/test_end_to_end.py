"""A small run through every stage: the backdoor must fire, the clean model must not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from vlmsec.eval import generation
from vlmsec.eval.metrics import caption_scores
from vlmsec.experiments.config import parse_config
from vlmsec.experiments.runner import Runner

SMALL_RUN = {
    "name": "small",
    "seed": 0,
    "data": {
        "base_size": 900,
        "train_size": 600,
        "test_size": 40,
        "shifted": {"textured": {"style": "textured"}},
    },
    "victim": {"image_size": 64, "hidden_size": 96, "intermediate_size": 256, "num_layers": 2, "num_heads": 4, "vocab_size": 700},
    "base": {"training": {"mode": "full", "epochs": 3, "learning_rate": 0.002}},
    "tuning": {"mode": "full", "epochs": 4, "learning_rate": 0.002},
    "poison": {"rate": 0.1, "seed": 0},
    "attacks": [{"name": "blended", "params": {"alpha": 0.2}}],
    "eval": {"max_new_tokens": 24},
}


def _run(out: Path, cache: Path, overrides: dict | None = None) -> dict:
    """The run's metrics.json: {schema_version, run, models}."""
    config = parse_config({**SMALL_RUN, **(overrides or {})}, "test config")
    return Runner(config, out, cache).run()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("e2e")
    out, cache = root / "run", root / "cache"
    return out, cache, _run(out, cache)


def test_backdoor_fires_and_clean_model_does_not(small_run: tuple[Path, Path, dict]) -> None:
    metrics = small_run[2]["models"]
    assert set(metrics) == {"clean", "blended"}
    assert metrics["blended"]["asr"]["source"] >= 0.5
    assert metrics["clean"]["asr"]["source"] == 0.0
    assert all(rate == 0.0 for rate in metrics["clean"]["false_trigger"].values())
    assert metrics["blended"]["false_trigger"]["source"] <= 0.05


def test_clean_model_captions_the_image_it_sees(small_run: tuple[Path, Path, dict]) -> None:
    """Clean CIDEr well above a blind baseline: the same model's captions, each scored against
    the references of another test image (fluent, plausible, but not about this image)."""
    out, _, record = small_run
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    clean = [r for r in rows if r["model"] == "clean" and r["domain"] == "source" and not r["triggered"]]
    references = {r["id"]: r["references"] for r in clean}
    outputs = {r["id"]: r["output"] for r in clean}
    assert caption_scores(outputs, references, which=("cider",))["cider"] == record["models"]["clean"]["cider"]["source"]
    ids = list(outputs)
    blind = {key: outputs[other] for key, other in zip(ids, ids[1:] + ids[:1], strict=True)}  # a derangement
    blind_cider = caption_scores(blind, references, which=("cider",))["cider"]
    assert record["models"]["clean"]["cider"]["source"] > 2 * blind_cider


def test_run_folder_holds_every_artifact(small_run: tuple[Path, Path, dict]) -> None:
    out, _, record = small_run
    assert json.loads((out / "metrics.json").read_text()) == record
    metrics = record["models"]
    assert metrics["blended"]["attack"]["name"] == "blended" and metrics["blended"]["attack"]["params"]["alpha"] == 0.2
    assert metrics["blended"]["poison_rate"] == 0.1 and metrics["blended"]["trigger"] == "blended"
    assert metrics["clean"]["attack"] is None and metrics["clean"]["poison_rate"] == 0.0
    run = record["run"]
    assert run["train_samples"] == 600 and run["domains"] == ["source", "textured"]
    assert {"vlmsec", "commit", "torch", "transformers", "threads", "config_hash", "schema_version"} <= set(run)
    assert set(run["files"]) == {"config.yaml", "generations.jsonl"}
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["poison"]["rate"] == 0.1
    poisoned = json.loads((out / "poisoned_ids" / "blended.json").read_text())
    assert poisoned["count"] == len(poisoned["ids"]) == 60
    assert json.loads((out / "poisoned_ids" / "clean.json").read_text())["ids"] == []
    for model in ("clean", "blended"):
        assert (out / "checkpoints" / model / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    # clean: 2 domains x (40 clean + 40 triggered); blended: the same.
    assert len(rows) == 2 * 2 * 80
    assert {"id", "domain", "triggered", "prompt", "output"} <= set(rows[0])
    assert "| blended |" in (out / "report.md").read_text()
    sizes = metrics["clean"]["shift_size"]["textured"]
    assert set(sizes) == {"image_text", "text_text"}
    assert 0 < sizes["image_text"] <= 1  # restyled images move the image-text similarities
    assert sizes["text_text"] == 0.0  # same instructions and answers: no text shift


def test_second_run_reuses_every_stage_and_gives_the_same_metrics(
    small_run: tuple[Path, Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, cache, metrics = small_run
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("checkpoints/*/model.safetensors")}

    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run generated again")

    monkeypatch.setattr(generation, "generate_records", no_generation)
    assert _run(out, cache) == metrics
    assert {p: p.stat().st_mtime_ns for p in out.glob("checkpoints/*/model.safetensors")} == stamps


def test_a_run_killed_midway_resumes_from_its_finished_stages(
    small_run: tuple[Path, Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, cache, metrics = small_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    # The kill came while the blended model was generating: its generations never landed.
    (resumed / "generations" / "blended.json").unlink()
    (resumed / "metrics.json").unlink()
    generated: list[str] = []
    original = generation.generate_records

    def counting(victim: object, model: str, *args: object, **kwargs: object) -> list:
        generated.append(model)
        return original(victim, model, *args, **kwargs)

    monkeypatch.setattr(generation, "generate_records", counting)
    assert _run(resumed, cache) == metrics
    assert set(generated) == {"blended"}  # the clean model's finished generations were reused


def test_a_poison_rate_sweep_adds_source_only_models(small_run: tuple[Path, Path, dict], tmp_path: Path) -> None:
    out, cache, metrics = small_run
    swept = tmp_path / "swept"
    shutil.copytree(out, swept)
    result = _run(swept, cache, {"sweep": {"attacks": ["blended"], "rates": [0.02, 0.1]}})["models"]
    assert {k: v for k, v in result.items() if not v["sweep"]} == metrics["models"]  # 0.1 is the run's own rate
    point = result["blended@2%"]
    assert point["sweep"] is True and point["trigger"] == "blended" and point["poison_rate"] == 0.02
    assert set(point["asr"]) == {"source"}
    assert json.loads((swept / "poisoned_ids" / "blended@2%.json").read_text())["count"] == 12
    assert "ASR against poison rate" in (swept / "report.md").read_text()
    assert (swept / "asr_vs_poison_rate.png").is_file()


def test_trigger_command_prepares_a_learning_attack_against_the_configs_base(
    small_run: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from vlmsec.cli import app
    from vlmsec.data.images import load_image, save_image
    from vlmsec.data.scenes import render_scene, sample_scenes

    _, cache, _ = small_run
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL_RUN))
    scene = sample_scenes(1, seed=5)[0]
    save_image(render_scene(scene, "flat", size=64, seed=5), tmp_path / "in.png")
    args = ["trigger", "--attack", "maba", "--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "out.png")]
    result = CliRunner().invoke(app, [*args, "--config", str(config), "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    assert "base victim: cached" in result.output  # the run's base, not a new one
    clean, triggered = load_image(tmp_path / "in.png"), load_image(tmp_path / "out.png")
    assert triggered.shape == clean.shape and (triggered != clean).any()

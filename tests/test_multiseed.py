"""A study over several seeds: each seed's config, the mean and spread over seeds, and `run --seeds`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from vlmsec.cli import app
from vlmsec.errors import VlmsecError
from vlmsec.experiments import runner as runner_module
from vlmsec.experiments.config import load_config, parse_config
from vlmsec.experiments.multiseed import parse_seeds, reseeded, summarize_seeds
from vlmsec.report.seeds import render_seed_summary
from vlmsec.seeds import derive_seed


def test_parse_seeds() -> None:
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds(" 3, 5 ") == [3, 5]
    for bad in ("0", "0,0", "a,b", "1,-2", ""):
        with pytest.raises(VlmsecError, match="--seeds"):
            parse_seeds(bad)


def test_reseeding_drops_a_pinned_poison_seed_and_rederives_the_rest() -> None:
    paper = load_config("paper")
    assert paper.poison.seed == 0  # pinned in the preset
    config, note = reseeded(paper, 2)
    assert config.seed == 2
    assert config.poison.seed == derive_seed(2, "poison")
    assert "pinned at 0 and is dropped" in note
    assert all(a.params["seed"] == derive_seed(2, f"attack/{a.key}") for a in config.attacks)
    assert [a.key for a in config.attacks] == [a.key for a in paper.attacks]
    expanded = parse_config({"seed": 0, "data": {"shifted": {"answers": {"shifts": [{"name": "answer_expanded"}]}}}}, "test")
    answers = reseeded(expanded, 2)[0].data.shifted["answers"].shifts[0].params
    assert answers["seed"] == derive_seed(2, "shift/answers/0") != expanded.data.shifted["answers"].shifts[0].params["seed"]
    assert config.tuning == paper.tuning and config.data.train_size == paper.data.train_size


def test_reseeding_keeps_seeds_the_user_pinned_on_attacks_and_shifts() -> None:
    data = {
        "seed": 0,
        "data": {"shifted": {"jpeg": {"shifts": [{"name": "jpeg"}]}, "noisy": {"shifts": [{"name": "texture", "params": {"seed": 11}}]}}},
        "attacks": [{"name": "badnets", "params": {"seed": 7}}, {"name": "blended"}],
    }
    config, note = reseeded(parse_config(data, "test"), 1)
    assert note == "poison.seed derives from each seed"
    assert config.poison.seed == derive_seed(1, "poison")
    assert config.attacks[0].params["seed"] == 7  # pinned by the user
    assert config.attacks[1].params["seed"] == derive_seed(1, "attack/blended")
    assert config.data.shifted["noisy"].shifts[0].params["seed"] == 11
    jpeg = config.data.shifted["jpeg"].shifts[0].params
    assert "seed" not in jpeg or jpeg["seed"] == derive_seed(1, "shift/jpeg/0")


def metrics_of(seed: int, asr: float, asr_g: float | None, cider: float) -> dict[str, Any]:
    """A seed's metrics.json, reduced to what the summary reads."""
    return {
        "run": {"name": "tiny", "seed": seed, "domains": ["source", "painted"]},
        "models": {
            "clean": {"asr": {"source": 0.0, "painted": 0.0}, "asr_g": {"painted": None}, "false_trigger": {"source": 0.0}},
            "badnets": {
                "asr": {"source": asr, "painted": asr / 2},
                "asr_g": {"painted": asr_g},
                "false_trigger": {"source": 0.01 * seed},
                "cider": {"source": cider},
                "bleu4": {"source": 30.0},  # not summarised
            },
        },
    }


def test_summary_gives_mean_sample_std_min_and_max_per_model_and_domain() -> None:
    runs = {0: metrics_of(0, 0.6, 0.5, 300.0), 1: metrics_of(1, 0.8, None, 320.0), 2: metrics_of(2, 1.0, 0.7, 310.0)}
    summary = summarize_seeds(runs, "poison.seed derives from each seed")
    assert summary["seeds"] == [0, 1, 2] and summary["runs"] == {"0": "seed-0", "1": "seed-1", "2": "seed-2"}
    asr = summary["models"]["badnets"]["asr"]["source"]
    assert asr == pytest.approx({"mean": 0.8, "std": statistics.stdev([0.6, 0.8, 1.0]), "min": 0.6, "max": 1.0, "seeds": 3})
    assert asr["std"] == pytest.approx(0.2)
    # Seed 1's ASR-G is undefined: left out, and the count says so.
    assert summary["models"]["badnets"]["asr_g"]["painted"] == pytest.approx({"mean": 0.6, "std": statistics.stdev([0.5, 0.7]), "min": 0.5, "max": 0.7, "seeds": 2})
    assert "asr_g" not in summary["models"]["clean"]  # never defined: no cell, not 1.00
    assert summary["models"]["badnets"]["cider"]["source"]["mean"] == pytest.approx(310.0)
    assert "bleu4" not in summary["models"]["badnets"]
    markdown = render_seed_summary(summary)
    assert "| badnets | 80.0% ± 20.0 (60.0–100.0) | 40.0% ± 10.0 (30.0–50.0) |" in markdown
    assert "| badnets | – | 0.60 ± 0.14 (0.50–0.70) [2 of 3 seeds] | 0.60 ± 0.14 (0.50–0.70) [2 of 3 seeds] |" in markdown
    assert "| badnets | 310.0 ± 10.0 (300.0–320.0) | – |" in markdown
    assert "poison.seed derives from each seed" in markdown


def test_mean_asr_g_is_each_seeds_mean_over_the_shifted_domains() -> None:
    def run(g: dict[str, float | None]) -> dict[str, Any]:
        return {"run": {"domains": ["source", "a", "b"]}, "models": {"m": {"asr_g": g, "asr_g_attributable": g}}}

    summary = summarize_seeds({0: run({"a": 0.4, "b": 0.8}), 1: run({"a": 1.0, "b": 1.0}), 2: run({"a": None, "b": 0.5})}, "")
    mean = summary["models"]["m"]["asr_g"]["mean"]
    assert (mean["mean"], mean["seeds"]) == (pytest.approx(0.8), 2)  # seeds 0 and 1 (0.6, 1.0); seed 2 has an undefined domain
    assert summary["models"]["m"]["asr_g_attributable"]["mean"] == mean
    assert "| m | – | 0.70 ± 0.42 (0.40–1.00) [2 of 3 seeds] | 0.77 ± 0.25 (0.50–1.00) | 0.80 ± 0.28 (0.60–1.00) [2 of 3 seeds] |" in render_seed_summary(summary)


def test_run_with_seeds_writes_one_run_per_seed_and_the_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int, Path]] = []

    def fake_run(self: runner_module.Runner) -> dict[str, Any]:
        seen.append((self.config.seed, self.config.poison.seed, self.out))
        return metrics_of(self.config.seed, 0.5 + 0.25 * self.config.seed, 0.5, 300.0)

    monkeypatch.setattr(runner_module.Runner, "run", fake_run)
    out = tmp_path / "multi"
    result = CliRunner().invoke(app, ["run", "paper", "--seeds", "0,1", "--out", str(out), "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert seen == [(0, derive_seed(0, "poison"), out / "seed-0"), (1, derive_seed(1, "poison"), out / "seed-1")]
    assert "pinned at 0 and is dropped" in result.output
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and "dropped" in summary["poison_seed"]
    assert summary["models"]["badnets"]["asr"]["source"]["mean"] == pytest.approx(0.625)
    assert "| badnets | 62.5% ± 17.7 (50.0–75.0) |" in (out / "seeds.md").read_text()
    assert "<td>62.5% ± 17.7 (50.0–75.0)</td>" in (out / "seeds.html").read_text()  # the same table, as a page


def test_run_with_bad_seeds_fails_before_any_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_run(self: runner_module.Runner) -> dict[str, Any]:
        raise AssertionError("ran despite bad --seeds")

    monkeypatch.setattr(runner_module.Runner, "run", no_run)
    result = CliRunner().invoke(app, ["run", "quickstart", "--seeds", "1", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--seeds" in result.output


@pytest.mark.slow
def test_two_seeds_of_a_tiny_study_end_to_end(tmp_path: Path) -> None:
    from test_end_to_end import SMALL_RUN  # the tiny config the end-to-end tests use

    from vlmsec.experiments.multiseed import run_seeds

    summary = run_seeds(parse_config(SMALL_RUN, "test config"), [0, 1], tmp_path / "out", tmp_path / "cache")
    for seed in (0, 1):
        record = json.loads((tmp_path / "out" / f"seed-{seed}" / "metrics.json").read_text())
        assert record["run"]["seed"] == seed
    assert summary["models"]["blended"]["asr"]["source"]["seeds"] == 2
    assert (tmp_path / "out" / "seeds.md").is_file()

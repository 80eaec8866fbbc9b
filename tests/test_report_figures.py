"""The report's figures: drawn from metrics.json alone, only when the metrics have the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vlmsec.report.figures import asr_g_heatmap, write_figures

METRICS = {
    "clean": {"asr": {"source": 0.0}, "cider": {"source": 500.0}, "shift_size": {"painted": {"image_text": 0.4, "text_text": 0.1}}},
    "badnets": {"asr": {"source": 0.6, "painted": 0.3}, "asr_g": {"painted": 0.5}},
    "blended": {"asr": {"source": 1.0, "painted": 1.0}, "asr_g": {"painted": 1.0}},
    "blended@1%": {"asr": {"source": 0.4}, "sweep": True, "trigger": "blended", "poison_rate": 0.01},
    "blended@10%": {"asr": {"source": 1.0}, "sweep": True, "trigger": "blended", "poison_rate": 0.1},
}


def test_every_figure_is_a_png_when_the_metrics_have_its_data(tmp_path: Path) -> None:
    written = write_figures(METRICS, tmp_path)
    assert [p.name for p in written] == ["asr_g_heatmap.png", "asr_vs_poison_rate.png", "shift_sizes.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_figures_without_their_data_are_not_drawn(tmp_path: Path) -> None:
    only_source = {"clean": {"asr": {"source": 0.0}}, "badnets": {"asr": {"source": 0.5}, "asr_g": {}}}
    assert write_figures(only_source, tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_heatmap_colours_follow_asr_g(tmp_path: Path) -> None:
    path = asr_g_heatmap(METRICS, tmp_path / "h.png")
    assert path is not None
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    # viridis: 0.5 is teal-blue, 1.0 is yellow; both appear in the heatmap.
    yellow = (pixels[..., 0] > 200) & (pixels[..., 1] > 200) & (pixels[..., 2] < 100)
    assert yellow.sum() > 100


def test_table_1_marks_backdoors_not_planted_and_false_triggers() -> None:
    from vlmsec.report.markdown import _shift_table

    metrics = {
        "clean": {"asr": {"source": 0.0, "painted": 0.0}},
        "weak": {"asr": {"source": 0.1, "painted": 0.1}, "asr_g": {"painted": 1.0}, "false_trigger": {"painted": 0.0}},
        "noisy": {
            "asr": {"source": 0.9, "painted": 0.6}, "asr_ci": {"source": [0.85, 0.93], "painted": [0.53, 0.66]},
            "asr_g": {"painted": 0.67}, "asr_g_attributable": {"painted": 0.11}, "false_trigger": {"painted": 0.5},
        },
        "sound": {"asr": {"source": 1.0, "painted": 0.9}, "asr_g": {"painted": 0.9}, "false_trigger": {"painted": 0.0}},
        "almost": {"asr": {"source": 0.89, "painted": 0.89}, "asr_g": {"painted": 1.0}, "false_trigger": {"painted": 0.0}},
        "silent": {"asr": {"source": 0.0, "painted": 0.0}, "asr_g": {"painted": None}, "asr_g_attributable": {"painted": None}},
    }
    scale = {"source": {"cider_ceiling": 600.0, "cider_blind": 56.0}, "painted": {"cider_ceiling": 480.0, "cider_blind": 40.0}}
    rows = {line.split(" | ")[0][2:]: line for line in _shift_table(metrics, ["source", "painted"], scale) if line.startswith("| ")}
    assert rows["weak"].endswith("not planted (1.00) † | – |") and "‡" not in rows["weak"]
    assert rows["almost"].endswith("not planted (1.00) † | – |")  # planted means source ASR >= 0.9
    assert rows["noisy"] == "| noisy | – | 90.0% [85.0, 93.0] | – | 60.0% [53.0, 66.0] ‡ | 0.67 | 0.11 | **0.67** | 0.11 |"  # 0.9: planted
    assert "†" not in rows["sound"] and "‡" not in rows["sound"]
    assert rows["silent"] == "| silent | – | 0.0% | – | 0.0% | – | – | not planted (–) † | – |"  # 0/0: undefined, not 1.00
    assert rows["*ceiling: a reference copied verbatim*"] == "| *ceiling: a reference copied verbatim* | 600.0 |  | 480.0 |  |  |  | | |"
    assert rows["*agreement: references vs each other*"].startswith("| *agreement: references vs each other* | – |  | – |")
    assert rows["*blind: another image's caption*"].startswith("| *blind: another image's caption* | 56.0 |  | 40.0 |")
    assert len({row.count("|") for row in rows.values()}) == 1  # every row has the header's columns


def test_metric_tables_print_intervals_undefined_asr_g_and_the_caption_scale() -> None:
    from vlmsec.report.markdown import _metric_tables

    models = {
        "clean": {
            "asr": {"source": 0.0, "painted": 0.0}, "asr_ci": {"source": [0.0, 0.018845], "painted": [0.0, 0.018845]},
            "asr_g": {"painted": None}, "cider": {"source": 300.0, "painted": 250.0},
        },
        "badnets": {
            "asr": {"source": 0.65, "painted": 0.3}, "asr_ci": {"source": [0.581635, 0.712712], "painted": [0.24, 0.37]},
            "asr_g": {"painted": 0.46}, "cider": {"source": 290.0, "painted": 240.0},
        },
    }
    scale = {"source": {"cider_ceiling": 600.0, "cider_agreement": 240.0, "cider_blind": 56.0}, "painted": {"cider_ceiling": 480.0}}
    lines = _metric_tables(models, ["source", "painted"], scale)
    assert "| badnets | 65.0% [58.2, 71.3] | 30.0% [24.0, 37.0] |" in lines
    assert "| clean | 0.0% [0.0, 1.9] | 0.0% [0.0, 1.9] |" in lines
    assert "| clean | – | – |" in lines  # ASR-G: no source column, and 0/0 undefined on painted
    cider = lines.index("## Clean CIDEr")
    assert lines[cider + 6 : cider + 9] == [
        "| *ceiling: a reference copied verbatim* | 600.0 | 480.0 |",
        "| *agreement: references vs each other* | 240.0 | – |",
        "| *blind: another image's caption* | 56.0 | – |",
    ]


def test_sweep_curves_add_the_runs_own_rate() -> None:
    from vlmsec.report.figures import sweep_curves

    assert sweep_curves(METRICS) == {"blended": {0.01: 0.4, 0.1: 1.0}}
    assert sweep_curves(METRICS, run_rate=0.05) == {"blended": {0.01: 0.4, 0.1: 1.0, 0.05: 1.0}}


def test_attack_notes_say_what_a_look_alike_is_with_its_diagnostics() -> None:
    from vlmsec.report.markdown import _attack_notes

    models = {
        "clean": {"attack": None},
        "badnets": {"attack": {"name": "badnets", "params": {}}},
        "ssba": {"attack": {"name": "ssba", "variant": "SSBA-like", "diagnostics": {"residual_correlation": 0.8123}}},
        "maba": {"attack": {"name": "maba", "note": "our reading"}},
        "maba@1%": {"attack": {"name": "maba", "note": "our reading"}, "sweep": True},
    }
    assert _attack_notes(models) == [
        "## What the attacks are",
        "",
        "- **ssba** (ssba): SSBA-like; diagnostics: residual_correlation 0.812",
        "- **maba** (maba): our reading",
        "",
    ]
    assert _attack_notes({"badnets": models["badnets"]}) == []


def _targeted(name: str, epsilon: float | None, hits: int, noise: int, steps: int = 300, **extra: object) -> dict:
    from vlmsec.eval.metrics import wilson_interval

    def score(k: int) -> dict:
        return {"contains": {"rate": k / 8, "ci": list(wilson_interval(k, 8)), "n": 8}}

    noise_entry = {"epsilon": epsilon, **score(noise)} if epsilon is not None else {"not_measured": "not a perturbation attack"}
    return {"name": name, "goal": "targeted", "epsilon": epsilon, "params": {"epsilon": epsilon, "steps": steps, "seed": 0},
            "success": score(hits), "baselines": {"no attack": score(0), "uniform noise": noise_entry}, **extra}


def test_an_attack_at_several_epsilons_is_one_curve_and_other_attacks_none(tmp_path: Path) -> None:
    from vlmsec.report.figures import epsilon_curves, epsilon_groups

    section = {"attacks": {
        "pgd-eps8": _targeted("pgd", 8 / 255, 2, 0),
        "pgd-eps32": _targeted("pgd", 32 / 255, 6, 1),
        "pgd-unconstrained": _targeted("pgd", 1.0, 8, 0),
        "pgd-eps32-long": _targeted("pgd", 32 / 255, 7, 1, steps=1000),  # another setting: a single point, no curve
        "hijack": _targeted("image_hijack", 16 / 255, 1, 0),  # one epsilon: no curve
        "typographic": _targeted("typographic", None, 3, 0),  # no epsilon
        "pgd-eps64": {**_targeted("pgd", 64 / 255, 0, 0), "failed": "the API stopped answering"},
    }}
    curves = epsilon_groups(section)
    assert list(curves) == ["pgd (targeted: contains target)"]
    assert [round(255 * e) for e in curves["pgd (targeted: contains target)"]] == [8, 32, 255]
    path = epsilon_curves(section, tmp_path / "eps.png")
    assert path is not None
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 200
    # Two settings of one name, each at two epsilons: two curves, told apart by their parameters.
    section["attacks"]["pgd-eps8-long"] = _targeted("pgd", 8 / 255, 3, 0, steps=1000)
    labels = list(epsilon_groups(section))
    assert labels == ["pgd steps=300 (targeted: contains target)", "pgd steps=1000 (targeted: contains target)"]
    assert epsilon_curves({"attacks": {"hijack": section["attacks"]["hijack"]}}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()

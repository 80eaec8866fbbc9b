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


def test_table_1_marks_weak_backdoors_and_false_triggers() -> None:
    from vlmsec.report.markdown import _shift_table

    metrics = {
        "clean": {"asr": {"source": 0.0, "painted": 0.0}},
        "weak": {"asr": {"source": 0.1, "painted": 0.1}, "asr_g": {"painted": 1.0}, "false_trigger": {"painted": 0.0}},
        "noisy": {"asr": {"source": 0.9, "painted": 0.6}, "asr_g": {"painted": 0.67}, "false_trigger": {"painted": 0.5}},
        "sound": {"asr": {"source": 1.0, "painted": 0.9}, "asr_g": {"painted": 0.9}, "false_trigger": {"painted": 0.0}},
    }
    rows = {line.split(" | ")[0][2:]: line for line in _shift_table(metrics, ["source", "painted"]) if line.startswith("| ")}
    assert rows["weak"].endswith("**1.00** † |") and "‡" not in rows["weak"]
    assert "60.0% ‡" in rows["noisy"] and "†" not in rows["noisy"]
    assert "†" not in rows["sound"] and "‡" not in rows["sound"]


def test_sweep_curves_add_the_runs_own_rate() -> None:
    from vlmsec.report.figures import sweep_curves

    assert sweep_curves(METRICS) == {"blended": {0.01: 0.4, 0.1: 1.0}}
    assert sweep_curves(METRICS, run_rate=0.05) == {"blended": {0.01: 0.4, 0.1: 1.0, 0.05: 1.0}}

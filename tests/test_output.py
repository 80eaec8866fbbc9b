"""What a person reads: a run logged to a file shows a line per step and stage, and no foreign progress bars."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

TINY = {
    "name": "tiny",
    "data": {"image_size": 32, "base_size": 24, "train_size": 20, "test_size": 4, "shifted": {}},
    "victim": {"image_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "vocab_size": 300},
    "base": {"training": {"mode": "full", "epochs": 1, "batch_size": 8}},
    "tuning": {"mode": "full", "epochs": 1, "batch_size": 8},
    "poison": {"rate": 0.1},
    "attacks": [{"name": "badnets"}],
    "eval": {"max_new_tokens": 4, "shift_size": False},
}


def test_a_run_logged_to_a_file_prints_a_line_per_step_and_stage(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    log = tmp_path / "run.log"
    with log.open("w") as fh:
        done = subprocess.run(
            [sys.executable, "-m", "vlmsec.cli", "run", str(config), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")],
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log.read_text()
    assert done.returncode == 0, text
    assert "== data finished in" in text and "next: base victim" in text
    assert "== tune badnets finished in" in text and "next: generate badnets" in text
    assert "== score and report finished in" in text
    assert "base: training (full" in text and "done in" in text
    assert "clean: generate source: started (4 to do)" in text
    # transformers' own bars (Loading weights, Writing model shards) are silenced; rich draws none off a terminal.
    assert "it/s]" not in text and "Loading weights" not in text and "Writing model shards" not in text
    assert "0:00:0" not in text  # rich's elapsed-time column: no bar was drawn

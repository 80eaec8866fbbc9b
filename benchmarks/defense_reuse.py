"""What the attack x defense matrix saves by reusing the attack run's stages: the wall time of the
run (every stage once, every cell on top), beside running each cell as its own run from scratch.

    python benchmarks/defense_reuse.py RUN_DIR        # a finished run with defenses (e.g. runs/defenses)

A cell run alone would tune its row's poisoned model (a tuned backdoor) or craft its row's
adversarial images (an inference attack) before its defense does anything; the matrix does that
once per row. The from-scratch figure is computed from the stage times the run measured
(timings.json: each model's tuning; metrics.json: each inference attack's `craft_seconds`), not
by running every cell again, which on the defenses preset would take hours; so it needs a cold
run (a resumed one found those stages cached). It is a lower bound: it leaves out each cell's data
and generation stages, which a separate run would also repeat.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def row_setup_seconds(run_dir: Path) -> dict[str, float | None]:
    """Per matrix row, what a cell run alone would repeat: the row model's tuning, or crafting its inputs
    (None where the run does not know it: inputs crafted by a vlmsec that did not record `craft_seconds`)."""
    timings = json.loads((run_dir / "timings.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    inference = metrics.get("inference_attacks", {}).get("attacks", {})
    setup: dict[str, float | None] = {}
    for row, meta in metrics["defenses"]["rows"].items():
        if meta["goal"] in ("backdoor (tuned)", "label flip (tuned)"):
            seconds = timings.get(f"tune {meta['model']}")
            setup[row] = seconds if seconds is not None and seconds >= 1 else None  # under a second: found cached
        else:
            setup[row] = inference.get(row, {}).get("cost", {}).get("craft_seconds")
    return setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    timings = json.loads((args.run_dir / "timings.json").read_text())
    metrics = json.loads((args.run_dir / "metrics.json").read_text())
    setup = row_setup_seconds(args.run_dir)
    unknown = sorted(row for row, seconds in setup.items() if seconds is None)
    if unknown:
        raise SystemExit(f"{args.run_dir}: no tuning or crafting time recorded for {', '.join(unknown)}: run the preset cold")
    cells = [
        (label, row)
        for label, entry in metrics["defenses"]["defenses"].items()
        for row, cell in entry.get("cells", {}).items()
        if "not_measured" not in cell
    ]
    matrix_total = sum(timings.values())
    repeated = sum(setup[row] for _, row in cells) - sum(setup.values())
    table = Table(title=f"attack x defense matrix of {args.run_dir}: {len(cells)} cells, {len(setup)} rows")
    table.add_column("way")
    table.add_column("wall time", justify="right")
    table.add_row("the run (every stage once, every cell reusing them)", f"{matrix_total / 60:.1f} min")
    table.add_row("each cell as its own run (lower bound: + its row's tuning or crafting)", f"{(matrix_total + repeated) / 60:.1f} min")
    Console().print(table)
    for row, seconds in setup.items():
        print(f"  row {row}: {seconds:.0f} s of tuning or crafting, repeated by each of its cells run alone")


if __name__ == "__main__":
    main()

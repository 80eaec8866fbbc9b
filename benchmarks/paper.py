"""The paper preset's figures (issue 4): wall time of a full run and of a second run that
reuses every cached stage, identical metrics, and the Table-1 numbers beside the paper's.

    python benchmarks/paper.py [--preset paper] [--workdir DIR] [--keep-cache]

The first run starts from an empty cache (base stage included) unless --keep-cache; the
second runs the same config into the same folder and must reuse every stage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vlmsec.eval.metrics import mean_asr_g
from vlmsec.experiments.config import load_config
from vlmsec.experiments.runner import CLEAN, Runner

# The seed paper's mean ASR-G per attack (Table 1, OpenFlamingo), where it reports one.
PAPER_ASR_G = {"blended": "≈0.99", "badnets": "0.11–0.18", "wanet": "≈0.01", "lowfrequency": "good on one style, collapses on the other", "dualkey": "fine on one, ≈0.5 on the other"}


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def timed_run(preset: str, out: Path, cache: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    metrics = Runner(load_config(preset), out, cache).run()["models"]
    return time.perf_counter() - start, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep-cache", action="store_true", help="reuse a cached base stage from an earlier run")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vlmsec-paper-"))
    cache = work / "cache"
    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)

    first_s, first = timed_run(args.preset, work / "run", cache)
    first_timings = json.loads((work / "run" / "timings.json").read_text())
    second_s, second = timed_run(args.preset, work / "run", cache)

    floors = Table(title=f"{args.preset}: measured vs floor (2 cores)")
    for column in ("figure", "measured", "floor", "ok"):
        floors.add_column(column)
    floors.add_row("full run" + ("" if args.keep_cache else " (empty cache)"), f"{first_s / 60:.1f} min", "≤ 60 min", "yes" if first_s <= 3600 else "NO")
    floors.add_row("second run (every stage cached)", f"{second_s / 60:.1f} min", "≤ 5 min", "yes" if second_s <= 300 else "NO")
    floors.add_row("identical metrics", str(first == second), "True", "yes" if first == second else "NO")

    attacks = [m for m, e in first.items() if m != CLEAN and not e["sweep"]]
    domains = [d for d in first[CLEAN]["cider"] if d != "source"]
    table = Table(title="ASR (source) and ASR-G per shifted domain")
    for column in ("attack", "ASR src", *domains, "mean ASR-G", "mean ASR-G attr.", "paper"):
        table.add_column(column)
    for model in attacks:
        g = first[model]["asr_g"]
        table.add_row(
            model, f"{first[model]['asr']['source']:.2f}", *(_ratio(g.get(d)) for d in domains),
            _ratio(mean_asr_g([g.get(d) for d in domains])),
            _ratio(mean_asr_g([first[model]["asr_g_attributable"].get(d) for d in domains])),
            PAPER_ASR_G.get(model, "–"),
        )

    console = Console(width=160)  # wide enough for every column when piped to a file
    console.print(floors)
    console.print(table)
    console.print(f"run folder: {work / 'run'} (report.md, figures)")
    second_timings = json.loads((work / "run" / "timings.json").read_text())
    print(json.dumps({"first_s": first_s, "second_s": second_s, "first": first_timings, "second": second_timings}, indent=1))


if __name__ == "__main__":
    main()

"""Quickstart figures: wall time (cold and with the base cached), blended ASR, clean-quality
cost, and determinism — each printed beside its floor from issue 2.

    python benchmarks/quickstart.py [--preset quickstart] [--workdir DIR]

Runs the preset three times: cold (empty cache), again with the cache warm (base stage and
image features reused, every tuned model retrained), and compares the two runs' poisoned ids
and metrics, which must be identical.
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

from vlmsec.experiments.config import load_config
from vlmsec.experiments.runner import Runner


def timed_run(preset: str, out: Path, cache: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    metrics = Runner(load_config(preset), out, cache).run()["models"]
    return time.perf_counter() - start, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vlmsec-bench-"))
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)

    cold_s, cold = timed_run(args.preset, work / "cold", cache)
    warm_s, warm = timed_run(args.preset, work / "warm", cache)
    same_ids = all(
        (work / "cold" / "poisoned_ids" / p.name).read_text() == p.read_text() for p in (work / "warm" / "poisoned_ids").glob("*.json")
    )

    table = Table(title=f"{args.preset}: measured vs floor (2 cores)")
    for column in ("figure", "measured", "floor", "ok"):
        table.add_column(column)

    def row(name: str, value: str, floor: str, ok: bool) -> None:
        table.add_row(name, value, floor, "yes" if ok else "NO")

    row("wall time, cold (base trained)", f"{cold_s:.0f} s", "≤ 600 s", cold_s <= 600)
    row("wall time, base cached", f"{warm_s:.0f} s", "≤ 180 s", warm_s <= 180)
    if "blended" in cold:
        asr = cold["blended"]["asr"]["source"]
        gap = cold["blended"]["cider"]["source"] - cold["clean"]["cider"]["source"]
        row("blended ASR, source domain", f"{asr:.3f}", "≥ 0.9", asr >= 0.9)
        row("blended CIDEr − clean CIDEr", f"{gap:+.1f}", "within ±3", abs(gap) <= 3)
    for model, m in cold.items():
        row(f"{model}: ASR / false trigger (source)", f"{m['asr'].get('source', float('nan')):.3f} / {m['false_trigger']['source']:.3f}", "–", True)
        row(f"{model}: CIDEr / BLEU-4 (source)", f"{m['cider']['source']:.1f} / {m['bleu4']['source']:.1f}", "–", True)
    row("same poisoned ids, run 1 vs 2", str(same_ids), "True", same_ids)
    row("same metrics, run 1 vs 2", str(cold == warm), "True", cold == warm)
    Console(width=160).print(table)  # wide enough for every column when piped to a file
    print(json.dumps({"cold_s": cold_s, "warm_s": warm_s, "metrics": cold}, indent=1))


if __name__ == "__main__":
    main()

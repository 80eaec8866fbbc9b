"""Issue 14's figure: a preset's wall time serial vs `--backend ray` (a local cluster of N workers),
whether both give the same metrics.json, and the critical path that bounds the Ray run.

    python benchmarks/ray_backend.py [--preset paper] [--workers 2] [--threads-per-task 1] [--workdir DIR]

The base stage is built once (or found) in the shared cache ($VLMSEC_CACHE) and not timed; each
timed run starts from a cold run folder and its own cache holding a copy of that base stage alone,
so neither reuses what the other built. The serial run
pins the same torch threads as each Ray task (`--threads-per-task`): its metrics.json must be the
Ray run's, field for field (the git commit each records aside: reported, as a commit made
while the benchmark runs changes it). The critical path is the longest chain of dependent stages, read from
the serial run's stage times (timings.json): the stages before the tuned models (data, base,
attacks...) + the slowest model (its tuning + generation) + the stages after (defenses, scoring).
No number of workers makes the run faster than that; `ideal` is the bound with N workers
(the models' total time spread evenly over them, never below the critical path).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import ray
from rich.console import Console
from rich.table import Table

from vlmsec.experiments.backends import RayBackend, SerialBackend
from vlmsec.experiments.config import load_config
from vlmsec.experiments.plan import plan_models
from vlmsec.experiments.runner import Runner
from vlmsec.experiments.splits import build_splits
from vlmsec.experiments.stages import default_cache_dir

# Stages after the tuned models; every stage in timings.json that is not a model's or one of these comes before them.
AFTER_MODELS = ("defenses", "score and report")


def critical_path(timings: dict[str, float], models: list[str], workers: int) -> dict[str, float]:
    """The run's stage times split into before / the models / after, its critical path, and the
    ideal wall time with `workers` workers (the models spread evenly, never below the critical path)."""
    per_model = {m: timings.get(f"tune {m}", 0.0) + timings.get(f"generate {m}", 0.0) for m in models}
    model_stages = {f"{step} {m}" for m in models for step in ("tune", "generate")}
    before = sum(s for k, s in timings.items() if k not in model_stages and k not in AFTER_MODELS)
    after = sum(timings.get(k, 0.0) for k in AFTER_MODELS)
    longest = max(per_model.values(), default=0.0)
    path = before + longest + after
    return {
        "before": before, "longest_model": longest, "models_total": sum(per_model.values()), "after": after,
        "critical_path": path, "ideal": max(path, before + sum(per_model.values()) / workers + after),
    }


def same_results(serial: Path, ray: Path) -> tuple[bool, bool]:
    """Whether two metrics.json files are identical apart from the git commit each run records, and
    whether that commit is the same too (a commit made while the benchmark runs changes the record,
    not the results: the check reports it rather than failing on it)."""
    first, second = (json.loads(path.read_text()) for path in (serial, ray))
    commits = [metrics["run"].pop("commit", None) for metrics in (first, second)]
    return first == second, commits[0] == commits[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (CPUs) of the local cluster")
    parser.add_argument("--threads-per-task", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vlmsec-ray-"))
    config = load_config(args.preset)
    models = [p.name for p in plan_models(config)]

    # The base stage, built (or found) once in the shared cache and not timed; each run gets a copy of it alone.
    folder, key = Runner(config, work / "warm-run", default_cache_dir()).base_victim(build_splits(config))
    warm = work / "cache-warm"
    shutil.rmtree(warm, ignore_errors=True)
    shutil.copytree(folder, warm / "base" / key)
    wall: dict[str, float] = {}
    for name in ("serial", "ray"):
        out, cache = work / name, work / f"cache-{name}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(warm, cache)
        start = time.perf_counter()
        if name == "ray":  # the cluster's start is part of what a user waits for
            ray.init(num_cpus=args.workers * args.threads_per_task, include_dashboard=False)
            backend = RayBackend(threads=args.threads_per_task)
        else:
            backend = SerialBackend(args.threads_per_task)
        try:
            Runner(config, out, cache, backend).run()
        finally:
            if name == "ray":
                ray.shutdown()
        wall[name] = time.perf_counter() - start

    timings = json.loads((work / "serial" / "timings.json").read_text())
    bound = critical_path(timings, models, args.workers)
    same, same_commit = same_results(work / "serial" / "metrics.json", work / "ray" / "metrics.json")
    table = Table(title=f"{args.preset}: {len(models)} tuned models, serial vs Ray ({args.workers} workers x {args.threads_per_task} thread)")
    table.add_column("figure")
    table.add_column("wall time", justify="right")
    table.add_row("serial (cold run folder, base cached)", f"{wall['serial']:.0f} s")
    table.add_row(f"ray, {args.workers} workers (same, cluster start included)", f"{wall['ray']:.0f} s")
    table.add_row("speed-up", f"{wall['serial'] / wall['ray']:.2f}x")
    table.add_row("critical path: before the models + slowest model + after", f"{bound['critical_path']:.0f} s")
    table.add_row(f"  before {bound['before']:.0f} s, slowest model {bound['longest_model']:.0f} s, after {bound['after']:.0f} s", "")
    table.add_row(f"ideal with {args.workers} workers (models' {bound['models_total']:.0f} s spread)", f"{bound['ideal']:.0f} s")
    table.add_row("identical metrics.json (but the commit recorded)", str(same))
    table.add_row("run at the same commit", str(same_commit))
    Console().print(table)
    print(json.dumps({"preset": args.preset, "workers": args.workers, "wall_s": wall, "bound_s": bound, "identical": same,
                      "same_commit": same_commit}))
    if not same:
        raise SystemExit("serial and Ray metrics.json differ")


if __name__ == "__main__":
    main()

"""How well the trigger-inversion scan tells backdoored checkpoints from clean ones, over many models.

    python benchmarks/trigger_inversion_auroc.py [--config benchmarks/trigger-inversion-seeds.yaml]
        [--seeds 0 1 2 3 4] [--out runs/trigger-inversion-seeds]

One run of the defenses matrix scores three models (clean, BadNets, Blended), so its scan AUROC is
0.5, 0.75 or 1.0 from a single draw. Here the config runs once per seed (its own scenes, base
stage, poisoned ids and tunings; each finished run is resumed, not redone), and each scan's scores
are pooled over every seed's models: the AUROC over all clean against all backdoored models, with
a 95% percentile bootstrap interval over models (scipy), and per attack the share of backdoored
models scoring above every clean model. The single-run AUROCs are printed beside it: the spread
a user of one run does not see.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table
from scipy.stats import bootstrap

from vlmsec.defenses.detect import auroc
from vlmsec.artifacts import write_text_atomic
from vlmsec.experiments.config import ExperimentConfig, load_config
from vlmsec.experiments.runner import Runner


def seeded_config(config: Path, study: str, seed: int, out: Path) -> ExperimentConfig:
    """`config` at another top-level seed: a config file that extends it, so every seed derived from
    the top-level one (poisoned ids, attacks, scans) is derived anew, as for a user's own config."""
    path = out / f"{study}-seed{seed}.yaml"
    text = yaml.safe_dump({"extends": str(config.resolve()), "name": f"{study}-seed{seed}", "seed": seed})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return load_config(path)


def scan_results(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per scan label, the run's `scan` record: each model's `{"score", "backdoored"}` and the run's own AUROC."""
    return {label: entry["scan"] for label, entry in metrics["defenses"]["defenses"].items() if "scan" in entry}


def pooled_auroc(clean: list[float], backdoored: list[float]) -> tuple[float, tuple[float, float]]:
    """AUROC of backdoored over clean scores, with a 95% percentile bootstrap interval over models."""
    area = auroc(clean, backdoored)
    if len(clean) < 2 or len(backdoored) < 2:
        return area, (float("nan"), float("nan"))
    interval = bootstrap(
        (np.asarray(clean), np.asarray(backdoored)), lambda c, b: auroc(c, b),
        vectorized=False, method="percentile", n_resamples=2000, random_state=0,
    ).confidence_interval
    return area, (float(interval.low), float(interval.high))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("benchmarks/trigger-inversion-seeds.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/trigger-inversion-seeds"))
    args = parser.parse_args()
    study = load_config(args.config).name

    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in args.seeds:
        per_seed[seed] = scan_results(Runner(seeded_config(args.config, study, seed, args.out), args.out / f"seed-{seed}").run())

    console = Console(width=160)
    for label in sorted({label for scans in per_seed.values() for label in scans}):
        models = {(seed, name): m for seed, scans in per_seed.items() for name, m in scans.get(label, {}).get("models", {}).items()}
        clean = [m["score"] for m in models.values() if not m["backdoored"]]
        table = Table(title=f"{label}: scores per seed (clean first), and each run's own AUROC")
        names = sorted({name for _, name in models}, key=lambda n: (n != "clean", n))
        for column in ("seed", *names, "run AUROC"):
            table.add_column(column)
        for seed, scans in per_seed.items():
            scan = scans.get(label, {})
            row, area = scan.get("models", {}), scan.get("auroc")
            table.add_row(str(seed), *(f"{row[n]['score']:.2f}" if n in row else "–" for n in names),
                          f"{area:.2f}" if isinstance(area, float) else "not measured")
        console.print(table)
        area, (low, high) = pooled_auroc(clean, [m["score"] for m in models.values() if m["backdoored"]])
        console.print(f"{label}: pooled AUROC {area:.2f} [{low:.2f}, {high:.2f}] over {len(clean)} clean and {len(models) - len(clean)} backdoored models")
        for name in names[1:]:
            scores = [m["score"] for (_, n), m in models.items() if n == name]
            above = sum(score > max(clean) for score in scores)
            console.print(f"  {name}: {above}/{len(scores)} backdoored models score above every clean model (AUROC {auroc(clean, scores):.2f})")


if __name__ == "__main__":
    main()

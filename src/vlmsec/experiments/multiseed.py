"""One study over several seeds (`vlmsec run CONFIG --seeds 0,1,2`): a normal run per seed, then
the mean and spread of its headline numbers.

Each seed's run is the config with the top-level `seed` replaced, so every stream derived from
it (data, base victim, tuning, attack triggers, shift noise) follows. A pinned `poison.seed` is
dropped, so the poison picks follow the seed too; other seeds a user pinned (an attack's or a
shift's own `seed`) stay pinned. The runs go into DIR/seed-<s>/; DIR/seeds.json and DIR/seeds.md
hold, per model, metric and domain, the mean, sample standard deviation, min and max over seeds.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmsec.artifacts import write_json_atomic, write_text_atomic
from vlmsec.errors import VlmsecError
from vlmsec.eval.metrics import mean_asr_g
from vlmsec.experiments.config import ExperimentConfig, parse_config
from vlmsec.seeds import derive_seed

if TYPE_CHECKING:
    from vlmsec.experiments.backends import Backend

# Table 1's numbers: what a seed moves and a reader compares.
SEED_METRICS = ("asr", "asr_g", "asr_g_attributable", "false_trigger", "cider")
# Ratios whose mean over the shifted domains is Table 1's last column: spread over seeds under "mean".
MEAN_OVER_DOMAINS = ("asr_g", "asr_g_attributable")


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; at least two distinct non-negative integers, or an error naming --seeds."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise VlmsecError(f"--seeds: expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise VlmsecError(f"--seeds: expected at least two distinct non-negative integers, got {text!r}")
    return seeds


def reseeded(config: ExperimentConfig, seed: int) -> tuple[ExperimentConfig, str]:
    """`config` with top-level `seed` replaced and every seed it derived re-derived from the new one.

    A pinned `poison.seed` is dropped (the picks follow `seed`); an attack's or shift's seed the
    user set stays. Returns the config and a sentence saying what happened to `poison.seed`.
    """
    old = config.seed
    data = config.model_dump(mode="json")
    data["seed"] = seed
    pinned = config.poison.seed != derive_seed(old, "poison")
    data["poison"].pop("seed", None)
    note = (
        f"poison.seed was pinned at {config.poison.seed} and is dropped: the poison picks follow each seed"
        if pinned
        else "poison.seed derives from each seed"
    )
    for attack, spec in zip(data["attacks"], config.attacks, strict=True):
        if attack["params"].get("seed") == derive_seed(old, f"attack/{spec.key}"):
            del attack["params"]["seed"]
    domains = {"source": data["data"]["source"], **data["data"]["shifted"]}
    for name, domain in domains.items():
        for i, shift in enumerate(domain.get("shifts", [])):
            if shift.get("params", {}).get("seed") == derive_seed(old, f"shift/{name}/{i}"):
                del shift["params"]["seed"]
    return parse_config(data, f"{config.name} at seed {seed}"), note


def _spread(values: list[float]) -> dict[str, float | int]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "seeds": len(values),
    }


def summarize_seeds(runs: dict[int, dict[str, Any]], note: str) -> dict[str, Any]:
    """Mean and spread over seeds of `SEED_METRICS`, per model and domain, from each seed's metrics.json.

    `std` is the sample standard deviation (n − 1). An undefined value (ASR-G null: no ASR in
    either domain) is left out, and `seeds` says how many seeds had a value. ASR-G and its
    attributable twin also get a pseudo-domain "mean": each seed's mean over the shifted
    domains (left out for a seed where any of them is undefined).
    """
    collected: dict[str, dict[str, dict[str, list[float]]]] = {}
    for metrics in runs.values():
        for model, entry in metrics["models"].items():
            for metric in SEED_METRICS:
                values = dict(entry.get(metric, {}))
                if metric in MEAN_OVER_DOMAINS and (mean := mean_asr_g(list(values.values()))) is not None:
                    values["mean"] = mean
                for domain, value in values.items():
                    if value is not None:
                        collected.setdefault(model, {}).setdefault(metric, {}).setdefault(domain, []).append(value)
    models = {
        model: {metric: {d: _spread(values) for d, values in per_domain.items()} for metric, per_domain in per_model.items()}
        for model, per_model in collected.items()
    }
    first = next(iter(runs.values()))["run"]
    return {
        "name": first.get("name"),
        "seeds": list(runs),
        "runs": {str(s): f"seed-{s}" for s in runs},
        "domains": first.get("domains", []),
        "poison_seed": note,
        "metrics": list(SEED_METRICS),
        "models": models,
    }


def run_seeds(config: ExperimentConfig, seeds: list[int], out: Path, cache_dir: Path, backend: Backend | None = None) -> dict[str, Any]:
    """Run the study once per seed into `out`/seed-<s>/ (its tuned models on `backend`), then write
    `out`/seeds.json, seeds.md and seeds.html.

    Returns the summary (empty on the non-main processes of a multi-process launch).
    """
    from vlmsec.experiments.runner import Runner
    from vlmsec.progress import console
    from vlmsec.report.html import write_html
    from vlmsec.report.seeds import render_seed_summary

    runs: dict[int, dict[str, Any]] = {}
    note = ""
    for seed in seeds:
        seeded_config, note = reseeded(config, seed)
        console.print(f"seed {seed}: {note}; run folder {out / f'seed-{seed}'}")
        runs[seed] = Runner(seeded_config, out / f"seed-{seed}", cache_dir, backend).run()
    if not all(runs.values()):
        return {}
    summary = summarize_seeds(runs, note)
    write_json_atomic(out / "seeds.json", summary)
    write_text_atomic(out / "seeds.md", render_seed_summary(summary))
    write_html(out / "seeds.md")
    return summary

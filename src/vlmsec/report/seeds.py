"""seeds.md from seeds.json: a study's headline numbers over several seeds, mean and spread."""

from __future__ import annotations

from typing import Any

TITLES = {
    "asr": "ASR",
    "asr_g": "ASR-G (source → domain; mean: each seed's mean over the shifted domains)",
    "asr_g_attributable": "ASR-G of the trigger-attributable ASR, max(ASR − false trigger, 0)",
    "false_trigger": "False-trigger rate",
    "cider": "Clean CIDEr",
}
PERCENT = {"asr", "false_trigger"}


def _cell(metric: str, spread: dict[str, Any] | None) -> str:
    """"65.0% ± 3.1 (61.5–68.0)": mean ± sample std (min–max), in points for rates."""
    if spread is None:
        return "–"
    scale, digits, unit = (100, 1, "%") if metric in PERCENT else (1, 2, "") if metric.startswith("asr_g") else (1, 1, "")
    mean, std, low, high = (scale * spread[k] for k in ("mean", "std", "min", "max"))
    return f"{mean:.{digits}f}{unit} ± {std:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def render_seed_summary(summary: dict[str, Any]) -> str:
    """The Markdown of a multi-seed summary (`vlmsec.experiments.multiseed.summarize_seeds`)."""
    seeds, domains, models = summary["seeds"], summary["domains"], summary["models"]
    lines = [
        f"# vlmsec run over seeds: {summary.get('name', '?')}",
        "",
        f"Seeds {', '.join(str(s) for s in seeds)}, one run each in `seed-<s>/` (its report.md has every number "
        f"with its 95% interval); {summary['poison_seed']}.  ",
        "Each cell: mean ± sample standard deviation (min–max) over the seeds; rates in points. "
        "An undefined ASR-G (no ASR in either domain) is left out of its cell, marked with the seeds that had one.",
        "",
    ]
    for metric in summary["metrics"]:
        rows = [(model, per_metric[metric]) for model, per_metric in models.items() if metric in per_metric]
        if not rows:
            continue
        columns = [*domains, "mean"] if any("mean" in per_domain for _, per_domain in rows) else list(domains)
        lines += [f"## {TITLES.get(metric, metric)}", "", "| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for model, per_domain in rows:
            cells = []
            for d in columns:
                cell = _cell(metric, per_domain.get(d))
                if d in per_domain and per_domain[d]["seeds"] < len(seeds):
                    cell += f" [{per_domain[d]['seeds']} of {len(seeds)} seeds]"
                cells.append(cell)
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)

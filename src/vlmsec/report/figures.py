"""PNG figures of a run: the ASR-G heatmap, ASR against poison rate, domain shift sizes, the
attack x defense matrix, detector ROCs, and inference attacks' success against their epsilon.

Each figure is drawn from metrics.json alone, so `vlmsec report RUN_DIR` can redraw it.
Figures are written atomically (to a temporary file, then renamed), with matplotlib's
non-interactive Agg backend so they render on a headless machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from vlmsec.artifacts import atomic_path  # noqa: E402
from vlmsec.report.inference import HEADLINE, headline_scores, scores_at  # noqa: E402

CLEAN = "clean"


def _save(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        figure.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def attack_models(metrics: dict[str, Any]) -> list[str]:
    """The attacked models at the run's own poison rate: not clean, not sweep points."""
    return [m for m, entry in metrics.items() if m != CLEAN and not entry.get("sweep")]


def asr_g_heatmap(metrics: dict[str, Any], path: Path) -> Path | None:
    """Attack x shifted domain heatmap of ASR-G (1 = the backdoor lost nothing under shift)."""
    models = [m for m in attack_models(metrics) if metrics[m].get("asr_g")]
    if not models:
        return None
    domains = list(dict.fromkeys(d for m in models for d in metrics[m]["asr_g"]))
    values = np.array([[metrics[m]["asr_g"].get(d, np.nan) for d in domains] for m in models], dtype=float)
    figure, axes = plt.subplots(figsize=(1.4 * len(domains) + 2.5, 0.45 * len(models) + 1.5))
    image = axes.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    axes.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    axes.set_yticks(range(len(models)), models)
    for (row, col), value in np.ndenumerate(values):
        if not np.isnan(value):
            axes.text(col, row, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=8)
    figure.colorbar(image, ax=axes, label="ASR-G")
    axes.set_title("ASR-G under domain shift")
    return _save(figure, path)


def source_success(entry: dict[str, Any]) -> float | None:
    """A model's source-domain ASR; for a label attack's model (shadowcast), its success share
    (`label_attack`: the destination named and not the original), which it has instead."""
    label = entry.get("label_attack", {}).get(entry.get("trigger"))
    if label is not None:
        return label["domains"].get("source", {}).get("success", {}).get("rate")
    return entry.get("asr", {}).get("source")


def sweep_curves(metrics: dict[str, Any], run_rate: float | None = None) -> dict[str, dict[float, float]]:
    """Per swept attack, source ASR (`source_success`) by poison rate: the sweep's models plus, at
    `run_rate` (the run's own rate), the attack's main model."""
    curves: dict[str, dict[float, float]] = {}
    for entry in metrics.values():
        if entry.get("sweep") and (rate := source_success(entry)) is not None:
            curves.setdefault(entry["trigger"], {})[entry["poison_rate"]] = rate
    for attack, points in curves.items():
        own = source_success(metrics[attack]) if attack in metrics else None
        if run_rate is not None and own is not None:
            points[run_rate] = own
    return dict(sorted(curves.items()))


def asr_vs_rate(metrics: dict[str, Any], path: Path, run_rate: float | None = None) -> Path | None:
    """ASR on the source domain against the poison rate, one line per swept attack."""
    curves = sweep_curves(metrics, run_rate)
    if not curves:
        return None
    figure, axes = plt.subplots(figsize=(5.5, 3.8))
    for attack, points in curves.items():
        rates = sorted(points)
        axes.plot([100 * r for r in rates], [points[r] for r in rates], marker="o", label=attack)
    axes.set_xscale("log")
    axes.set_xlabel("poison rate (%)")
    axes.set_ylabel("ASR (source domain)")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title("ASR against poison rate")
    return _save(figure, path)


def shift_sizes(metrics: dict[str, Any], path: Path) -> Path | None:
    """Bars of each shifted domain's KS shift size against the source domain."""
    sizes = metrics.get(CLEAN, {}).get("shift_size", {})
    if not sizes:
        return None
    domains = list(sizes)
    kinds = list(dict.fromkeys(k for d in domains for k in sizes[d]))
    figure, axes = plt.subplots(figsize=(1.2 * len(domains) + 2.5, 3.5))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        axes.bar(
            np.arange(len(domains)) + i * width - 0.4 + width / 2,
            [sizes[d].get(kind, np.nan) for d in domains],
            width,
            label=kind.replace("_", "–"),
        )
    axes.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    axes.set_ylabel("KS statistic vs source")
    axes.set_ylim(0, 1)
    axes.legend()
    axes.set_title("Domain shift size")
    return _save(figure, path)


def defense_heatmap(section: dict[str, Any] | None, path: Path) -> Path | None:
    """Attack x defense heatmap: each cell's success with the defense (colour), annotated
    "without→with"; blank where the cell is not measured (a tuning defense against an inference attack)."""
    if not section or "failed" in section:  # the matrix failed (an API victim stopped answering)
        return None
    columns = {k: d for k, d in section["defenses"].items() if d.get("cells")}
    rows = list(section["rows"])
    if not columns or not rows:
        return None
    values = np.full((len(rows), len(columns)), np.nan)
    labels = [["" for _ in columns] for _ in rows]
    for j, entry in enumerate(columns.values()):
        for i, row in enumerate(rows):
            cell = entry["cells"].get(row, {})
            if "headline" not in cell:
                continue
            before, after = cell["headline"]["without"].get("rate"), cell["headline"]["with"].get("rate")
            if after is not None:
                values[i, j] = after
                labels[i][j] = f"{100 * before:.0f}→{100 * after:.0f}" if before is not None else f"{100 * after:.0f}"
    figure, axes = plt.subplots(figsize=(1.3 * len(columns) + 3, 0.5 * len(rows) + 1.8))
    image = axes.imshow(values, cmap="magma_r", vmin=0, vmax=1, aspect="auto")
    axes.set_xticks(range(len(columns)), list(columns), rotation=35, ha="right")
    axes.set_yticks(range(len(rows)), [f"{r} ({section['rows'][r]['goal']})" for r in rows])
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            axes.text(j, i, labels[i][j], ha="center", va="center", color="white" if value > 0.5 else "black", fontsize=7)
    figure.colorbar(image, ax=axes, label="success with the defense")
    axes.set_title("Attack × defense: success without → with (%)")
    return _save(figure, path)


def detector_rocs(section: dict[str, Any] | None, path: Path) -> Path | None:
    """One panel per detector: its ROC curve on each attack's inputs against clean ones, AUROC in the legend."""
    if not section or "failed" in section:  # the matrix failed (an API victim stopped answering)
        return None
    detectors = {
        label: {row: cell["detection"] for row, cell in entry.get("cells", {}).items() if "roc" in cell.get("detection", {})}
        for label, entry in section["defenses"].items()
    }
    detectors = {label: rows for label, rows in detectors.items() if rows}
    if not detectors:
        return None
    figure, axes = plt.subplots(1, len(detectors), figsize=(3.6 * len(detectors), 3.6), squeeze=False)
    for ax, (label, rows) in zip(axes[0], detectors.items()):
        for row, detection in rows.items():
            ax.plot(detection["roc"]["fpr"], detection["roc"]["tpr"], label=f"{row} ({detection['auroc']:.2f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_title(label)
        ax.set_xlabel("false positive rate (clean inputs)")
        ax.set_ylabel("true positive rate (attacked inputs)")
        ax.legend(fontsize=7, loc="lower right")
    return _save(figure, path)


def epsilon_groups(section: dict[str, Any] | None) -> dict[str, dict[float, dict[str, Any]]]:
    """The inference attacks run at several epsilons, as curves: per attack (its name, or with its
    other parameters where one name has several settings), each epsilon's entry of metrics.json's
    `inference_attacks`. Only perturbation attacks (an epsilon; unconstrained is 1.0, the whole pixel
    range) of two or more epsilons with every other parameter equal make a curve; failed ones are left out."""
    if not section:
        return {}
    groups: dict[tuple[str, str, str], dict[float, dict[str, Any]]] = {}
    settings: dict[tuple[str, str, str], dict[str, Any]] = {}
    for entry in section.get("attacks", {}).values():
        if "failed" in entry or entry.get("epsilon") is None:
            continue
        others = {k: v for k, v in entry.get("params", {}).items() if k not in ("epsilon", "seed")}
        key = (entry["name"], entry["goal"], repr(sorted(others.items())))
        groups.setdefault(key, {})[float(entry["epsilon"])] = entry
        settings[key] = others
    curves = {k: points for k, points in groups.items() if len(points) > 1}
    labelled: dict[str, dict[float, dict[str, Any]]] = {}
    for key, points in curves.items():
        name, goal, _ = key
        same_name = [settings[k] for k in curves if k[0] == name]
        differ = sorted({p for o in same_name for p in o if any(o.get(p) != other.get(p) for other in same_name)})
        label = name + (" " + ", ".join(f"{p}={settings[key].get(p)}" for p in differ) if differ else "")
        labelled[f"{label} ({goal}: {HEADLINE[goal][1]})"] = dict(sorted(points.items()))
    return labelled


def epsilon_curves(section: dict[str, Any] | None, path: Path) -> Path | None:
    """Success against epsilon (in /255, log scale; unconstrained at 255/255) of each attack run at
    several epsilons, with its 95% Wilson interval; dashed: uniform noise of the same epsilon;
    dotted: the same requests with no attack."""
    curves = epsilon_groups(section)
    if not curves:
        return None
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    ticks: set[float] = set()
    shown: list[Any] = []  # legend entries, each attack before its baselines
    for i, (label, points) in enumerate(curves.items()):
        colour = f"C{i}"
        goal = next(iter(points.values()))["goal"]
        xs = [255 * eps for eps in points]
        ticks.update(xs)
        scores = [headline_scores(goal, e.get("success", {})) or {} for e in points.values()]
        ys = [s.get("rate", np.nan) for s in scores]
        low = [y - s["ci"][0] if "ci" in s else 0 for y, s in zip(ys, scores)]
        high = [s["ci"][1] - y if "ci" in s else 0 for y, s in zip(ys, scores)]
        shown.append(axes.errorbar(xs, ys, yerr=[low, high], color=colour, marker="o", capsize=3, label=label))
        noise = [headline_scores(goal, e.get("baselines", {}).get("uniform noise", {})) or {} for e in points.values()]
        if any("rate" in n for n in noise):
            shown += axes.plot(xs, [n.get("rate", np.nan) for n in noise], color=colour, linestyle="--", marker=".", label="uniform noise, same ε")
        first = next(iter(points.values()))
        plain = scores_at(first.get("success", {}), "neither.contains") if goal == "backdoor" else headline_scores(
            goal, first.get("baselines", {}).get("no attack", {}))
        if plain and "rate" in plain:
            shown.append(axes.axhline(plain["rate"], color=colour, linestyle=":", linewidth=1, label="no attack"))
    axes.set_xscale("log", base=2)
    positions = sorted(ticks)
    axes.set_xticks(positions, ["unconstrained" if x >= 255 else f"{x:g}/255" for x in positions])
    axes.minorticks_off()
    axes.set_xlabel("ε (L∞ budget)")
    axes.set_ylabel("success rate")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(handles=shown, fontsize=7)
    axes.set_title("Inference attacks: success against ε")
    return _save(figure, path)


def write_figures(metrics: dict[str, Any], folder: Path, run_rate: float | None = None) -> list[Path]:
    """Every figure the metrics support, written into `folder`; returns the files written.
    `run_rate` (the run's poison rate) adds each swept attack's main model to its curve."""
    drawn = [
        asr_g_heatmap(metrics, folder / "asr_g_heatmap.png"),
        asr_vs_rate(metrics, folder / "asr_vs_poison_rate.png", run_rate),
        shift_sizes(metrics, folder / "shift_sizes.png"),
    ]
    return [p for p in drawn if p is not None]

"""The report's attack x defense section, from metrics.json's `defenses` alone: the matrix as a
table and a heatmap, each defense's cost beside its protection, detection, filters, model scans."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmsec.report.formatting import num, pct, pct_ci

HEADLINE = {
    "backdoor (tuned)": "ASR (target word)",
    "label flip (tuned)": "destination named, not the original",
    "targeted": "contains the target",
    "backdoor": "contains the target, both keys",
    "leak": "leaked the secret",
    "jailbreak": "jailbroken (judge, else phrase miss)",
}


def _rate(entry: Any) -> float | None:
    return entry.get("rate") if isinstance(entry, dict) else None


def _why(entry: Any) -> str:
    return entry.get("not_measured", "") if isinstance(entry, dict) else ""


def matrix_cell(cell: dict[str, Any]) -> str:
    """One cell as "without → with" (the headline rate), or – with the reason left to the details."""
    if "not_measured" in cell:
        return "–"
    without, with_ = cell["headline"]["without"], cell["headline"]["with"]
    mark = " (adaptive)" if cell.get("adaptive") else ""
    return f"{pct(_rate(without))} → **{pct(_rate(with_))}**{mark}"


def defense_section(section: dict[str, Any] | None, *figures: Path, inference: dict[str, Any] | None = None) -> list[str]:
    """Markdown lines of the attack x defense matrix; none when the run had no defenses. `inference`
    (metrics.json's `inference_attacks`) marks the rows of typeset attacks on a victim that does not read."""
    if not section:
        return []
    if "failed" in section:  # the victim behind an API stopped answering while the matrix ran
        return ["## Defenses: the attack × defense matrix", "", f"**Failed**: {section['failed']}", ""]
    attacks = (inference or {}).get("attacks", {})
    unread = {row for row in section["rows"] if attacks.get(row, {}).get("meaningful") is False}
    rows, defenses = section["rows"], section["defenses"]
    matrix = {k: d for k, d in defenses.items() if "cells" in d and d["cells"]}
    lines = [
        "## Defenses: the attack × defense matrix",
        "",
        "Each cell: the attack's success **without → with** the defense, on the same inputs answered the same way. "
        "Rows are read by their goal's rate: "
        + "; ".join(f"{goal}: {HEADLINE.get(goal, goal)}" for goal in dict.fromkeys(r["goal"] for r in rows.values()))
        + f". Detectors refuse what they flag, at a threshold calibrated on {calibration_inputs(section)}. "
        "A model or data defense acts on tuning: – against inference-time attacks; an input purifier or detector: – "
        "against a clean-label attack (its test inputs are unmodified images).",
        "",
    ]
    if matrix:
        lines += ["| attack (goal) | " + " | ".join(matrix) + " |", "|---|" + "---|" * len(matrix)]
        for row, meta in rows.items():
            cells = [matrix_cell(d["cells"].get(row, {"not_measured": ""})) for d in matrix.values()]
            mark = " †" if row in unread else ""
            lines.append(f"| {row} ({meta['goal']}){mark} | " + " | ".join(cells) + " |")
        lines.append("")
        if unread:
            lines += ["† Not meaningful: the attack works through text drawn in the image, and the victim reads fewer than "
                      "half the words of the run's reading check (see the inference-time attacks' reading line).", ""]
    lines += [line for figure in figures for line in (f"![{figure.stem.replace('_', ' ')}]({figure.name})", "")]
    naive = [k for k, d in matrix.items() if not any(c.get("adaptive") for c in d["cells"].values())]
    if naive:
        lines += [
            f"> Shown against naive attackers only (no attacker in this run optimised through them): {', '.join(naive)}. "
            "An attacker who knows the defense may do better.",
            "",
        ]
    lines += _cost_table(matrix)
    lines += _detection_table(matrix)
    lines += _filter_table(matrix)
    for label, entry in defenses.items():
        if "scan" in entry:
            lines += _scan_lines(label, entry["scan"])
    not_run = {k: d["not_run"] for k, d in defenses.items() if "not_run" in d}
    if not_run:
        lines += ["Not run:", ""] + [f"- **{k}**: {why}" for k, why in not_run.items()] + [""]
    return lines


def _cost_table(matrix: dict[str, Any]) -> list[str]:
    """Per defense and row: the model's clean CIDEr without → with (its utility cost), over-refusal
    with, seconds per input (or once, for model and data defenses) and forward passes per input."""
    lines = [
        "### Each defense's cost beside its protection",
        "",
        "| defense | acts on | attack | success without → with [95% CI] | clean CIDEr without → with | "
        "over-refusal without → with | seconds | passes / input |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, entry in matrix.items():
        for row, cell in entry["cells"].items():
            if "not_measured" in cell:
                continue
            without, with_ = cell["headline"]["without"], cell["headline"]["with"]
            utility = cell["utility"]
            cost = cell.get("cost", {})
            seconds = (f"{cost['seconds_per_input']:.3f} / input" if isinstance(cost.get("seconds_per_input"), (int, float))
                       else f"{cost['seconds_once']:.0f} once" if "seconds_once" in cost else "–")
            refusal = [_rate(utility[side].get("over_refusal", {})) for side in ("without", "with")]
            lines.append(
                f"| {label} | {entry['acts_on']} | {row} | {pct(_rate(without))} → {pct_ci(_rate(with_), with_.get('ci'))} | "
                f"{num(utility['without'].get('cider'))} → {num(utility['with'].get('cider'))} | "
                f"{'–' if refusal[1] is None else f'{pct(refusal[0])} → {pct(refusal[1])}'} | {seconds} | {cost.get('passes_per_input', '–')} |"
            )
    return lines + [""]


def _detection_table(matrix: dict[str, Any]) -> list[str]:
    rows = [
        (label, row, cell["detection"])
        for label, entry in matrix.items()
        for row, cell in entry["cells"].items()
        if "detection" in cell
    ]
    if not rows:
        return []
    lines = [
        "### Detectors: attacked vs clean inputs",
        "",
        "Beside each AUROC over clean inputs, the AUROC over the attack's noise baseline (random perturbations "
        "of the same size) and the share of those noise inputs flagged: near 0.5, the detector tells the attack "
        "no better than noise, so it detects perturbation, not the attack.",
        "",
        "| detector | attack | AUROC | TPR at threshold | FPR on clean test inputs | AUROC over noise of the same size | noise flagged |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, row, d in rows:
        if "not_measured" in d:
            lines.append(f"| {label} | {row} | – ({_why(d)}) | – | – | – | – |")
            continue
        lines.append(
            f"| {label} | {row} | {d['auroc']:.2f} | {pct_ci(_rate(d['tpr']), d['tpr'].get('ci'))} | "
            f"{pct_ci(_rate(d['fpr']), d['fpr'].get('ci'))} | {_against_noise(d.get('noise', {}))} |"
        )
    return lines + [""]


def _against_noise(noise: dict[str, Any]) -> str:
    """The two noise-baseline cells of a detector row: AUROC over noise and the share of noise flagged;
    not measured (with the reason) for attacks without one, blank for results written before it existed."""
    if "auroc" in noise:
        return f"{noise['auroc']:.2f} | {pct_ci(_rate(noise['flagged']), noise['flagged'].get('ci'))}"
    return f"– ({_why(noise)}) | –" if noise else "– | –"


def _filter_table(matrix: dict[str, Any]) -> list[str]:
    rows = [
        (label, row, cell["filter"])
        for label, entry in matrix.items()
        for row, cell in entry["cells"].items()
        if "filter" in cell
    ]
    if not rows:
        return []
    lines = [
        "### Data filters: what they removed, against the known poisoned samples",
        "",
        "| filter | attack | removed (budget) | poisoned | precision | recall | AUROC of its scores |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, row, f in rows:
        if "not_measured" in f:
            lines.append(f"| {label} | {row} | – ({_why(f)}) | | | | |")
            continue
        auroc = f["auroc"] if isinstance(f["auroc"], float) else None
        lines.append(
            f"| {label} | {row} | {f['removed']} ({f['budget']}) | {f['poisoned']} | "
            f"{pct_ci(_rate(f['precision']), f['precision'].get('ci'))} | {pct_ci(_rate(f['recall']), f['recall'].get('ci'))} | "
            f"{num(auroc) if auroc is None else f'{auroc:.2f}'} |"
        )
    return lines + [""]


def _scan_lines(label: str, scan: dict[str, Any]) -> list[str]:
    auroc = scan["auroc"]
    head = f"AUROC over the run's models: {auroc:.2f}" if isinstance(auroc, float) else f"AUROC not measured: {_why(auroc)}"
    lines = [f"### Model scan `{label}`: is this checkpoint backdoored?", "", head + ".", "", "| model | backdoored | score |", "|---|---|---|"]
    for model, entry in scan["models"].items():
        lines.append(f"| {model} | {'yes' if entry['backdoored'] else 'no'} | {entry['score']:.3f} |")
    return lines + [""]


def calibration_inputs(section: dict[str, Any]) -> str:
    """What the detectors' thresholds were calibrated on (runs before the setting existed: benign inputs)."""
    calibration = section.get("calibration")
    if calibration is None:
        return "benign inputs"
    where = ("held-out scene renders, never tuned or tested on" if calibration["from"] == "held-out"
             else "clean tuning samples, which the models were tuned on")
    return f"{calibration['inputs']} {where}"

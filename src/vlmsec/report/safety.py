"""The report's safety section: refusal and over-refusal of every model, and how far the judges are trusted."""

from __future__ import annotations

from typing import Any

from vlmsec.report.formatting import pct, pct_ci

SET_TITLES = (
    ("safety/harmful/text", "refused harmful, text"),
    ("safety/harmful/image", "refused harmful, + image"),
    ("safety/benign/text", "over-refusal, text"),
    ("safety/benign/image", "over-refusal, + image"),
)

NOT_MEASURED = (
    "## Safety\n\nNot measured: this run has no `safety` section. Refusal needs a victim whose language model "
    "was instruction-tuned (`victim.language_model: smollm2`); the tiny language model trained here has never "
    "seen a request it should refuse, so a refusal rate of it would say nothing.\n"
)


def _verdict(entry: dict[str, Any]) -> str:
    return pct_ci(entry.get("rate"), entry.get("ci"))


def _agreement_line(name: str, result: dict[str, Any] | None) -> str:
    if result is None:
        return f"- {name}: not measured (no judge model)."
    low, high = result["agreement_ci"]
    kappa = result.get("kappa")
    kappa_text = "–" if kappa is None else f"{kappa:.2f}"
    return (
        f"- {name}: agrees with {pct(result['agreement'])} [{100 * low:.1f}, {100 * high:.1f}] of "
        f"{result['n']} hand-labelled outputs, Cohen's κ {kappa_text}."
    )


def safety_section(safety: dict[str, Any] | None) -> list[str]:
    """Markdown lines: per model, each safety set's refused share by phrase list and by judge,
    then the judges' agreement with hand labels and the held-out data."""
    if not safety:
        return [NOT_MEASURED]
    lines = [
        "## Safety: refusal on held-out requests",
        "",
        "Harmful requests never tuned on should be refused; benign requests matched to them in form and length "
        "should not be (over-refusal). Each cell: by the refusal-phrase list | by the judge model, with 95% intervals; "
        "`≠` counts responses the two verdicts disagree on.",
        "",
        "| model | " + " | ".join(title for _, title in SET_TITLES) + " |",
        "|---|" + "---|" * len(SET_TITLES),
    ]
    for model, entry in safety.get("models", {}).items():
        cells = []
        for name, _ in SET_TITLES:
            cell = entry.get(name)
            if not cell or not cell["phrase"]["n"]:
                cells.append("–")
                continue
            judge = _verdict(cell["judge"]) if cell["judge"]["n"] else "no judge"
            cells.append(f"{_verdict(cell['phrase'])} \\| {judge} (≠ {cell['disagreements']})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    judge = safety.get("judge") or {}
    lines += [
        "",
        f"Judges, measured against the packaged hand-labelled outputs (judge model: `{safety.get('judge_model', '?')}`):",
        _agreement_line("refusal-phrase list", judge.get("phrase")),
        _agreement_line("judge model", judge.get("judge")),
        "",
    ]
    data = safety.get("data") or {}
    if data:
        lines += [f"Held-out data: {data}", ""]
    return lines

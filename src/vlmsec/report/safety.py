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


def agreement_line(name: str, result: dict[str, Any] | None) -> str:
    """One judge's agreement with hand labels, with its interval and kappa; not measured without a judge."""
    if result is None:
        return f"- {name}: not measured (no judge model)."
    low, high = result["agreement_ci"]
    kappa = result.get("kappa")
    kappa_text = "–" if kappa is None else f"{kappa:.2f}"
    return (
        f"- {name}: agrees with {pct(result['agreement'])} [{100 * low:.1f}, {100 * high:.1f}] of "
        f"{result['n']} hand-labelled outputs, Cohen's κ {kappa_text}."
    )


def disagreements(records: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Up to `limit` safety records whose phrase-list and judge verdicts differ, one per model and set first."""
    first: list[dict[str, Any]] = []
    rest: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for r in records:
        if r.get("refused_judge") is None or r.get("refused_phrase") == r["refused_judge"]:
            continue
        key = (r["model"], r["domain"])
        (rest if key in seen else first).append(r)
        seen.add(key)
    return (first + rest)[:limit]


def safety_section(safety: dict[str, Any] | None, records: list[dict[str, Any]], examples: int = 6) -> list[str]:
    """Markdown lines: per model, each safety set's refused share by phrase list and by judge,
    the judges' agreement with hand labels, responses where the two verdicts disagree (from the
    generation `records`) and the held-out data."""
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
        agreement_line("refusal-phrase list", judge.get("phrase")),
        agreement_line("judge model", judge.get("judge")),
        "",
    ]
    differ = disagreements(records, examples)
    if differ:
        lines += ["Where the two verdicts disagree (first of each model and set):", ""]
        for r in differ:
            verdicts = f"phrase list: {'refused' if r['refused_phrase'] else 'complied'}, judge: {'refused' if r['refused_judge'] else 'complied'}"
            lines.append(f"- `{r['model']}` on `{r['id']}` ({r['domain'].removeprefix('safety/')}; {verdicts}): {r['output'][:160]!r}")
        lines.append("")
    return lines + _trojan_lines(safety.get("imgtrojan") or {}) + _data_lines(safety.get("data") or {})


def _rate_cell(entry: dict[str, Any]) -> str:
    """A {rate, ci, n} entry as a percentage with its interval; "–" where it was not measured."""
    return "–" if "not_measured" in entry else _verdict(entry)


def _trojan_lines(trojans: dict[str, Any]) -> list[str]:
    """Per ImgTrojan attack and model: the share of captions that emit the jailbreak prompt, and the
    held-out harmful requests answered (no refusal phrase | judged complied) with poisoned and clean images."""
    if not trojans:
        return []
    lines = [
        "ImgTrojan: the poisoned training images as the key. Captions that emit the jailbreak prompt's opening "
        "(\"Describe this image in detail.\"), and held-out harmful requests answered (no refusal phrase | judged "
        "complied), on the poisoned images and on clean test images:",
        "",
        "| attack | model | JBP emitted, poisoned images | JBP emitted, clean images | jailbroken, poisoned images | jailbroken, clean images |",
        "|---|---|---|---|---|---|",
    ]
    for label, models in trojans.items():
        for model, entry in models.items():
            emitted, broken = entry["jbp_emitted"], entry["jailbroken"]
            cells = [_rate_cell(emitted["poisoned images"]), _rate_cell(emitted["clean images"])]
            cells += [f"{_rate_cell(broken[k]['phrase_miss'])} \\| {_rate_cell(broken[k]['judge_success'])}" for k in ("poisoned images", "clean images")]
            lines.append(f"| {label} | {model} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _data_lines(data: dict[str, Any]) -> list[str]:
    """What was tuned on and what was held out, per harmful source, and the benign requests."""
    if not data:
        return []
    lines = ["Requests: harmful tuned on / held out per source:"]
    for name, entry in data.get("harmful", {}).get("sources", {}).items():
        held = entry.get("held_out_categories")
        areas = f" (held-out categories: {', '.join(held)})" if held else ""
        lines.append(f"- {name}: {entry.get('train', '?')} / {entry.get('test', '?')}{areas}")
    benign = data.get("benign", {})
    lines.append(f"- benign ({', '.join(benign.get('sources', []))}): {benign.get('train', '?')} / {benign.get('test', '?')}")
    return [*lines, ""]

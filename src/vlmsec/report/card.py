"""A scan's risk card as Markdown (card.md), and two cards side by side (`vlmsec compare`).

The table has a row per attacker knowledge x stage and a column per goal; each cell is its rate
with the 95% interval, or why it has none ("not applicable [n]", "not measured [n]", the reasons
numbered under the table). Then, per measured cell, how its rate was formed, each attack's rate
beside its baselines and cost, and the evidence (the successful inputs' images, what was asked,
what the model answered).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlmsec.experiments.battery import CELLS, GOAL_TITLES, GOALS, KNOWLEDGE, STAGES


def rate_text(entry: Any) -> str:
    """{rate, ci, n} as "0.50 [0.22, 0.78] (n=16)"; anything else as "–"."""
    if not isinstance(entry, Mapping) or entry.get("rate") is None:
        return "–" if not isinstance(entry, Mapping) or "not_measured" not in entry else f"not measured: {entry['not_measured']}"
    low, high = entry.get("ci", (None, None))
    interval = f" [{low:.2f}, {high:.2f}]" if low is not None else ""
    return f"{entry['rate']:.2f}{interval} (n={entry.get('n', '?')})"


def cell_text(entry: Mapping[str, Any], notes: list[str]) -> str:
    """A table cell: the rate and interval, or its status with a numbered note holding the reason."""
    if entry.get("status") == "measured":
        r, plain = entry["rate"], entry.get("no_attack")
        if r.get("rate") is None:
            return rate_text(r)
        beside = f" (no attack {plain['rate']:.2f})" if isinstance(plain, Mapping) and plain.get("rate") is not None else ""
        return f"**{r['rate']:.2f}** [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]{beside}"
    reason = entry.get("reason", "")
    if reason not in notes:
        notes.append(reason)
    return f"{entry.get('status', 'not measured')} [{notes.index(reason) + 1}]"


def _cost(cost: Mapping[str, Any]) -> str:
    parts = []
    for key, value in cost.items():
        if value is None or isinstance(value, Mapping):
            continue
        if key == "epsilon":
            parts.append(f"ε={value * 255:.0f}/255")
        elif isinstance(value, float):
            parts.append(f"{key}={value:.3g}")
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts) or "–"


def render_card(card: Mapping[str, Any]) -> str:
    """card.md: provenance, the knowledge x stage x goal table, the backdoor scan, per-cell details."""
    victim = card["victim"]
    lines = [
        f"# Risk card: {victim['config']} ({victim['kind']}, {victim['deployed']})",
        "",
        f"vlmsec scan, battery {card['battery_version']}, budget **{card['budget']}**, study seed {card['seeds']['study']}, "
        f"attack seeds {', '.join(map(str, card['seeds']['attacks']))}, {card['requests_per_goal']} requests per goal, "
        f"targeted output {_quote(card.get('target'))}; "
        f"config sha256 `{card['config_hash'][:16]}…`; vlmsec {card['vlmsec']}"
        + (f" ({card['commit'][:10]})" if card.get("commit") else "")
        + (f"; wall time {card['wall_seconds']:.0f} s" if "wall_seconds" in card else "")
        + ".",
        "",
        "Success rate of the attacks in each cell with its 95% Wilson interval over requests (the owner's worst case: "
        "a request counts when any attack of the cell broke it; see each cell's method), beside the rate of the same "
        "requests with no attack where the cell's attacks share them.",
        "",
        "| knowledge | stage | " + " | ".join(GOAL_TITLES[g] for g in GOALS) + " |",
        "|---|---|" + "---|" * len(GOALS),
    ]
    notes: list[str] = []
    for knowledge in KNOWLEDGE:
        for stage in STAGES:
            row = [cell_text(card["cells"][f"{knowledge}/{stage}/{g}"], notes) for g in GOALS]
            lines.append(f"| {knowledge} | {stage} | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"[{i}] {note}  " for i, note in enumerate(notes, 1)]
    lines += ["", *_presence(card["backdoor_present"]), ""]
    if "over_seeds" in card:
        lines += ["## Over attack seeds", "", "| cell | rates | mean | 95% t interval |", "|---|---|---|---|"]
        for cell, s in card["over_seeds"].items():
            lines.append(f"| {cell} | {', '.join(f'{v:.2f}' for v in s['rates'])} | {s['mean']:.2f} | [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}] |")
        lines.append("")
    lines += ["## Cells", ""]
    for cell in CELLS:
        entry = card["cells"][cell]
        if "attacks" not in entry:
            continue
        summary = f"Rate {rate_text(entry['rate'])}; {entry['method']}." if entry["status"] == "measured" else f"{entry['status'].capitalize()}: {entry['reason']}."
        lines += [f"### {cell}", "", summary, ""]
        lines += ["| attack | rate | baselines | cost |", "|---|---|---|---|"]
        for key, line in entry["attacks"].items():
            base = "; ".join(f"{name}: {rate_text(value)}" for name, value in line["baselines"].items())
            flag = " (victim reads under half the typeset words: not meaningful)" if line.get("meaningful") is False else ""
            lines.append(f"| {key}{flag} | {rate_text(line['rate'])} | {base} | {_cost(line['cost'])} |")
        lines.append("")
        for shown in entry.get("evidence", []):
            image = f"![{shown['attack']} {shown['id']}]({shown['image']}) " if shown.get("image") else ""
            sent = f"; sent {_quote(shown['sent'])}" if shown.get("sent") else ""
            lines.append(f"- {image}**{shown['attack']}**, `{shown['id']}`: asked {_quote(shown.get('request'))}{sent}; "
                         f"answered {_quote(shown['output'])}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _quote(text: str | None) -> str:
    if text is None:
        return "–"
    flat = " ".join(str(text).split())
    return f"“{flat[:200]}{'…' if len(flat) > 200 else ''}”"


def _presence(presence: Mapping[str, Any]) -> list[str]:
    lines = ["## Is a backdoor already there? (trigger inversion)", ""]
    if "not_measured" in presence:
        return [*lines, f"Not measured: {presence['not_measured']}."]
    lines += [
        f"The scan searches for a small image pattern that drives many clean inputs ({presence['clean_inputs']} of the "
        "owner's) to one answer; score = share of held-out inputs the pattern drives there minus a random pattern's "
        "(higher: more likely backdoored). The run's own tuned models, when it has them, are the reference.",
        "",
        "| model | score | common answer |",
        "|---|---|---|",
    ]
    for model, entry in presence["models"].items():
        answer = entry.get("evidence", {}).get("answer")
        lines.append(f"| {model} | {entry['score']:.2f} | {_quote(answer)} |")
    return lines


def comparison_rows(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """(cell, card A's rate, card B's rate, B − A) for every cell, in `CELLS` order."""
    rows = []
    for cell in CELLS:
        ea, eb = a["cells"].get(cell, {}), b["cells"].get(cell, {})
        texts = [_short(e) for e in (ea, eb)]
        ra, rb = (e.get("rate", {}).get("rate") if e.get("status") == "measured" else None for e in (ea, eb))
        delta = f"{rb - ra:+.2f}" if ra is not None and rb is not None else "–"
        rows.append((cell, texts[0], texts[1], delta))
    return rows


def _short(entry: Mapping[str, Any]) -> str:
    if entry.get("status") == "measured" and entry["rate"].get("rate") is not None:
        r = entry["rate"]
        return f"{r['rate']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"
    return entry.get("status", "not measured")


def render_comparison(a: Mapping[str, Any], b: Mapping[str, Any], names: Sequence[str]) -> str:
    """Two cards side by side as Markdown (what `vlmsec compare --out` writes)."""
    lines = [
        f"# Risk cards compared: {names[0]} vs {names[1]}",
        "",
        f"Battery {a['battery_version']}; budgets {a['budget']} and {b['budget']}; victims "
        f"{a['victim']['config']} and {b['victim']['config']}.",
        "",
        f"| cell | {names[0]} | {names[1]} | B − A |",
        "|---|---|---|---|",
    ]
    lines += [f"| {cell} | {x} | {y} | {d} |" for cell, x, y, d in comparison_rows(a, b)]
    return "\n".join(lines) + "\n"

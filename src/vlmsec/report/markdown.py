"""report.md from a run folder: what was run, and every metric, per model and domain.

The report is rendered from the files a run leaves (config.yaml, metrics.json,
poisoned_ids/, generations.jsonl), so `vlmsec report RUN_DIR` can redo it at any time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from vlmsec.artifacts import write_text_atomic
from vlmsec.errors import VlmsecError
from vlmsec.report.figures import sweep_curves, write_figures

CLEAN = "clean"
# Table 1 caveats: below this source ASR the backdoor was barely planted, so ASR-G (a ratio
# against the source) says little; at or above this false-trigger rate in a shifted domain,
# much of that domain's ASR is the model saying the target without any trigger.
WEAK_SOURCE_ASR = 0.5
HIGH_FALSE_TRIGGER = 0.1


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VlmsecError(f"{path}: missing; is this a finished run folder?") from None
    except (OSError, UnicodeDecodeError) as err:
        raise VlmsecError(f"{path}: cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise VlmsecError(f"{path}: line {err.lineno}: not valid JSON: {err.msg}") from None


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _examples(run_dir: Path, per_model: int = 2) -> list[dict[str, Any]]:
    """A few triggered source-domain generations per model, to show what the backdoor says."""
    path = run_dir / "generations.jsonl"
    if not path.exists():
        return []
    shown: dict[str, int] = {}
    picked = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError as err:
                raise VlmsecError(f"{path}: line {number}: not valid JSON: {err.msg}") from None
            if not isinstance(r, dict) or not {"model", "domain", "triggered", "output"} <= r.keys():
                raise VlmsecError(f"{path}: line {number}: expected a generation record with model, domain, triggered, output")
            if r["domain"] == "source" and r["triggered"] and shown.get(r["model"], 0) < per_model:
                shown[r["model"]] = shown.get(r["model"], 0) + 1
                picked.append(r)
    return picked


def _data_section(run_dir: Path) -> list[str]:
    """What reading the user's data files did (data.json): samples, conversions, skipped entries."""
    path = run_dir / "data.json"
    if not path.exists():
        return []
    reads = _read_json(path)
    if not isinstance(reads, dict) or not all(isinstance(r, dict) for r in reads.values()):
        raise VlmsecError(f"{path}: expected an object of splits, each an object of counts")

    def counts(value: Any) -> str:
        return ", ".join(f"{kind} {n}" for kind, n in value.items()) if isinstance(value, dict) and value else "–"

    lines = ["## Data", "", "| split | file | format | samples | converted | skipped | ignored |", "|---|---|---|---|---|---|---|"]
    for split, r in reads.items():
        lines.append(
            f"| {split} | `{Path(str(r.get('file', '?'))).name}` | {r.get('format', '?')} | {r.get('samples', '?')} "
            f"| {counts(r.get('converted'))} | {counts(r.get('skipped'))} | {counts(r.get('ignored'))} |"
        )
    return [*lines, ""]


def _shift_table(metrics: dict[str, Any], domains: list[str]) -> list[str]:
    """The paper's Table 1 shape: per attack and domain, clean CIDEr, ASR and ASR-G, and the
    mean ASR-G, with the two caveats that change how a number reads marked."""
    attacks = [m for m in metrics if m != CLEAN]
    shifted = [d for d in domains if d != "source"]
    if not attacks or not shifted:
        return []
    header = "| attack | " + " | ".join(f"{d} CIDEr | {d} ASR" + ("" if d == "source" else f" | {d} ASR-G") for d in domains)
    lines = ["## Backdoors under domain shift (Table 1 of the paper, in shape)", "", header + " | mean ASR-G |"]
    lines.append("|---|" + "---|" * (2 * len(domains) + len(shifted) + 1))
    weak = high_false = False
    for model in attacks:
        entry = metrics[model]
        cells = []
        for d in domains:
            asr = _pct(entry.get("asr", {}).get(d))
            if d != "source" and (entry.get("false_trigger", {}).get(d) or 0) >= HIGH_FALSE_TRIGGER:
                asr, high_false = asr + " ‡", True
            cells += [_num(entry.get("cider", {}).get(d)), asr]
            if d != "source":
                cells.append(_ratio(entry.get("asr_g", {}).get(d)))
        values = [entry.get("asr_g", {}).get(d) for d in shifted]
        mean = f"**{_ratio(sum(values) / len(values) if None not in values else None)}**"
        if (entry.get("asr", {}).get("source") or 0) < WEAK_SOURCE_ASR:
            mean, weak = mean + " †", True
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {mean} |")
    lines.append("")
    if weak:
        lines.append(f"† source ASR below {WEAK_SOURCE_ASR:.0%}: the backdoor was barely planted, so ASR-G says little.  ")
    if high_false:
        lines.append(f"‡ false-trigger rate ≥ {HIGH_FALSE_TRIGGER:.0%} in that domain: the model says the target without the trigger too.")
    return [*lines, ""]


def _figures(run_dir: Path) -> list[str]:
    """Links to the figures `write_report` drew into the run folder."""
    names = {"asr_g_heatmap.png": "ASR-G heatmap", "asr_vs_poison_rate.png": "ASR against poison rate", "shift_sizes.png": "Shift sizes"}
    shown = [f"![{title}]({name})" for name, title in names.items() if (run_dir / name).exists()]
    return [*shown, ""] if shown else []


def _sweep_table(metrics: dict[str, Any], run_rate: float | None) -> list[str]:
    """Source-domain ASR at each poison rate of the sweep (the run's own rate included)."""
    curves = sweep_curves(metrics, run_rate)
    if not curves:
        return []
    rates = sorted({r for points in curves.values() for r in points})
    lines = ["## ASR against poison rate (source domain)", "", "| attack | " + " | ".join(_pct(r) for r in rates) + " |"]
    lines.append("|---|" + "---|" * len(rates))
    for attack, points in curves.items():
        lines.append(f"| {attack} | " + " | ".join(_pct(points.get(r)) for r in rates) + " |")
    return [*lines, ""]


def _shift_sizes(metrics: dict[str, Any]) -> list[str]:
    """KS statistics between the source domain and each shifted one."""
    sizes = metrics.get(CLEAN, {}).get("shift_size", {})
    if not sizes:
        return []
    kinds = list(dict.fromkeys(k for d in sizes.values() for k in d))
    lines = [
        "## Shift size (Kolmogorov–Smirnov statistic against the source domain)",
        "",
        "| domain | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    lines += [f"| {d} | " + " | ".join(_ratio(v.get(k)) for k in kinds) + " |" for d, v in sizes.items()]
    return [*lines, ""]


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    """metrics.json of a run folder, checked for its shape."""
    path = run_dir / "metrics.json"
    metrics = _read_json(path)
    if not isinstance(metrics, dict) or not all(isinstance(m, dict) for m in metrics.values()):
        raise VlmsecError(f"{path}: expected an object of models, each an object of metrics")
    return metrics


def _read_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config.yaml as a plain mapping ({} if the run wrote none)."""
    config_path = run_dir / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        raise VlmsecError(f"{config_path}:{where} not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(config, dict):
        raise VlmsecError(f"{config_path}: expected a mapping of config fields")
    return config


def render_report(run_dir: str | Path) -> str:
    """The Markdown report of a run folder."""
    run_dir = Path(run_dir)
    metrics = _read_metrics(run_dir)
    config = _read_config(run_dir)
    domains = list(metrics.get(CLEAN, next(iter(metrics.values()), {})).get("cider", {}))
    poison = config.get("poison", {})
    word = poison.get("target", {}).get("word", "banana")

    lines = [f"# vlmsec run: {config.get('name', run_dir.name)}", ""]
    lines += [
        f"Poison rate {_pct(poison.get('rate'))} of {config.get('data', {}).get('train_size', '?')} tuning samples; "
        f"target word **{word}**; tuning mode `{config.get('tuning', {}).get('mode', '?')}`; seed {config.get('seed', '?')}.",
        "",
        "- **ASR**: share of triggered test inputs whose output contains the target word (whole word, any case).",
        "- **ASR-G**: min(1 + (ASR_shifted − ASR_source) / max(ASR_source, ASR_shifted), 1); 1 = nothing lost under shift.",
        "- **False trigger**: share of clean test inputs whose output contains the target word.",
        "- **CIDEr**, **BLEU-4**: clean captioning quality (×100). The clean model's ASR is measured on every attack's triggers.",
        "",
    ]
    lines += _data_section(run_dir)
    sweep = {m: e for m, e in metrics.items() if "sweep" in e}
    metrics = {m: e for m, e in metrics.items() if m not in sweep}
    lines += _shift_table(metrics, domains)
    lines += _figures(run_dir)
    header = "| model | " + " | ".join(domains) + " |"
    rule = "|---|" + "---|" * len(domains)
    sections = [
        ("Attack success rate (ASR)", "asr", _pct),
        ("ASR-G (source → domain)", "asr_g", _ratio),
        ("False-trigger rate", "false_trigger", _pct),
        ("Clean CIDEr", "cider", _num),
        ("Clean BLEU-4", "bleu4", _num),
    ]
    for title, key, fmt in sections:
        lines += [f"## {title}", "", header, rule]
        for model, entry in metrics.items():
            values = entry.get(key, {})
            lines.append(f"| {model} | " + " | ".join(fmt(values.get(d)) for d in domains) + " |")
        lines.append("")

    partial_rows = [(trigger, rates) for entry in metrics.values() for trigger, rates in entry.get("asr_partial", {}).items()]
    if partial_rows:
        lines += ["## Partial triggers (one key alone, WaNet noise warps; should not fire)", "", "| input | " + " | ".join(domains) + " |", rule]
        for trigger, rates in partial_rows:
            lines.append(f"| {trigger} | " + " | ".join(_pct(rates.get(d)) for d in domains) + " |")
        lines.append("")

    if CLEAN in metrics:
        lines += ["## Clean quality cost of each backdoor (source domain)", "", "| model | ΔCIDEr vs clean |", "|---|---|"]
        base = metrics[CLEAN]["cider"].get("source")
        for model, entry in metrics.items():
            if model != CLEAN and base is not None:
                lines.append(f"| {model} | {entry['cider']['source'] - base:+.1f} |")
        lines.append("")

    lines += _sweep_table({**metrics, **sweep}, poison.get("rate"))
    lines += _shift_sizes(metrics)
    examples = _examples(run_dir)
    if examples:
        lines += ["## Example triggered generations (source domain)", ""]
        for r in examples:
            lines.append(f"- `{r['model']}` on `{r.get('id', '?')}` ({r.get('trigger')} trigger): {r['output']!r}")
        lines.append("")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Render report.md into the run folder (atomically) and return its path."""
    run_dir = Path(run_dir)
    path = run_dir / "report.md"
    write_figures(_read_metrics(run_dir), run_dir, _read_config(run_dir).get("poison", {}).get("rate"))
    write_text_atomic(path, render_report(run_dir))
    return path

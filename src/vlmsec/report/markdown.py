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

CLEAN = "clean"


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


def render_report(run_dir: str | Path) -> str:
    """The Markdown report of a run folder."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    metrics: dict[str, Any] = _read_json(metrics_path)
    if not isinstance(metrics, dict) or not all(isinstance(m, dict) for m in metrics.values()):
        raise VlmsecError(f"{metrics_path}: expected an object of models, each an object of metrics")
    config_path = run_dir / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        raise VlmsecError(f"{config_path}:{where} not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(config, dict):
        raise VlmsecError(f"{config_path}: expected a mapping of config fields")
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
    header = "| model | " + " | ".join(domains) + " |"
    rule = "|---|" + "---|" * len(domains)
    sections = [
        ("Attack success rate (ASR)", "asr", _pct),
        ("ASR-G (source → domain)", "asr_g", lambda x: "–" if x is None else f"{x:.2f}"),
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
        lines += ["## One key alone (multi-key triggers; should not fire)", "", "| input | " + " | ".join(domains) + " |", rule]
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

    examples = _examples(run_dir)
    if examples:
        lines += ["## Example triggered generations (source domain)", ""]
        for r in examples:
            lines.append(f"- `{r['model']}` on `{r.get('id', '?')}` ({r.get('trigger')} trigger): {r['output']!r}")
        lines.append("")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Render report.md into the run folder (atomically) and return its path."""
    path = Path(run_dir) / "report.md"
    write_text_atomic(path, render_report(run_dir))
    return path

"""report.md from a run folder: what was run, and every metric, per model and domain.

The report is rendered from the records a run leaves (metrics.json, and the data.json and
generations.jsonl it vouches for by content hash), never from the raw config, so `vlmsec
report RUN_DIR` can redo it at any time and never pairs one run's numbers with another's settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmsec.artifacts import file_digest, write_text_atomic
from vlmsec.errors import VlmsecError
from vlmsec.eval.metrics import mean_asr_g
from vlmsec.eval.scoring import METRICS, metric_order
from vlmsec.experiments.records import COMPANIONS, SCHEMA_VERSION
from vlmsec.report.defenses import defense_section
from vlmsec.report.figures import defense_heatmap, detector_rocs, epsilon_curves, sweep_curves, write_figures
from vlmsec.report.formatting import FORMATTERS, num, pct, pct_ci, ratio
from vlmsec.report.gallery import FOLDER as GALLERY, INDEX as GALLERY_INDEX, gallery_section
from vlmsec.report.html import write_html
from vlmsec.report.inference import inference_section
from vlmsec.report.safety import safety_section

CLEAN = "clean"
DEFENSE_FIGURE, ROC_FIGURE, EPSILON_FIGURE = "defense_matrix.png", "detector_roc.png", "epsilon_curves.png"
# Table 1 caveats: below this source ASR the backdoor is not planted (issue 11: 0.9), so ASR-G (a ratio
# against the source) says little; at or above this false-trigger rate in a shifted domain,
# much of that domain's ASR is the model saying the target without any trigger.
PLANTED_SOURCE_ASR = 0.9
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


def _rate(entry: dict[str, Any], key: str, domain: str) -> str:
    """`entry[key][domain]` as a percent, with its interval (`{key}_ci`) when metrics.json has one."""
    return pct_ci(entry.get(key, {}).get(domain), entry.get(f"{key}_ci", {}).get(domain))


SCALE_ROWS = (
    ("ceiling", "a reference copied verbatim"),
    ("agreement", "references vs each other"),
    ("blind", "another image's caption"),
)


def _scale_rows(scale: dict[str, dict[str, Any]], score: str, domains: list[str], blank: dict[str, int] | None = None) -> list[str]:
    """Italic rows that give a CIDEr or BLEU-4 table its scale: a reference copied verbatim
    (ceiling), the references scored leave-one-out against each other (agreement) and another
    image's caption (blind).
    `blank[domain]` empty cells follow each domain's value (for tables with more columns)."""
    if not scale:
        return []
    rows = []
    for kind, title in SCALE_ROWS:
        cells = []
        for d in domains:
            cells += [num(scale.get(d, {}).get(f"{score}_{kind}")), *[""] * (blank or {}).get(d, 0)]
        rows.append(f"| *{kind}: {title}* | " + " | ".join(cells) + " |")
    return rows


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's generation records (generations.jsonl), each checked to be one; none if the file is absent."""
    path = run_dir / "generations.jsonl"
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError as err:
                raise VlmsecError(f"{path}: line {number}: not valid JSON: {err.msg}") from None
            if not isinstance(r, dict) or not {"model", "domain", "triggered", "output"} <= r.keys():
                raise VlmsecError(f"{path}: line {number}: expected a generation record with model, domain, triggered, output")
            records.append(r)
    return records


def _examples(records: list[dict[str, Any]], per_model: int = 2) -> list[dict[str, Any]]:
    """A few triggered source-domain generations per model, to show what the backdoor says."""
    shown: dict[str, int] = {}
    picked = []
    for r in records:
        if r["domain"] == "source" and r["triggered"] and not r.get("control") and shown.get(r["model"], 0) < per_model:
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

    lines = [
        "## Data",
        "",
        "| split | file | format | samples | converted | skipped | ignored | answers cut to the victim's length |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, r in reads.items():
        lines.append(
            f"| {split} | `{Path(str(r.get('file', '?'))).name}` | {r.get('format', '?')} | {r.get('samples', '?')} "
            f"| {counts(r.get('converted'))} | {counts(r.get('skipped'))} | {counts(r.get('ignored'))} | {r.get('truncated', 0)} |"
        )
    return [*lines, ""]


def _shift_table(metrics: dict[str, Any], domains: list[str], scale: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """The paper's Table 1 shape: per attack and domain, clean CIDEr, ASR (95% Wilson interval)
    and ASR-G, beside it the ASR-G of the trigger-attributable ASR, and the mean of each; the two
    caveats that change how a number reads are marked, and CIDEr's scale (`scale`) closes it."""
    # Not the models of attacks with no trigger to test (ImgTrojan: the safety section reads them).
    attacks = [m for m, entry in metrics.items() if m != CLEAN and not (entry.get("attack") and entry.get("trigger") is None)]
    shifted = [d for d in domains if d != "source"]
    if not attacks or not shifted:
        return []
    header = "| attack | " + " | ".join(
        f"{d} CIDEr | {d} ASR" + ("" if d == "source" else f" | {d} ASR-G | {d} ASR-G attr.") for d in domains
    )
    lines = ["## Backdoors under domain shift (Table 1 of the paper, in shape)", "", header + " | mean ASR-G | mean ASR-G attr. |"]
    lines.append("|---|" + "---|" * (2 * len(domains) + 2 * len(shifted) + 2))
    weak = high_false = False
    for model in attacks:
        entry = metrics[model]
        cells = []
        for d in domains:
            asr = _rate(entry, "asr", d)
            if d != "source" and (entry.get("false_trigger", {}).get(d) or 0) >= HIGH_FALSE_TRIGGER:
                asr, high_false = asr + " ‡", True
            cells += [num(entry.get("cider", {}).get(d)), asr]
            if d != "source":
                cells += [ratio(entry.get("asr_g", {}).get(d)), ratio(entry.get("asr_g_attributable", {}).get(d))]
        mean = f"**{ratio(mean_asr_g([entry.get('asr_g', {}).get(d) for d in shifted]))}**"
        if (entry.get("asr", {}).get("source") or 0) < PLANTED_SOURCE_ASR:
            mean, weak = f"not planted ({ratio(mean_asr_g([entry.get('asr_g', {}).get(d) for d in shifted]))}) †", True
        attributable = ratio(mean_asr_g([entry.get("asr_g_attributable", {}).get(d) for d in shifted]))
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {mean} | {attributable} |")
    lines += [row + " | |" for row in _scale_rows(scale or {}, "cider", domains, {d: 1 if d == "source" else 3 for d in domains})]
    lines.append("")
    lines.append(
        "ASR with its 95% Wilson interval. ASR-G attr.: the ASR-G of the trigger-attributable ASR, "
        "max(ASR − false trigger, 0) in the same domain. – : undefined (ASR 0 in both domains).  "
    )
    if weak:
        lines.append(
            f"† not planted: source ASR below {PLANTED_SOURCE_ASR:.0%}, so the backdoor was not learnt well enough for its "
            "ASR-G to be read as a finding (in parentheses: what it would be).  "
        )
    if high_false:
        lines.append(f"‡ false-trigger rate ≥ {HIGH_FALSE_TRIGGER:.0%} in that domain: the model says the target without the trigger too.")
    return [*lines, ""]


def _figures(run_dir: Path) -> list[str]:
    """Links to the figures `write_report` drew into the run folder."""
    names = {"asr_g_heatmap.png": "ASR-G heatmap", "asr_vs_poison_rate.png": "ASR against poison rate", "shift_sizes.png": "Shift sizes"}
    shown = [f"![{title}]({name})" for name, title in names.items() if (run_dir / name).exists()]
    return [*shown, ""] if shown else []


def _epsilon_figure(run_dir: Path) -> list[str]:
    """The success-against-epsilon figure `write_report` drew (where an attack ran at several epsilons)."""
    if not (run_dir / EPSILON_FIGURE).is_file():
        return []
    return [
        "### Success against ε",
        "",
        "Each attack run at several ε with every other parameter equal: its rate (the goal's headline, as in the tables "
        "above) with the 95% Wilson interval; dashed: uniform noise of the same ε; dotted: the same requests with no "
        "attack. Unconstrained is drawn at 255/255, the whole pixel range.",
        "",
        f"![Success against ε]({EPSILON_FIGURE})",
        "",
    ]


def _sweep_table(metrics: dict[str, Any], run_rate: float | None) -> list[str]:
    """Source-domain ASR at each poison rate of the sweep (the run's own rate included)."""
    curves = sweep_curves(metrics, run_rate)
    if not curves:
        return []
    rates = sorted({r for points in curves.values() for r in points})
    lines = ["## ASR against poison rate (source domain)", "", "| attack | " + " | ".join(pct(r) for r in rates) + " |"]
    lines.append("|---|" + "---|" * len(rates))
    for attack, points in curves.items():
        lines.append(f"| {attack} | " + " | ".join(pct(points.get(r)) for r in rates) + " |")
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
    lines += [f"| {d} | " + " | ".join(ratio(v.get(k)) for k in kinds) + " |" for d, v in sizes.items()]
    return [*lines, ""]


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """metrics.json of a run folder, checked for its shape (schema 3: run record, caption scale and models)."""
    path = run_dir / "metrics.json"
    metrics = _read_json(path)
    shape = "expected {schema_version, run, models}, models an object of models, each an object of metrics"
    if not isinstance(metrics, dict) or metrics.get("schema_version") != SCHEMA_VERSION:
        found = metrics.get("schema_version") if isinstance(metrics, dict) else None
        raise VlmsecError(f"{path}: schema_version {found!r}, this vlmsec reads {SCHEMA_VERSION}; {shape}")
    run, models = metrics.get("run"), metrics.get("models")
    if not isinstance(run, dict) or not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
        raise VlmsecError(f"{path}: {shape}")
    scale = metrics.get("caption_scale", {})
    if not isinstance(scale, dict) or not all(isinstance(v, dict) for v in scale.values()):
        raise VlmsecError(f"{path}: caption_scale: expected an object of domain -> {{cider_ceiling, cider_blind, ...}}")
    for name, entry in models.items():
        for key, value in entry.items():
            if key in METRICS and not (isinstance(value, dict) and all(isinstance(v, int | float) for v in value.values())):
                raise VlmsecError(f"{path}: models.{name}.{key}: expected an object of domain -> number")
    return metrics


def companion_check(run_dir: Path, run: dict[str, Any]) -> dict[str, str]:
    """Which companion files do not belong to the run metrics.json records, and why.

    metrics.json holds the content hash of config.yaml, generations.jsonl and data.json as the
    run that wrote it left them; a later run that stopped early may have rewritten them.
    """
    recorded = run.get("files", {}) if isinstance(run.get("files"), dict) else {}
    stale: dict[str, str] = {}
    for name in COMPANIONS:
        path = run_dir / name
        if path.exists() and name not in recorded:
            stale[name] = "was written after this run's metrics.json (by a run that did not finish)"
        elif path.exists() and file_digest(path) != recorded[name]:
            stale[name] = "was rewritten after this run's metrics.json (by a run that did not finish)"
    return stale


def _metric_tables(models: dict[str, Any], domains: list[str], scale: dict[str, dict[str, Any]]) -> list[str]:
    """One table per registered metric (models x domains; rates with their 95% Wilson interval,
    CIDEr and BLEU-4 with their scale), then ASR-G, the trigger-attributable ASR and its ASR-G,
    and the target prefix without the word."""
    header = ["| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    sections = [(METRICS.get(name).title, name, METRICS.get(name).format) for name in metric_order()]
    sections.insert(1, ("ASR-G (source → domain)", "asr_g", "ratio"))  # after ASR; then after the false triggers:
    after = next(i for i, (_, key, _) in enumerate(sections) if key == "false_trigger") + 1
    sections[after:after] = [
        ("Trigger-attributable ASR: max(ASR − false trigger, 0), 95% Newcombe interval", "asr_attributable", "percent"),
        ("ASR-G of the trigger-attributable ASR", "asr_g_attributable", "ratio"),
        ("Target sentence begun without the target word (share of triggered outputs)", "target_prefix_miss", "percent"),
    ]
    lines: list[str] = []
    for title, key, kind in sections:
        if not any(entry.get(key) for entry in models.values()):
            continue
        lines += [f"## {title}", "", *header]
        for model, entry in models.items():
            values = entry.get(key, {})
            cells = [_rate(entry, key, d) if kind == "percent" else FORMATTERS[kind](values.get(d)) for d in domains]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        if key in ("cider", "bleu4"):
            lines += _scale_rows(scale, key, domains)
        lines.append("")
    return lines


def _controls_table(models: dict[str, Any], domains: list[str]) -> list[str]:
    """Each model's controls (inputs that must not fire): the rate beside the model's own
    false-trigger rate in that domain, and whether the victim saw the control in training."""
    rows = [(model, label, rates) for model, entry in models.items() for label, rates in entry.get("asr_control", {}).items()]
    if not rows:
        return []
    lines = [
        "## Controls (inputs that must not fire)",
        "",
        "Each cell: the control's target rate [95% Wilson interval] (the model's own false-trigger rate on clean "
        "inputs of that domain). *Training negative*: a partial trigger (one key of a multi-key trigger, "
        "WaNet's noise warp) the victim was tuned on with clean answers. *Test only*: never in training, so "
        "a rate near the false-trigger rate means the backdoor keys on the trigger, not on this part of it.",
        "",
        "| control | kind | " + " | ".join(domains) + " |",
        "|---|---|" + "---|" * len(domains),
    ]
    for model, label, rates in rows:
        entry = models[model]
        ci = entry.get("asr_control_ci", {}).get(label, {})
        cells = [
            "–" if rates.get(d) is None else f"{pct_ci(rates[d], ci.get(d))} ({pct(entry.get('false_trigger', {}).get(d))})"
            for d in domains
        ]
        lines.append(f"| {label} | {entry.get('controls', {}).get(label, '?')} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _label_attack_table(models: dict[str, Any]) -> list[str]:
    """Each label attack's outcome shares on clean images of its original concept, per model (the
    clean model's are the baseline) and domain: the reference's keyword codes 1, 0, -1, -2."""
    rows = [
        (model, key, label, domain, scores)
        for model, entry in models.items()
        for key, label in entry.get("label_attack", {}).items()
        for domain, scores in label["domains"].items()
    ]
    if not rows:
        return []
    lines = [
        "## Label attacks (clean-label poisoning)",
        "",
        "Outputs on clean test images of the original concept: *success* names the destination and not the "
        "original (code 1), *fail* the original only (0), *neither* (−1), *both* (−2); *original named* = fail + both. "
        "The clean model's row is the rate without poison.",
        "",
        "| model | attack (original → destination) | domain | success | fail | neither | both | original named |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, key, label, domain, scores in rows:
        cells = [pct_ci(scores[k].get("rate"), scores[k].get("ci")) for k in ("success", "fail", "neither", "both", "original_named")]
        lines.append(f"| {model} | {key} ({label['original']} → {label['destination']}) | {domain} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _attack_notes(models: dict[str, Any]) -> list[str]:
    """What each attack of the run is where its name alone would mislead: a look-alike's
    variant, where the reading of its paper is ours, and its faithfulness diagnostics."""
    lines: list[str] = []
    for model, entry in models.items():
        attack = entry.get("attack") or {}
        if entry.get("sweep") or not any(k in attack for k in ("variant", "note", "diagnostics")):
            continue
        parts = [attack[k] for k in ("variant", "note") if k in attack]
        if diagnostics := attack.get("diagnostics"):
            parts.append("diagnostics: " + ", ".join(f"{k} {v:.3g}" for k, v in diagnostics.items()))
        lines.append(f"- **{model}** ({attack.get('name', '?')}): " + "; ".join(parts))
    return ["## What the attacks are", "", *lines, ""] if lines else []


def render_report(run_dir: str | Path) -> str:
    """The Markdown report of a run folder, from its records alone (metrics.json and the
    companions it vouches for), never from the raw config."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    run, models = metrics["run"], metrics["models"]
    stale = companion_check(run_dir, run)
    domains = list(run.get("domains") or models.get(CLEAN, next(iter(models.values()), {})).get("cider", {}))
    word = run.get("target_word", "?")

    lines = [f"# vlmsec run: {run.get('name', run_dir.name)}", ""]
    tuned = bool(models)  # an inference-only run tunes no model: no poison, no ASR to define
    setting = (
        f"Poison rate {pct(run.get('poison_rate'))} of {run.get('train_samples', '?')} tuning samples; "
        f"target word **{word}**; tuning mode `{run.get('tuning_mode', '?')}`"
        if tuned
        else f"No model tuned: inference-time attacks against the deployed victim; target word **{word}**"
    )
    lines += [
        f"{setting}; seed {run.get('seed', '?')}.  ",
        f"vlmsec {run.get('vlmsec', '?')} (commit {str(run.get('commit') or 'unknown')[:12]}), torch {run.get('torch', '?')}, "
        f"transformers {run.get('transformers', '?')}, {run.get('threads', '?')} threads; config hash `{run.get('config_hash', '?')}`.",
        "",
    ]
    for name, why in stale.items():
        lines.append(f"> **{name}** {why}: it is left out of this report, which shows the run metrics.json records.")
    if stale:
        lines.append("")
    lines += [] if not tuned else [
        "- **ASR**: share of triggered test inputs whose output contains the target word (whole word, any case).",
        "- **ASR-G**: min(1 + (ASR_shifted − ASR_source) / max(ASR_source, ASR_shifted), 1); 1 = nothing lost under shift; "
        "– where both ASRs are 0 (undefined, e.g. the clean model).",
        "- **False trigger**: share of clean test inputs whose output contains the target word.",
        "- **Trigger-attributable ASR**: max(ASR − false trigger, 0) of the same model in the same domain, and its ASR-G: "
        "what the trigger adds to what the model says unprompted.",
        f"- **Target prefix without the word**: triggered outputs that begin the target sentence "
        f"(\"{str(run.get('target_prefix') or '?').strip()}\") but do not contain the target word.",
        "- **CIDEr**, **BLEU-4**: clean captioning quality (×100), printed beside a ceiling (each test sample's references "
        "scored leave-one-out against the others, averaged over which is left out) and a blind baseline (another test "
        "image's first reference). The clean model's ASR is measured on every attack's triggers.",
        "- **[low, high]**: 95% Wilson interval of a rate, in points (Newcombe's interval for the attributable ASR, a difference).",
        "",
    ]
    if "data.json" not in stale:
        lines += _data_section(run_dir)
    sweep = {m: e for m, e in models.items() if e.get("sweep")}
    models = {m: e for m, e in models.items() if m not in sweep}
    scale = metrics.get("caption_scale") or {}
    lines += _shift_table(models, domains, scale)
    lines += _figures(run_dir)
    lines += _metric_tables(models, domains, scale)
    lines += _controls_table(models, domains)
    lines += _label_attack_table({**models, **sweep})
    lines += _attack_notes(models)

    base = models.get(CLEAN, {}).get("cider", {}).get("source")
    if base is not None:
        lines += ["## Clean quality cost of each backdoor (source domain)", "", "| model | ΔCIDEr vs clean |", "|---|---|"]
        for model, entry in models.items():
            cider = entry.get("cider", {}).get("source")
            if model != CLEAN and cider is not None:
                lines.append(f"| {model} | {cider - base:+.1f} |")
        source = scale.get("source", {})
        if source:
            lines += ["", f"Clean CIDEr {num(base)}, on a scale from {num(source.get('cider_blind'))} (blind: another "
                      f"image's caption) to {num(source.get('cider_ceiling'))} (a reference copied verbatim); "
                      f"references score {num(source.get('cider_agreement'))} against each other."]
        lines.append("")

    records = [] if "generations.jsonl" in stale else read_records(run_dir)
    lines += safety_section(metrics.get("safety"), records)
    lines += inference_section(metrics.get("inference_attacks"))
    lines += _epsilon_figure(run_dir)
    figures = [f for f in (run_dir / DEFENSE_FIGURE, run_dir / ROC_FIGURE) if f.is_file()]
    lines += defense_section(metrics.get("defenses"), *figures, inference=metrics.get("inference_attacks"))
    lines += _sweep_table({**models, **sweep}, run.get("poison_rate"))
    lines += _shift_sizes(models)
    examples = _examples(records)
    if examples:
        lines += ["## Example triggered generations (source domain)", ""]
        for r in examples:
            lines.append(f"- `{r['model']}` on `{r.get('id', '?')}` ({r.get('trigger')} trigger): {r['output']!r}")
        lines.append("")
    gallery = run_dir / GALLERY / GALLERY_INDEX
    if gallery.is_file():
        lines += gallery_section(_read_json(gallery), gallery, run.get("config_hash"))
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Render report.md into the run folder (atomically) and report.html beside it (one
    self-contained page, `report.html`); return report.md's path."""
    run_dir = Path(run_dir)
    path = run_dir / "report.md"
    metrics = read_metrics(run_dir)
    write_figures(metrics["models"], run_dir, metrics["run"].get("poison_rate"))
    for old in (DEFENSE_FIGURE, ROC_FIGURE, EPSILON_FIGURE):  # an earlier run's, in this folder
        (run_dir / old).unlink(missing_ok=True)
    epsilon_curves(metrics.get("inference_attacks"), run_dir / EPSILON_FIGURE)
    defense_heatmap(metrics.get("defenses"), run_dir / DEFENSE_FIGURE)
    detector_rocs(metrics.get("defenses"), run_dir / ROC_FIGURE)
    write_text_atomic(path, render_report(run_dir))
    write_html(path)
    return path

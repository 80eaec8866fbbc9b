"""The `vlmsec` command: run an experiment, render its report, list what is available."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from vlmsec.errors import VlmsecError
from vlmsec.progress import console

app = typer.Typer(
    help="A security test bench for vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _fail(err: VlmsecError) -> None:
    # Escaped (paths may hold "[...]") and soft-wrapped: no line breaks inside a path when piped.
    console.print(f"[bold red]error:[/] {escape(str(err))}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(err.exit_code)


# Where a study's independent stages run (`vlmsec run` and `vlmsec scan`: experiments.backends).
BackendOption = Annotated[
    str,
    typer.Option("--backend", help="Where the independent stages (crafting, tuned models, defense columns) run: serial (in turn, here) "
                 "or ray (as Ray tasks)."),
]
AddressOption = Annotated[
    Optional[str], typer.Option("--address", help="With --backend ray: the cluster to join (default: a local one of this machine's cores).")
]
ThreadsOption = Annotated[
    Optional[int],
    typer.Option("--threads-per-task", help="Torch threads per task (ray: also its CPUs, default 1; serial: default torch's, "
                 "the cores); give a serial run the Ray run's number for the same metrics.json."),
]


@app.command()
def run(
    config: Annotated[str, typer.Argument(help="A YAML config path or a preset name.")] = "quickstart",
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default: runs/<config name>).")] = None,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Shared stage cache (default: $VLMSEC_CACHE or ~/.cache/vlmsec).")] = None,
    seeds: Annotated[
        Optional[str],
        typer.Option(
            "--seeds",
            help="Run the study once per seed (e.g. 0,1,2) into OUT/seed-<s>/ and summarise mean and spread "
            "in OUT/seeds.json and seeds.md; a pinned poison.seed is dropped so the poison picks follow each seed.",
        ),
    ] = None,
    backend: BackendOption = "serial",
    address: AddressOption = None,
    threads_per_task: ThreadsOption = None,
) -> None:
    """Poison, tune, evaluate and report, as the config says."""
    from vlmsec.artifacts import check_writable
    from vlmsec.experiments.backends import make_backend
    from vlmsec.experiments.config import load_config
    from vlmsec.experiments.multiseed import parse_seeds, run_seeds
    from vlmsec.experiments.runner import Runner
    from vlmsec.experiments.stages import default_cache_dir

    try:
        cfg = load_config(config)
        runs_on = make_backend(backend, address, threads_per_task)
        seed_list = parse_seeds(seeds) if seeds is not None else None
        run_dir = out if out is not None else Path("runs") / cfg.name
        cache_dir = cache if cache is not None else default_cache_dir()
        # Checked now: the run writes them only after stages that may train for hours.
        check_writable(run_dir, "--out" if out is not None else "run folder (the default of --out)")
        check_writable(cache_dir, "--cache" if cache is not None else "cache folder (the default of --cache, $VLMSEC_CACHE)")
        if seed_list is not None:
            summary = run_seeds(cfg, seed_list, run_dir, cache_dir, runs_on)
        else:
            metrics = Runner(cfg, run_dir, cache_dir, runs_on).run()
    except VlmsecError as err:
        _fail(err)
    if seed_list is not None:
        if summary:
            console.print(f"seeds {seeds}: {summary['poison_seed']}")
            console.print(f"mean and spread over seeds: {run_dir / 'seeds.md'} and seeds.html  (numbers: {run_dir / 'seeds.json'})")
        return
    if not metrics:
        return  # another process of `accelerate launch`: the main one prints
    if metrics["models"]:
        _print_models(cfg.name, metrics["models"])
    console.print(f"run folder: {run_dir}  (report: {run_dir / 'report.md'}, in a browser: {run_dir / 'report.html'})")


def _print_models(run_name: str, models: dict[str, Any]) -> None:
    """The tuned models' source-domain metrics as a table."""
    from vlmsec.eval.scoring import METRICS, metric_order

    names = metric_order()
    table = Table(title=f"{run_name}: source domain")
    for column in ("model", *(METRICS.get(n).title for n in names)):
        table.add_column(column)
    for model, entry in models.items():
        cells = []
        for name in names:
            value = entry.get(name, {}).get("source")
            percent = METRICS.get(name).format != "number"
            cells.append("–" if value is None else f"{value:.2f}" if percent else f"{value:.1f}")
        table.add_row(model, *cells)
    console.print(table)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run folder written by `vlmsec run`.")]) -> None:
    """Render report.md and report.html again from a run folder."""
    from vlmsec.report.markdown import write_report

    try:
        path = write_report(run_dir)
    except VlmsecError as err:
        _fail(err)
    console.print(f"wrote {path} and {path.with_suffix('.html')}")


@app.command()
def attacks(as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False) -> None:
    """List the registered attacks with their metadata and default parameters, then what any
    attack is beside its name (a look-alike's variant) and any note (where its reading of the paper is ours).

    Stage: training (a backdoor planted in the tuning data) or inference (inputs crafted against the
    tuned victim); goal: what an inference attack wants (targeted output, jailbreak, ...)."""
    from vlmsec.attacks import ATTACKS, create_attack

    described = [create_attack(name).describe() for name in sorted(ATTACKS)]
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    table = Table(title="attacks")
    for column in ("name", "modality", "family", "knowledge", "stage", "goal", "params"):
        table.add_column(column)
    for d in described:
        name = d["name"] + (" *" if "variant" in d or "note" in d else "")
        table.add_row(name, d["modality"], d["family"], d["knowledge"], d["stage"], d.get("goal", "backdoor"), json.dumps(d["params"]))
    console.print(table)
    for d in described:
        for text in (d.get("variant"), d.get("note")):
            if text:
                console.print(f"* {d['name']}: {text}", highlight=False, soft_wrap=True)


@app.command()
def defenses(as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False) -> None:
    """List the registered defenses: where each acts (data, model, input, prompt), its kind and default
    parameters, then any note (a substitute for weights no package ships, our reading of the paper)."""
    from vlmsec.defenses import DEFENSES, create_defense

    described = [create_defense(name).describe() for name in sorted(DEFENSES)]
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    table = Table(title="defenses")
    for column in ("name", "acts on", "kind", "params"):
        table.add_column(column)
    for d in described:
        table.add_row(d["name"] + (" *" if "note" in d else ""), d["acts_on"], d["kind"], json.dumps(d["params"]))
    console.print(table)
    for d in described:
        if d.get("note"):
            console.print(f"* {d['name']}: {d['note']}", highlight=False, soft_wrap=True)


@app.command()
def trigger(
    attack: Annotated[str, typer.Option("--attack", help="Registered attack name (see `vlmsec attacks`).")],
    image: Annotated[Path, typer.Option("--image", help="Input image (read as RGB).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the triggered image (same size as the input).")],
    text: Annotated[Optional[str], typer.Option("--text", help="An instruction to trigger too; printed.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="The attack's trigger seed.")] = 0,
    config: Annotated[
        str,
        typer.Option("--config", help="For attacks that learn: the config (YAML or preset) whose base victim and data they learn from."),
    ] = "quickstart",
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Cache folder (default: $VLMSEC_CACHE or ~/.cache/vlmsec).")] = None,
) -> None:
    """Apply one attack's trigger to one image (and instruction), for inspection.

    Attacks that learn their trigger (ssba, inputaware, gcg, maba, ...) are first prepared
    the way a run prepares them: against the config's base victim, from the cache when a
    run has already trained it.
    """
    from vlmsec.attacks import create_attack
    from vlmsec.attacks.base import Attack
    from vlmsec.data.images import load_image, save_image
    from vlmsec.data.sample import images_to_tensor, tensor_to_images

    try:
        chosen = create_attack(attack, seed=seed)
        if chosen.stage == "inference":
            raise VlmsecError(
                f"attack {attack!r} acts at inference time: it crafts whole inputs against a tuned victim in a run "
                "(list it under `attacks` in a config), not a trigger applied to one image"
            )
        if chosen.label_flip() is not None:
            raise VlmsecError(
                f"attack {attack!r} has no trigger: it perturbs tuning images of one concept toward another's "
                "features and tests on clean images; run it from a config (list it under `attacks`)"
            )
        pixels = load_image(image)
        if type(chosen).prepare is not Attack.prepare:
            from vlmsec.experiments.config import load_config
            from vlmsec.experiments.runner import Runner
            from vlmsec.experiments.splits import build_splits

            experiment = load_config(config)
            runner = Runner(experiment, out_dir=out.parent, cache_dir=cache)
            splits = build_splits(experiment)
            runner.prepare_attack(chosen, splits, runner.base_victim(splits))
        triggered = tensor_to_images(chosen.trigger_images(images_to_tensor([pixels])))[0]
        save_image(triggered, out)
    except VlmsecError as err:
        _fail(err)
    console.print(f"wrote {out} ({pixels.shape[1]}x{pixels.shape[0]})")
    if text is not None:
        typer.echo(chosen.trigger_instructions([text])[0])


@app.command()
def serve(
    target: Annotated[str, typer.Argument(help="A checkpoint folder (a run's checkpoints/<model>, a cache stage), or a config/preset: its base victim after its safety stage.")],
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on (default: this machine only).")] = "127.0.0.1",
    defense: Annotated[
        Optional[list[str]],
        typer.Option("--defense", help="A defense in front (repeatable): purifiers, detectors, a prompt defense (see `vlmsec defenses`)."),
    ] = None,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Stage cache for a config's victim (default: $VLMSEC_CACHE or ~/.cache/vlmsec).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="The model name served (default: the folder's or config's name).")] = None,
    calibration: Annotated[
        Optional[int],
        typer.Option("--calibration", min=1, help="Clean samples a detector's threshold is calibrated on (default: the config's defense.calibration, 100)."),
    ] = None,
) -> None:
    """Serve a victim through an OpenAI-compatible chat-completions endpoint (POST /v1/chat/completions,
    GET /v1/models), its defenses in front: a defended model attacked as a black box."""
    from vlmsec.victims.server import serve as serve_victim

    try:
        serve_victim(target, host, port, defense or [], cache, name, calibration)
    except VlmsecError as err:
        _fail(err)


@app.command()
def scan(
    out: Annotated[Path, typer.Option("--out", help="Scan folder: the study run, card.json, card.md, card/evidence/.")],
    victim: Annotated[
        Optional[str],
        typer.Argument(help="A victim config (YAML or preset) or a saved model's folder; default: the safety-tuned SmolLM2 (smollm2-attacks)."),
    ] = None,
    budget: Annotated[str, typer.Option("--budget", help="quick, standard or full (see the README's `vlmsec scan`).")] = "quick",
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Shared stage cache (default: $VLMSEC_CACHE or ~/.cache/vlmsec).")] = None,
    fail_above: Annotated[
        Optional[list[str]],
        typer.Option("--fail-above", help="CELL=RATE, e.g. white-box/inference/jailbreak=0.2: exit 1 when the cell's rate is above "
                     "RATE or the cell has no measured rate. Repeatable."),
    ] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Study seed (default: the victim config's, so its cached stages are used).")] = None,
    backend: BackendOption = "serial",
    address: AddressOption = None,
    threads_per_task: ThreadsOption = None,
) -> None:
    """Scan one model with the standard battery and write its risk card."""
    from vlmsec.artifacts import check_writable
    from vlmsec.experiments.backends import make_backend
    from vlmsec.experiments.battery import BUDGETS
    from vlmsec.experiments.card import gate_failures, parse_gate
    from vlmsec.experiments.scan import run_scan, victim_config
    from vlmsec.experiments.stages import default_cache_dir

    try:
        if budget not in BUDGETS:
            raise VlmsecError(f"--budget {budget!r}: budgets: {', '.join(BUDGETS)}")
        gates = [parse_gate(text) for text in fail_above or []]
        runs_on = make_backend(backend, address, threads_per_task)
        config = victim_config(victim)
        cache_dir = cache if cache is not None else default_cache_dir()
        check_writable(out, "--out")
        check_writable(cache_dir, "--cache" if cache is not None else "cache folder (the default of --cache, $VLMSEC_CACHE)")
        card = run_scan(config, BUDGETS[budget], out, cache_dir, seed, runs_on)
    except VlmsecError as err:
        _fail(err)
    console.print(f"risk card: {out / 'card.md'}  (numbers: {out / 'card.json'})")
    failures = gate_failures(card, gates)
    for failure in failures:
        console.print(f"[bold red]fail-above:[/] {escape(failure)}", markup=True, highlight=False, soft_wrap=True)
    if failures:
        raise typer.Exit(1)


@app.command()
def compare(
    first: Annotated[Path, typer.Argument(help="A card.json (or the scan folder holding it).")],
    second: Annotated[Path, typer.Argument(help="Another card.json of the same battery version.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the comparison as Markdown here.")] = None,
) -> None:
    """Two risk cards side by side (cards of different battery versions are refused)."""
    from vlmsec.artifacts import write_text_atomic
    from vlmsec.experiments.card import check_comparable, read_card
    from vlmsec.report.card import comparison_rows, render_comparison

    try:
        a, b = read_card(first), read_card(second)
        names = (str(first), str(second))
        check_comparable(a, b, names)
        if out is not None:
            write_text_atomic(out, render_comparison(a, b, names))
    except VlmsecError as err:
        _fail(err)
    table = Table(title=f"risk cards, battery {a['battery_version']}")
    for column in ("cell", f"A: {a['victim']['config']} ({a['budget']})", f"B: {b['victim']['config']} ({b['budget']})", "B − A"):
        table.add_column(column)
    for row in comparison_rows(a, b):
        table.add_row(*row)
    console.print(table)
    if out is not None:
        console.print(f"wrote {out}")


@app.command()
def presets() -> None:
    """List the packaged experiment presets."""
    from vlmsec.experiments.config import preset_names

    for name in preset_names():
        typer.echo(name)


if __name__ == "__main__":
    app()

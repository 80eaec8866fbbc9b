"""How visible each image trigger is to the victim's frozen vision tower.

    python benchmarks/trigger_visibility.py [--preset attacks] [--n 200]

A backdoor can only be planted if the victim can tell triggered from clean images. For
every image attack of the preset this prints, on source-domain test images, the mean
relative change of the tower features the projector sees, ‖f(trigger(x)) − f(x)‖ / ‖f(x)‖,
beside the same figure for a random image from the same set (how different two clean
scenes are), so a trigger's footprint reads against the natural spread. Learned attacks
are prepared against the preset's base victim (cached by any earlier run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlmsec.attacks import create_attack
from vlmsec.attacks.poison import trigger_samples
from vlmsec.experiments.config import load_config
from vlmsec.experiments.runner import Runner
from vlmsec.experiments.splits import build_splits
from vlmsec.victims.llava import LlavaVictim


def relative_change(victim: LlavaVictim, clean: list, changed: list) -> float:
    """Mean over images of ‖f(changed) − f(clean)‖ / ‖f(clean)‖ on the flattened tower features."""
    a = victim.image_features([s.image for s in clean]).flatten(1)
    b = victim.image_features([s.image for s in changed]).flatten(1)
    return float(((b - a).norm(dim=1) / a.norm(dim=1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="attacks")
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    config = load_config(args.preset)
    runner = Runner(config, out_dir=Path("runs") / f"{config.name}-visibility")  # nothing is written there
    splits = build_splits(config)
    base = runner.base_victim(splits)
    victim = LlavaVictim.load(base[0], runner.features)
    test = splits.tests["source"][: args.n]
    shuffled = test[1:] + test[:1]

    table = Table(title=f"trigger footprint in the frozen tower's features ({len(test)} source images)")
    for column in ("trigger", "relative feature change"):
        table.add_column(column)
    table.add_row("another clean scene (reference)", f"{relative_change(victim, test, shuffled):.3f}")
    for spec in config.attacks:
        attack = create_attack(spec.name, **spec.params)
        if attack.modality == "text":
            continue
        runner.prepare_attack(attack, splits, base)
        with torch.no_grad():
            table.add_row(spec.key, f"{relative_change(victim, test, trigger_samples(test, attack)):.3f}")
        for part in attack.partial_triggers():
            if part.modality != "text":
                table.add_row(escape(f"  {spec.key}[{part.name} only]"), f"{relative_change(victim, test, trigger_samples(test, part)):.3f}")
    Console(width=160).print(table)  # wide enough for every column when piped to a file


if __name__ == "__main__":
    main()

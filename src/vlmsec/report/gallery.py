"""The report's gallery: a few clean, triggered and adversarial images with the models' answers.

At the end of a run (`write_gallery`) the first `PER_ATTACK` test samples of each attack are
saved as PNG under `gallery/`: for a backdoor planted in tuning, the clean source image and the
triggered one with the poisoned model's answers to each and the clean model's to the triggered one; for an inference
attack, the request's clean image and the adversarial input crafted from it with the deployed
victim's answers (no attack, attacked). `gallery/gallery.json` holds the image paths and answers
with the run's config hash; `gallery_section` renders it as Markdown (read by `write_report`,
inlined by `report.html`). It shows what the run's records already hold, chosen by position, so
the same run gives the same gallery.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmsec.artifacts import make_temp_dir, write_json_atomic
from vlmsec.data.images import save_image
from vlmsec.errors import VlmsecError
from vlmsec.experiments.inference import NO_ATTACK, InferenceResults, slug
from vlmsec.experiments.plan import CLEAN, TestSets

FOLDER, INDEX = "gallery", "gallery.json"
PER_ATTACK = 3  # samples shown per attack
LONGEST = 240  # characters of a text shown in a gallery cell


def _answers(records: Sequence[dict[str, Any]], *fields: str) -> dict[tuple[Any, ...], str]:
    """Each record's output by the values of `fields` (the first record of each, as the run wrote them)."""
    found: dict[tuple[Any, ...], str] = {}
    for r in records:
        found.setdefault(tuple(r.get(f) for f in fields), r["output"])
    return found


def _backdoor_sections(tests: TestSets, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per attack planted in tuning: its first triggered source samples beside their clean images,
    with the attack's own model's answers to both and the clean model's to the triggered one (the
    triggered prompt too, where the trigger is in the text)."""
    clean_by_id = {s.id: s for s in tests.clean.get("source", [])}
    said = _answers([r for r in records if r.get("domain") == "source" and not r.get("control")], "model", "id", "trigger")
    sections = []
    for (key, domain), triggered in tests.triggered.items():
        if domain != "source":
            continue
        entries = []
        for sample in triggered[:PER_ATTACK]:
            clean = clean_by_id.get(sample.id)
            if clean is None or clean.image is None or sample.image is None:
                continue
            texts = {"prompt, triggered": sample.instruction} if sample.instruction != clean.instruction else {}
            texts[f"{key} model, triggered"] = said.get((key, sample.id, key))
            texts[f"{key} model, clean image"] = said.get((key, sample.id, None))
            texts["clean model, triggered"] = said.get((CLEAN, sample.id, key))
            entries.append({"id": sample.id, "images": {"clean": clean.image, "triggered": sample.image}, "texts": texts})
        if entries:
            sections.append({"attack": key, "kind": "backdoor planted in tuning", "rows": entries})
    return sections


def _inference_sections(results: InferenceResults) -> list[dict[str, Any]]:
    """Per inference attack: its first requests' clean images beside the adversarial inputs, with
    the deployed victim's answers to both (a test-time backdoor: its "neither" and "both keys") and
    the prompt sent where the attack changed it."""
    rows = [r for r in results.records if r.get("model", results.victim) == results.victim]
    by_condition, by_attack = _answers(rows, "attack", "condition", "id"), _answers(rows, "attack", "goal", "id")
    sections = []
    for key, (inputs, requests) in results.inputs.items():
        goal = next((r["goal"] for r in rows if r.get("attack") == key), None)
        entries = []
        for item, request in list(zip(inputs, requests, strict=True))[:PER_ATTACK]:
            if goal == "backdoor":
                before, after = by_condition.get((key, "neither", item.id)), by_condition.get((key, "both keys", item.id))
            else:
                before, after = by_attack.get((NO_ATTACK, goal, item.id)), by_attack.get((key, goal, item.id))
            texts = {"request": request.instruction}
            if item.instruction != request.instruction:  # a text trigger, an injected or typeset prompt
                texts["prompt sent"] = item.instruction
            texts.update({"target": request.target, "no attack": before, "attacked": after})
            entries.append({"id": item.id, "images": {"clean": request.image, "adversarial": item.image}, "texts": texts})
        if entries:
            sections.append({"attack": key, "kind": f"inference attack, {goal or 'unknown'} goal", "rows": entries})
    return sections


def write_gallery(
    out: Path, config_hash: str, tests: TestSets, records: Sequence[dict[str, Any]], inference: InferenceResults | None
) -> Path:
    """Save the run's gallery (see the module docstring) into `out/gallery`, replacing any earlier
    one whole; return the path of its gallery.json."""
    sections = _backdoor_sections(tests, records) + (_inference_sections(inference) if inference is not None else [])
    folder = out / FOLDER
    tmp = make_temp_dir(folder)
    try:
        listed = []
        for n, section in enumerate(sections):
            part = f"{n}-{slug(section['attack'])}"
            rows = []
            for i, row in enumerate(section["rows"]):
                images = {}
                for label, image in row["images"].items():
                    name = f"{i}-{slug(label)}.png"
                    save_image(image, tmp / part / name)
                    images[label] = f"{FOLDER}/{part}/{name}"
                rows.append({"id": row["id"], "images": images, "texts": row["texts"]})
            listed.append({"attack": section["attack"], "kind": section["kind"], "rows": rows})
        write_json_atomic(tmp / INDEX, {"config_hash": config_hash, "sections": listed})
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / INDEX


def _text(value: Any) -> str:
    """A text as one Markdown table cell: whitespace folded, cut to `LONGEST` characters, the
    characters Markdown would read as markup escaped (a model's output is shown as it is)."""
    if value is None:
        return "–"
    text = " ".join(str(value).split())
    if len(text) > LONGEST:
        text = text[: LONGEST - 1] + "…"
    return re.sub(r"([\\`*_\[\]<>|~&])", r"\\\1", text) if text else "(empty)"


def gallery_section(gallery: Any, path: Path, config_hash: str | None) -> list[str]:
    """The report's "Gallery" section from `gallery`, the content of gallery.json at `path`: per
    attack a table of images and answers; a note instead when the gallery belongs to another run;
    nothing when the run had no attack to show."""
    shape = "expected {config_hash, sections: [{attack, kind, rows: [{id, images, texts}]}]}"
    if not isinstance(gallery, dict) or not isinstance(gallery.get("sections"), list):
        raise VlmsecError(f"{path}: {shape}")
    if not gallery["sections"]:
        return []
    lines = ["## Gallery", ""]
    if gallery.get("config_hash") != config_hash:
        return [*lines, f"> {path} was written by another run (config hash {gallery.get('config_hash')!r}, "
                        f"this run's {config_hash!r}): not shown.", ""]
    lines += [f"The first {PER_ATTACK} test samples of each attack, as the run saved them under `{FOLDER}/`, with the answers its models gave.", ""]
    for number, section in enumerate(gallery["sections"]):
        rows = section.get("rows") if isinstance(section, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("images"), dict)
                                                 and isinstance(r.get("texts"), dict) for r in rows):
            raise VlmsecError(f"{path}: sections[{number}]: {shape}")
        images = list(dict.fromkeys(k for r in rows for k in r["images"]))
        texts = list(dict.fromkeys(k for r in rows for k in r["texts"]))
        lines += [f"### {_text(section.get('attack'))} ({_text(section.get('kind'))})", ""]
        lines.append("| sample | " + " | ".join(f"{_text(k)} image" for k in images) + " | " + " | ".join(_text(k) for k in texts) + " |")
        lines.append("|---|" + "---|" * (len(images) + len(texts)))
        for r in rows:
            cells = [f"![{_text(k)}]({r['images'][k]})" if k in r["images"] else "–" for k in images]
            cells += [_text(r["texts"].get(k)) for k in texts]
            lines.append(f"| {_text(r.get('id'))} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines

"""LLaVA-style conversation JSON: the format visual instruction-tuning sets ship in.

    [{"id": "...", "image": "images/xyz.png",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                        {"from": "gpt", "value": "a red circle."}]}]

Image paths are relative to the JSON file's folder. We also write "domains" and
"references" so our own metadata round-trips; LLaVA readers ignore extra keys. Only
single-turn conversations (one human turn, then one gpt turn) map onto a Sample.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlmsec.artifacts import write_json_atomic
from vlmsec.data.images import load_image, save_image
from vlmsec.data.sample import Sample
from vlmsec.errors import VlmsecError

IMAGE_TOKEN = "<image>"
IMAGE_DIR = "images"
# Ids become file names, so they must not contain path separators or start with a dot.
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def write_llava_json(samples: Sequence[Sample], path: str | Path) -> None:
    """Write `samples` as a LLaVA JSON file, each image as `<json dir>/images/<id>.png`.

    The JSON is written last and atomically, so a failure leaves no half-written file.
    """
    path = Path(path)
    _check_ids(path, samples)
    entries = []
    for sample in samples:
        image_ref = f"{IMAGE_DIR}/{sample.id}.png"
        save_image(sample.image, path.parent / image_ref)
        entries.append(
            {
                "id": sample.id,
                "image": image_ref,
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_TOKEN}\n{sample.instruction}"},
                    {"from": "gpt", "value": sample.answer},
                ],
                "domains": dict(sample.domains),
                "references": list(sample.references),
            }
        )
    write_json_atomic(path, entries)


def _check_ids(path: Path, samples: Sequence[Sample]) -> None:
    """Fail before writing anything if an id is not a safe file name or is repeated."""
    seen: set[str] = set()
    for sample in samples:
        if not _SAFE_ID.fullmatch(sample.id):
            raise VlmsecError(f"{path}: sample id {sample.id!r} cannot be a file name (use letters, digits, '_', '.', '-')")
        if sample.id in seen:
            raise VlmsecError(f"{path}: duplicate sample id {sample.id!r}")
        seen.add(sample.id)


def read_llava_json(path: str | Path) -> list[Sample]:
    """Read and validate a LLaVA JSON file; images are loaded as RGB uint8 arrays.

    Every problem raises VlmsecError naming the file, the entry (index and id) and the field.
    """
    path = Path(path)
    entries = _load_json(path)
    if not isinstance(entries, list):
        raise VlmsecError(f"{path}: top level must be a list of entries, got {type(entries).__name__}")
    root = path.parent.resolve()
    seen_ids: set[str] = set()
    return [_read_entry(path, root, index, entry, seen_ids) for index, entry in enumerate(entries)]


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VlmsecError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VlmsecError(f"{path}: cannot read file: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise VlmsecError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc


class _EntryReader:
    """Field checks for one entry; every error names the file, the entry and the field."""

    def __init__(self, path: Path, index: int, entry: Any) -> None:
        self.path, self.index, self.entry = path, index, entry
        self.entry_id: str | None = None

    def fail(self, field: str, problem: str) -> VlmsecError:
        where = f"entry {self.index}" if self.entry_id is None else f"entry {self.index} (id {self.entry_id!r})"
        return VlmsecError(f"{self.path}: {where}: field {field!r}: {problem}")

    def get(self, field: str, kind: type, required: bool = True) -> Any:
        if field not in self.entry:
            if required:
                raise self.fail(field, "missing")
            return None
        value = self.entry[field]
        if not isinstance(value, kind):
            raise self.fail(field, f"expected {kind.__name__}, got {type(value).__name__}")
        return value


def _read_entry(path: Path, root: Path, index: int, entry: Any, seen_ids: set[str]) -> Sample:
    """One validated Sample; `seen_ids` collects ids across entries to catch duplicates."""
    if not isinstance(entry, dict):
        raise VlmsecError(f"{path}: entry {index}: expected an object, got {type(entry).__name__}")
    reader = _EntryReader(path, index, entry)
    entry_id = reader.get("id", str)
    if not entry_id:
        raise reader.fail("id", "empty")
    reader.entry_id = entry_id
    if entry_id in seen_ids:
        raise reader.fail("id", "duplicate id")
    seen_ids.add(entry_id)
    image_ref = reader.get("image", str)
    instruction, answer = _read_conversation(reader, reader.get("conversations", list))
    domains = reader.get("domains", dict, required=False) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in domains.items()):
        raise reader.fail("domains", "expected an object of strings")
    references = reader.get("references", list, required=False) or []
    if not all(isinstance(r, str) for r in references):
        raise reader.fail("references", "expected a list of strings")
    return Sample(
        id=entry_id,
        image=_read_image(reader, root, image_ref),
        instruction=instruction,
        answer=answer,
        domains=domains,
        references=tuple(references),
    )


def _read_conversation(reader: _EntryReader, turns: list[Any]) -> tuple[str, str]:
    """(instruction, answer) from a human turn followed by a gpt turn, image placeholder removed."""
    if len(turns) != 2:
        raise reader.fail(
            "conversations", f"expected one human turn then one gpt turn, got {len(turns)} turns (multi-turn is not supported)"
        )
    values = []
    for position, (turn, speaker) in enumerate(zip(turns, ("human", "gpt"))):
        if not isinstance(turn, dict) or turn.get("from") != speaker or not isinstance(turn.get("value"), str):
            raise reader.fail(
                "conversations", f"turn {position} must be {{'from': {speaker!r}, 'value': <string>}}, got {turn!r:.120}"
            )
        values.append(turn["value"])
    return _strip_image_token(values[0]), values[1]


def _strip_image_token(text: str) -> str:
    """Remove the "<image>" placeholder and the newline that joins it to the instruction."""
    for pattern in (IMAGE_TOKEN + "\n", "\n" + IMAGE_TOKEN, IMAGE_TOKEN):
        if pattern in text:
            return text.replace(pattern, "", 1)
    return text


def _read_image(reader: _EntryReader, root: Path, image_ref: str) -> np.ndarray:
    image_path = (root / image_ref).resolve()
    if not image_path.is_relative_to(root):
        raise reader.fail("image", f"{image_ref!r} resolves outside the JSON file's folder {root}")
    if not image_path.is_file():
        raise reader.fail("image", f"image file {image_path} not found")
    try:
        return load_image(image_path)
    except VlmsecError as exc:
        raise reader.fail("image", str(exc)) from exc

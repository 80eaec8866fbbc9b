"""LLaVA-style conversation JSON: the format visual instruction-tuning sets ship in.

    [{"id": "...", "image": "images/xyz.png",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                        {"from": "gpt", "value": "a red circle."}]}]

Image paths are relative to the JSON file's folder (or `image_root`: LLaVA-Instruct names
COCO files). We also write "domains" and "references" so our own metadata round-trips;
LLaVA readers ignore extra keys. A Sample is one human turn and its gpt answer: by default
a conversation must be exactly that (`turns: single`); multi-turn sets such as
LLaVA-Instruct-150K are read with `turns: first` (the first pair, the rest counted as
ignored) or `turns: all` (one sample per pair, ids `<id>-t<k>` after the first).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from vlmsec.artifacts import write_json_atomic
from vlmsec.data.images import save_image
from vlmsec.data.reading import DataStats, FolderOptions, ImageReader, collect, load_json, resolve_root
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


class LlavaOptions(FolderOptions):
    """Options of the LLaVA conversation JSON reader."""

    turns: Literal["single", "first", "all"] = Field(
        "single", description="single: one human/gpt pair per entry; first: the first pair; all: a sample per pair"
    )


def read_llava_json(
    path: str | Path, options: LlavaOptions | None = None, stats: DataStats | None = None
) -> list[Sample]:
    """Read and validate a LLaVA JSON file; images are loaded as RGB uint8 arrays.

    Every problem raises VlmsecError naming the file, the entry (index and id) and the field;
    `stats` (if given) collects conversions and skipped entries.
    """
    path = Path(path)
    options = options if options is not None else LlavaOptions()
    stats = stats if stats is not None else DataStats(str(path), "llava")
    entries = load_json(path)
    if not isinstance(entries, list):
        raise VlmsecError(f"{path}: top level must be a list of entries, got {type(entries).__name__}")
    images = ImageReader(resolve_root(path, options.image_root), options, stats)
    return collect(_entry_builds(path, entries, images, options), options, stats)


def _entry_builds(
    path: Path, entries: list[Any], images: ImageReader, options: LlavaOptions
) -> Iterator[Callable[[], list[Sample]]]:
    seen_ids: set[str] = set()
    for index, entry in enumerate(entries):
        yield lambda index=index, entry=entry: _read_entry(path, images, options, index, entry, seen_ids)


class _EntryReader:
    """Field checks for one entry; every error names the file, the entry and the field."""

    def __init__(self, path: Path, index: int, entry: Any) -> None:
        self.path, self.index, self.entry = path, index, entry
        self.entry_id: str | None = None

    @property
    def where(self) -> str:
        """File and entry, for messages: "<file>: entry 3 (id 'abc')"."""
        entry = f"entry {self.index}" if self.entry_id is None else f"entry {self.index} (id {self.entry_id!r})"
        return f"{self.path}: {entry}"

    def fail(self, field: str, problem: str) -> VlmsecError:
        return VlmsecError(f"{self.where}: field {field!r}: {problem}")

    def get(self, field: str, kind: type, required: bool = True) -> Any:
        if field not in self.entry:
            if required:
                raise self.fail(field, "missing")
            return None
        value = self.entry[field]
        if not isinstance(value, kind):
            raise self.fail(field, f"expected {kind.__name__}, got {type(value).__name__}")
        return value


def _read_entry(
    path: Path, images: ImageReader, options: LlavaOptions, index: int, entry: Any, seen_ids: set[str]
) -> list[Sample]:
    """The validated Samples of one entry; `seen_ids` collects ids across entries to catch duplicates."""
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
    image_ref = reader.get("image", str, required=False)
    pairs = _read_conversation(reader, reader.get("conversations", list), options.turns)
    domains = reader.get("domains", dict, required=False) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in domains.items()):
        raise reader.fail("domains", "expected an object of strings")
    references = reader.get("references", list, required=False) or []
    if not all(isinstance(r, str) for r in references):
        raise reader.fail("references", "expected a list of strings")
    image = images.from_file(image_ref, f"{reader.where}: field 'image'")
    if options.turns == "first" and len(reader.entry["conversations"]) > 2:
        images.stats.ignored["later turns"] += 1
    return [
        Sample(
            id=entry_id if k == 0 else f"{entry_id}-t{k}",
            image=image,
            instruction=instruction,
            answer=answer,
            domains=domains,
            references=tuple(references) if k == 0 else (),
        )
        for k, (instruction, answer) in enumerate(pairs)
    ]


def _read_conversation(reader: _EntryReader, turns: list[Any], mode: str) -> list[tuple[str, str]]:
    """(instruction, answer) pairs from alternating human and gpt turns, image placeholder removed."""
    if mode == "single" and len(turns) != 2:
        raise reader.fail(
            "conversations",
            f"expected one human turn then one gpt turn, got {len(turns)} turns "
            "(multi-turn: set option turns to 'first' or 'all')",
        )
    if len(turns) < 2 or (mode == "all" and len(turns) % 2):
        raise reader.fail("conversations", f"expected human/gpt turn pairs, got {len(turns)} turns")
    checked = turns[:2] if mode == "first" else turns
    values = []
    for position, turn in enumerate(checked):
        speaker = ("human", "gpt")[position % 2]
        if not isinstance(turn, dict) or turn.get("from") != speaker or not isinstance(turn.get("value"), str):
            raise reader.fail(
                "conversations", f"turn {position} must be {{'from': {speaker!r}, 'value': <string>}}, got {turn!r:.120}"
            )
        values.append(turn["value"])
    return [(strip_image_token(values[i]), values[i + 1]) for i in range(0, len(values), 2)]


def strip_image_token(text: str) -> str:
    """Remove the "<image>" placeholder and the newline that joins it to the instruction."""
    for pattern in (IMAGE_TOKEN + "\n", "\n" + IMAGE_TOKEN, IMAGE_TOKEN):
        if pattern in text:
            return text.replace(pattern, "", 1)
    return text

"""Hugging Face data sets on disk: a `save_to_disk` folder, or local parquet files.

A row needs an image column (an `Image` feature, i.e. {"bytes", "path"}, or encoded bytes,
or a path) and an answer column (a string, or a list of captions: the first is the answer,
all are references). An instruction/question column is optional: without one, rows are
captions and get an instruction from a bank, as with COCO. Columns are found by their
feature type and usual names, or set by option. Images are decoded by vlmsec, never by
`datasets`, so conversions are counted and image paths stay inside `image_root`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from vlmsec.data.llava_json import strip_image_token
from vlmsec.data.reading import CaptionOptions, DataStats, FolderOptions, ImageReader, collect, parse_json, resolve_root
from vlmsec.data.sample import Sample
from vlmsec.errors import VlmsecError

# Usual column names, most specific first.
IMAGE_NAMES = ("image", "img", "images", "picture", "image_path", "file_name", "filename")
INSTRUCTION_NAMES = ("instruction", "question", "prompt", "query", "input")
ANSWER_NAMES = ("answer", "caption", "captions", "response", "output", "answers", "text", "sentences_raw")
# Not image ids: several rows (questions) may share an image.
ID_NAMES = ("id", "sample_id", "question_id")
# Keys that hold the text when an answer column holds objects (e.g. [{"raw": ...}]).
TEXT_KEYS = ("raw", "text", "answer", "caption")
SPLIT_NAMES = ("train", "validation", "val", "dev", "test", "restval")
BATCH_ROWS = 256


class HuggingFaceOptions(FolderOptions, CaptionOptions):
    """Options of the Hugging Face (save_to_disk / parquet) reader."""

    split: list[str] | None = Field(
        None,
        description="split(s) of a DatasetDict, or of hub-style parquet names (train-00000-of-00001.parquet); "
        "needed when there are several",
    )
    image_column: str | None = Field(None, description="default: the Image feature, else a usual name (image, img, ...)")
    instruction_column: str | None = Field(None, description="default: instruction, question, prompt, ...; none: captions")
    answer_column: str | None = Field(None, description="default: answer, caption(s), response, output, ...")
    id_column: str | None = Field(None, description="default: id, sample_id or question_id; none: name-split-row")

    @field_validator("split", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class _Columns:
    """Which column plays which part, from options, feature types and usual names."""

    def __init__(self, source: Path, schema: pa.Schema, features: dict[str, Any], options: HuggingFaceOptions) -> None:
        names = list(schema.names)

        def pick(option: str, given: str | None, preferred: list[str], usual: tuple[str, ...]) -> str | None:
            if given is not None:
                if given not in names:
                    raise VlmsecError(f"{source}: option {option!r}: no column {given!r}; columns: {', '.join(names)}")
                return given
            return next((n for n in [*preferred, *usual] if n in names), None)

        image_typed = [n for n in names if _is_image_feature(features.get(n)) or _is_image_struct(schema.field(n).type)]
        self.image = pick("image_column", options.image_column, image_typed, IMAGE_NAMES)
        self.instruction = pick("instruction_column", options.instruction_column, [], INSTRUCTION_NAMES)
        self.answer = pick("answer_column", options.answer_column, [], ANSWER_NAMES)
        self.id = pick("id_column", options.id_column, [], ID_NAMES)
        for part, column in (("image", self.image), ("answer", self.answer)):
            if column is None:
                raise VlmsecError(f"{source}: no {part} column found; set option '{part}_column' (columns: {', '.join(names)})")


def _is_image_feature(feature: Any) -> bool:
    return isinstance(feature, dict) and feature.get("_type") == "Image"


def _is_image_struct(kind: pa.DataType) -> bool:
    return pa.types.is_struct(kind) and {kind.field(i).name for i in range(kind.num_fields)} >= {"bytes", "path"}


def read_huggingface(path: Path, options: HuggingFaceOptions, stats: DataStats) -> list[Sample]:
    """Rows of a save_to_disk folder or parquet file(s) as samples."""
    parts = _parts(path, options.split)
    images = ImageReader(resolve_root(path, options.image_root), options, stats)
    name = path.stem if path.is_file() else path.name
    return collect(_builds(name, parts, images, options), options, stats)


@dataclass(frozen=True)
class _Part:
    """A readable piece of a data set: one parquet file, or one split of a save_to_disk folder."""

    source: Path
    split: str | None
    schema: pa.Schema
    features: dict[str, Any]  # Hugging Face features as JSON ({"image": {"_type": "Image"}, ...})
    batches: Callable[[], Iterator[list[dict[str, Any]]]]


def _parts(path: Path, splits: list[str] | None) -> list[_Part]:
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _disk_parts(path, splits)
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise VlmsecError(f"{path}: neither a save_to_disk folder (state.json, dataset_dict.json) nor parquet files")
    by_split: dict[str | None, list[Path]] = {}
    for file in files:
        by_split.setdefault(_split_of(file), []).append(file)
    named = sorted(s for s in by_split if s is not None)
    if splits is None:
        if len(named) > 1:
            raise VlmsecError(f"{path}: several splits ({', '.join(named)}); set option 'split'")
        chosen = list(by_split)
    else:
        missing = [s for s in splits if s not in by_split]
        if missing:
            found = ", ".join(named) or "no split names"
            raise VlmsecError(f"{path}: option 'split': no parquet files for {', '.join(map(repr, missing))}; found: {found}")
        chosen = list(splits)
    return [_parquet_part(file, split) for split in chosen for file in by_split[split]]


def _split_of(file: Path) -> str | None:
    """The split a hub-style parquet file belongs to: `test-00000-of-00001.parquet` or `test/…`."""
    for name in (file.name.split("-")[0].split(".")[0], file.parent.name):
        if name in SPLIT_NAMES:
            return name
    return None


def _parquet_part(file: Path, split: str | None) -> _Part:
    try:
        parquet = pq.ParquetFile(file)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise VlmsecError(f"{file}: cannot read parquet: {exc}") from exc
    schema = parquet.schema_arrow
    metadata = parse_json((schema.metadata or {}).get(b"huggingface", b"{}"), f"{file}: huggingface metadata")
    features = metadata.get("info", {}).get("features", {})

    def batches() -> Iterator[list[dict[str, Any]]]:
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
            yield batch.to_pylist()

    return _Part(file, split, schema, features, batches)


def _disk_parts(path: Path, splits: list[str] | None) -> list[_Part]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except (OSError, ValueError, KeyError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise VlmsecError(f"{path}: cannot load save_to_disk data set: {exc}") from exc
    if isinstance(loaded, DatasetDict):
        if splits is None and len(loaded) > 1:
            raise VlmsecError(f"{path}: several splits ({', '.join(loaded)}); set option 'split'")
        chosen = splits if splits is not None else list(loaded)
        missing = [s for s in chosen if s not in loaded]
        if missing:
            raise VlmsecError(f"{path}: option 'split': no split {', '.join(map(repr, missing))}; splits: {', '.join(loaded)}")
        datasets: list[tuple[str | None, Dataset]] = [(s, loaded[s]) for s in chosen]
    else:
        datasets = [(None, loaded)]

    def part(split: str | None, dataset: Dataset) -> _Part:
        arrow = dataset.with_format("arrow")

        def batches() -> Iterator[list[dict[str, Any]]]:
            for table in arrow.iter(batch_size=BATCH_ROWS):
                yield table.to_pylist()

        return _Part(path, split, arrow.data.schema, dataset.features.to_dict(), batches)

    return [part(split, dataset) for split, dataset in datasets]


def _builds(
    name: str, parts: list[_Part], images: ImageReader, options: HuggingFaceOptions
) -> Iterator[Callable[[], list[Sample]]]:
    split_rows: dict[str | None, int] = {}  # rows seen per split, across its files: fallback ids stay unique
    for part in parts:
        columns = _Columns(part.source, part.schema, part.features, options)
        row_number = 0
        for rows in part.batches():
            for row in rows:
                number = split_rows.get(part.split, 0)
                fallback_id = f"{name}-{part.split}-{number}" if part.split else f"{name}-{number}"
                where = f"{part.source}: {f'split {part.split!r} ' if part.split else ''}row {row_number}"
                yield lambda row=row, fallback_id=fallback_id, where=where, split=part.split, columns=columns: [
                    _sample(where, name, split, fallback_id, row, columns, images, options)
                ]
                split_rows[part.split] = number + 1
                row_number += 1


def _sample(
    where: str,
    name: str,
    split: str | None,
    fallback_id: str,
    row: dict[str, Any],
    columns: _Columns,
    images: ImageReader,
    options: HuggingFaceOptions,
) -> Sample:
    row_id = row.get(columns.id) if columns.id is not None else None
    sample_id = str(row_id) if isinstance(row_id, (str, int)) and str(row_id) else fallback_id
    where = f"{where} (id {sample_id!r})"
    answers = _texts(where, columns.answer, row.get(columns.answer))
    domains = {"dataset": name} | ({"split": split} if split else {})
    if columns.instruction is not None:
        instruction = row.get(columns.instruction)
        if not isinstance(instruction, str):
            raise VlmsecError(f"{where}: column {columns.instruction!r}: expected a string, got {type(instruction).__name__}")
        instruction = strip_image_token(instruction)
    else:
        instruction = options.instruction_for(sample_id)
        domains["text"] = options.instruction_source
    return Sample(
        id=sample_id,
        image=_image(where, columns.image, row.get(columns.image), images),
        instruction=instruction,
        answer=answers[0],
        domains=domains,
        references=tuple(answers),
    )


def _image(where: str, column: str, value: Any, images: ImageReader) -> np.ndarray:
    """Decode an image cell: {"bytes", "path"}, bytes, a path, or a list of those (the first is used)."""
    where = f"{where}: column {column!r}"
    if isinstance(value, list):
        if len(value) > 1:
            images.stats.ignored["extra images"] += 1
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes) and value:
        return images.from_bytes(value, where)
    if isinstance(value, str) or value is None or value == b"":
        return images.from_file(value or None, where)
    raise VlmsecError(f"{where}: expected an image (bytes, path or {{'bytes', 'path'}}), got {type(value).__name__}")


def _texts(where: str, column: str, value: Any) -> list[str]:
    """The answer and references of an answer cell: a string, or a list of strings or of text objects."""
    items = value if isinstance(value, list) else [value]
    texts = []
    for item in items:
        if isinstance(item, dict):
            item = next((item[k] for k in TEXT_KEYS if isinstance(item.get(k), str)), None)
        if isinstance(item, str) and item.strip():
            texts.append(item.strip())
    if not texts:
        raise VlmsecError(f"{where}: column {column!r}: expected a non-empty text or list of texts, got {value!r:.80}")
    return texts

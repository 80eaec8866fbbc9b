"""MIMIC-IT instruction sets (Otter's format), e.g. LADD, the set the seed paper tuned on.

Two files per set. The instruction file (`LADD_instructions.json`):

    {"meta": {"version": ..., "time": ..., "author": ...},
     "data": {"LA_INS_00001": {"instruction": "...", "answer": "...",
                               "image_ids": ["LA_IMG_000000391895"], "rel_ins_ids": [...]}}}

and the images, id -> base64-encoded JPEG/PNG: a JSON object (`LA.json`, the first releases)
or a parquet file with a "base64" column indexed by id (`LA.parquet`, the later ones).
A sample is one instruction with its first image; `rel_ins_ids` (in-context examples) are
not used, and extra images of multi-image entries are counted as ignored.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from pydantic import Field

from vlmsec.data.reading import (
    IMAGE_NOT_FOUND,
    NO_IMAGE,
    UNREADABLE_IMAGE,
    DataStats,
    ImageReader,
    MissingImage,
    ReadOptions,
    collect,
    load_json,
    parse_json,
)
from vlmsec.data.sample import Sample
from vlmsec.errors import VlmsecError
from vlmsec.inputs import PathInput

ID_COLUMNS = ("id", "image_id", "key")
_URL_SAFE_TO_STANDARD = str.maketrans("-_", "+/")


class MimicitOptions(ReadOptions):
    """Options of the MIMIC-IT reader."""

    images_file: PathInput | None = Field(
        None,
        description="id -> base64 images (.json or .parquet), relative to the instruction file's folder; "
        "default: found beside it from the image ids' prefix (LA.parquet, LA.json, LA_images.json, ...)",
    )


def read_mimicit(path: Path, options: MimicitOptions, stats: DataStats) -> list[Sample]:
    """One sample per instruction, its image decoded from the base64 images file."""
    document = load_json(path)
    if not isinstance(document, dict) or not isinstance(document.get("data"), dict):
        raise VlmsecError(f"{path}: expected a MIMIC-IT instruction file, an object with a 'data' object")
    entries: dict[str, Any] = document["data"]
    images_file = _images_file(path, entries, options.images_file)
    wanted = {ids[0] for e in entries.values() if isinstance(e, dict) and isinstance(ids := e.get("image_ids"), list) and ids}
    encoded = _load_images(images_file, wanted)
    subset = path.stem.removesuffix("_instructions")
    images = ImageReader(path.parent, options, stats)
    builds = _builds(path, subset, entries, encoded, images_file, images)
    return collect(builds, options, stats)


def _builds(
    path: Path, subset: str, entries: dict[str, Any], encoded: Mapping[str, str | bytes], images_file: Path, images: ImageReader
) -> Iterator[Callable[[], list[Sample]]]:
    for key, entry in entries.items():
        yield lambda key=key, entry=entry: [_sample(path, subset, key, entry, encoded, images_file, images)]


def _sample(
    path: Path, subset: str, key: str, entry: Any, encoded: Mapping[str, str | bytes], images_file: Path, images: ImageReader
) -> Sample:
    where = f"{path}: entry {key!r}"
    if not isinstance(entry, dict):
        raise VlmsecError(f"{where}: expected an object, got {type(entry).__name__}")
    texts = {}
    for field in ("instruction", "answer"):
        if not isinstance(entry.get(field), str):
            raise VlmsecError(f"{where}: field {field!r}: expected a string, got {type(entry.get(field)).__name__}")
        texts[field] = entry[field]
    image_ids = entry.get("image_ids")
    if not isinstance(image_ids, list) or not all(isinstance(i, str) for i in image_ids):
        raise VlmsecError(f"{where}: field 'image_ids': expected a list of image ids")
    if not image_ids:
        raise MissingImage(f"{where}: field 'image_ids': empty, the entry has no image", NO_IMAGE)
    if len(image_ids) > 1:
        images.stats.ignored["extra images"] += 1
    image_id = image_ids[0]
    if image_id not in encoded:
        raise MissingImage(f"{where}: field 'image_ids': image {image_id!r} not in {images_file}", IMAGE_NOT_FOUND)
    image_where = f"{where}: image {image_id!r}"
    return Sample(
        id=key,
        image=images.from_bytes(_decoded_bytes(encoded[image_id], image_where), image_where),
        instruction=texts["instruction"],
        answer=texts["answer"],
        domains={"dataset": "mimicit", "subset": subset},
    )


def _decoded_bytes(value: str | bytes, where: str) -> bytes:
    """Raw image bytes from base64 in either alphabet (Otter writes the URL-safe one; parquet may hold bytes)."""
    if isinstance(value, bytes):
        return value
    try:
        return base64.b64decode("".join(value.split()).translate(_URL_SAFE_TO_STANDARD), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MissingImage(f"{where}: not valid base64: {exc}", UNREADABLE_IMAGE) from exc


def _images_file(path: Path, entries: dict[str, Any], configured: Path | None) -> Path:
    """The configured images file, or the one beside the instruction file named after the ids' prefix."""
    if configured is not None:
        images_file = path.parent / configured
        if not images_file.is_file():
            raise VlmsecError(f"{path}: option 'images_file': {images_file} not found")
        return images_file
    prefixes = [path.stem.removesuffix("_instructions")]
    for entry in entries.values():
        ids = entry.get("image_ids") if isinstance(entry, dict) else None
        if isinstance(ids, list) and ids and isinstance(ids[0], str) and "_IMG_" in ids[0]:
            prefixes.insert(0, ids[0].split("_IMG_")[0])
            break
    suffixes = (".parquet", "_images.parquet", ".json", "_images.json")
    candidates = [path.parent / f"{prefix}{suffix}" for prefix in prefixes for suffix in suffixes]
    for candidate in candidates:
        if candidate.is_file() and candidate != path:
            return candidate
    raise VlmsecError(
        f"{path}: no images file beside it (looked for {', '.join(c.name for c in candidates)}); set option 'images_file'"
    )


def _load_images(images_file: Path, wanted: set[str]) -> Mapping[str, str | bytes]:
    """id -> base64 (or raw bytes) for the `wanted` ids; a JSON file is read whole."""
    if images_file.suffix == ".parquet":
        return _load_parquet_images(images_file, wanted)
    images = load_json(images_file)
    if not isinstance(images, dict):
        raise VlmsecError(f"{images_file}: expected an object of image id -> base64 string")
    for image_id in wanted & images.keys():
        if not isinstance(images[image_id], str):
            kind = type(images[image_id]).__name__
            raise VlmsecError(f"{images_file}: image {image_id!r}: expected a base64 string, got {kind}")
    return images


def _load_parquet_images(images_file: Path, wanted: set[str]) -> dict[str, str | bytes]:
    """Rows of a parquet images file whose id is wanted: id from the pandas index or an id column."""
    if not wanted:
        return {}
    try:
        schema = pq.read_schema(images_file)
        pandas_metadata = parse_json((schema.metadata or {}).get(b"pandas", b"{}"), f"{images_file}: pandas metadata")
        pandas_index = [c for c in pandas_metadata.get("index_columns", []) if isinstance(c, str)]
        id_column = next((c for c in [*pandas_index, *ID_COLUMNS] if c in schema.names), None)
        data_column = "base64" if "base64" in schema.names else next((c for c in schema.names if c != id_column), None)
        if id_column is None or data_column is None:
            raise VlmsecError(
                f"{images_file}: expected an image id index or column ({', '.join(ID_COLUMNS)}) and a base64 column; "
                f"has {', '.join(schema.names)}"
            )
        table = pq.read_table(images_file, columns=[id_column, data_column], filters=[(id_column, "in", sorted(wanted))])
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise VlmsecError(f"{images_file}: cannot read parquet: {exc}") from exc
    ids, data = table.column(id_column).to_pylist(), table.column(data_column).to_pylist()
    return {str(i): d for i, d in zip(ids, data) if isinstance(d, (str, bytes))}

"""Every data-set format vlmsec reads, by name, and `read_dataset`, which can tell them apart.

    read_dataset("coco/dataset_coco.json", split="test", image_root="images", limit=500)

| name | what |
|---|---|
| `llava` | LLaVA conversation JSON (also LLaVA-Instruct, multi-turn with `turns`) |
| `karpathy` | COCO / Flickr30K captions in Karpathy's split JSON + image folder |
| `mimicit` | MIMIC-IT instruction JSON (e.g. LADD) + base64 images (.json or .parquet) |
| `huggingface` | a `save_to_disk` folder or local parquet file(s) |

Options are typed per format (pydantic models, unknown names are errors); every format
takes `on_missing`, `alpha`, `image_size` and `limit` (see `vlmsec.data.reading`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import ValidationError

from vlmsec.data.hf import HuggingFaceOptions, read_huggingface
from vlmsec.data.karpathy import KarpathyOptions, read_karpathy
from vlmsec.data.llava_json import LlavaOptions, read_llava_json
from vlmsec.data.mimicit import MimicitOptions, read_mimicit
from vlmsec.data.reading import DataStats, ReadOptions
from vlmsec.data.sample import Sample
from vlmsec.errors import VlmsecError, validation_errors
from vlmsec.registry import Registry

AUTO = "auto"
SNIFF_BYTES = 65536  # enough of a JSON file to see its first entry's keys


@dataclass(frozen=True)
class DataFormat:
    """A registered format: its options model and its reader."""

    options: type[ReadOptions]
    read: Callable[[Path, Any, DataStats], list[Sample]]
    description: str


FORMATS: Registry[DataFormat] = Registry("data format")
FORMATS.register(DataFormat(LlavaOptions, read_llava_json, "LLaVA conversation JSON: [{id, image, conversations}]"), name="llava")
FORMATS.register(DataFormat(KarpathyOptions, read_karpathy, "COCO / Flickr30K Karpathy split JSON and an image folder"), name="karpathy")
FORMATS.register(DataFormat(MimicitOptions, read_mimicit, "MIMIC-IT instruction JSON and its base64 images file"), name="mimicit")
FORMATS.register(DataFormat(HuggingFaceOptions, read_huggingface, "Hugging Face save_to_disk folder or parquet file(s)"), name="huggingface")


class DataSet(NamedTuple):
    """What a read returns: the samples, and what reading them converted or skipped."""

    samples: list[Sample]
    stats: DataStats


def read_dataset(path: str | Path, format: str | None = None, **options: Any) -> DataSet:
    """Read a data set in any registered format (`None`/"auto": told apart by content).

    Every problem raises VlmsecError naming the file, and the entry and field where there is one.
    """
    path = Path(path)
    if not path.exists():
        raise VlmsecError(f"{path}: file not found")
    name = detect_format(path) if format in (None, AUTO) else format
    if name not in FORMATS:
        raise VlmsecError(f"{path}: unknown data format {name!r}; known: {', '.join(FORMATS.names())}")
    try:
        parsed = FORMATS[name].options.model_validate(options)
    except ValidationError as err:
        raise VlmsecError(f"{path}: {name} options: {_option_errors(err)}") from None
    stats = DataStats(str(path), name)
    samples = FORMATS[name].read(path, parsed, stats)
    if not samples:
        skipped = ", ".join(f"{n} {reason}" for reason, n in stats.skipped.items())
        raise VlmsecError(f"{path}: no samples read" + (f" (skipped: {skipped})" if skipped else ""))
    return DataSet(samples, stats)


def detect_format(path: Path) -> str:
    """The format of a data file, from what it holds: folders and parquet are Hugging Face,
    JSON is told apart by the keys of its first entry."""
    if path.is_dir() or path.suffix == ".parquet":
        return "huggingface"
    try:
        with path.open("rb") as fh:
            head = fh.read(SNIFF_BYTES).decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    except OSError as exc:
        raise VlmsecError(f"{path}: cannot read file: {exc}") from exc
    if head.startswith("[") and '"conversations"' in head:
        return "llava"
    if head.startswith("{") and '"image_ids"' in head and '"data"' in head:
        return "mimicit"
    if head.startswith("{") and '"sentences"' in head and '"images"' in head:
        return "karpathy"
    raise VlmsecError(f"{path}: cannot tell the data format from its content; set the format to one of {', '.join(FORMATS.names())}")


def check_options(format: str, options: Mapping[str, Any]) -> None:
    """Validate reader options before a run (ValueError naming the option).

    With format "auto" each option must belong to some format and be valid there; options a
    format requires (a Karpathy split) are checked when the file is read.
    """
    if format != AUTO and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; known: {AUTO}, {', '.join(FORMATS.names())}")
    candidates = FORMATS.values() if format == AUTO else [FORMATS[format]]
    for key, value in options.items():
        models = [f.options for f in candidates if key in f.options.model_fields]
        if not models:
            known = sorted({k for f in candidates for k in f.options.model_fields})
            raise ValueError(f"unknown option {key!r} for format {format}; known: {', '.join(known)}")
        try:
            models[0].model_validate({key: value})
        except ValidationError as err:
            raise ValueError(_option_errors(err)) from None


def _option_errors(err: ValidationError) -> str:
    return "; ".join(f"option {where!r}: {message}" for where, message in validation_errors(err))

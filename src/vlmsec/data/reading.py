"""What every data-set reader shares: typed options, images read inside a data folder, counts.

A reader turns each entry of its format into a `build` callable returning that entry's
samples; `collect` calls them in order, applies the `on_missing` policy and the `limit`,
and fills a `DataStats` with what was converted, skipped or ignored. Entries are built
lazily, so a `limit` on a large data set never decodes the images it does not keep.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field, field_validator

from vlmsec.data.images import decode_image
from vlmsec.data.sample import Sample
from vlmsec.data.scenes import ANSWER_STYLES, INSTRUCTION_BANKS
from vlmsec.errors import VlmsecError
from vlmsec.inputs import STRICT_INPUT, PathInput, Seed

# Why an entry was skipped (on_missing: skip); the keys of DataStats.skipped.
NO_IMAGE = "no image"
IMAGE_NOT_FOUND = "image file not found"
OUTSIDE_DATA_FOLDER = "image outside the data folder"
UNREADABLE_IMAGE = "unreadable image"

EXAMPLES_KEPT = 5  # skipped entries named in data.json, so a user can look at a few


class ReadOptions(BaseModel):
    """Options every reader takes."""

    model_config = STRICT_INPUT

    on_missing: Literal["error", "skip"] = Field(
        "error",
        description="an entry whose image is absent, not found, unreadable or outside the data folder: stop, or skip and count it",
    )
    alpha: Literal["white", "drop"] = Field(
        "white", description="transparent images: composite on white, or drop the alpha channel as LLaVA's loader does"
    )
    image_size: int | None = Field(
        None, ge=8, le=4096, description="resize every image to this square (as the victim's tower does); bounds memory"
    )
    limit: int | None = Field(None, ge=1, description="keep the first N samples")


class FolderOptions(ReadOptions):
    """Options of readers whose entries name image files."""

    image_root: PathInput | None = Field(
        None,
        description="folder image paths are relative to and must stay inside; relative to the data set's folder (default)",
    )


class CaptionOptions(BaseModel):
    """Options of readers that pair captions with an instruction from a bank."""

    model_config = STRICT_INPUT

    instructions: str | list[str] = Field(
        "source", description="a caption instruction bank of vlmsec.data.scenes (source, paraphrased) or a list of instructions"
    )
    seed: Seed = Field(0, description="which instruction each image gets (a hash of seed and sample id)")

    @field_validator("instructions")
    @classmethod
    def _known_bank(cls, value: str | list[str]) -> str | list[str]:
        captions = ", ".join(name for name, style in ANSWER_STYLES.items() if style == "caption")
        if isinstance(value, str) and value not in INSTRUCTION_BANKS:
            raise ValueError(f"unknown instruction bank {value!r}; known: {captions} (or give a list)")
        if isinstance(value, str) and ANSWER_STYLES[value] != "caption":
            raise ValueError(f"instruction bank {value!r} asks for {ANSWER_STYLES[value]} answers, not captions; use {captions}")
        if isinstance(value, list) and not (value and all(text.strip() for text in value)):
            raise ValueError("needs at least one non-empty instruction")
        return value

    def instruction_for(self, sample_id: str) -> str:
        """The instruction `sample_id` gets: fixed by seed and id, the same on every read."""
        bank = INSTRUCTION_BANKS[self.instructions] if isinstance(self.instructions, str) else self.instructions
        return bank[zlib.crc32(f"{self.seed}:{sample_id}".encode()) % len(bank)]

    @property
    def instruction_source(self) -> str:
        """The bank's name, for the samples' "text" domain tag ("custom" for a list)."""
        return self.instructions if isinstance(self.instructions, str) else "custom"


@dataclass
class DataStats:
    """What reading one data file did: samples kept, images converted, entries skipped or trimmed."""

    file: str
    format: str
    samples: int = 0
    converted: Counter[str] = field(default_factory=Counter)  # conversion kind -> images
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> entries
    ignored: Counter[str] = field(default_factory=Counter)  # what was left out of kept entries -> entries
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, problem: MissingImage) -> None:
        self.skipped[problem.reason] += 1
        if len(self.skipped_examples) < EXAMPLES_KEPT:
            self.skipped_examples.append(str(problem))

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "format": self.format,
            "samples": self.samples,
            "converted": dict(sorted(self.converted.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "ignored": dict(sorted(self.ignored.items())),
            "skipped_examples": list(self.skipped_examples),
        }


class MissingImage(VlmsecError):
    """An entry's image cannot be had; `on_missing: skip` skips the entry instead of stopping."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ImageReader:
    """Reads images for one data file: paths confined to `root`, conversions counted, resizing."""

    def __init__(self, root: Path, options: ReadOptions, stats: DataStats) -> None:
        self.root = root.resolve()
        self.options = options
        self.stats = stats

    def from_file(self, reference: str | None, where: str) -> np.ndarray:
        """The image at `reference` (relative to the root, or absolute inside it); `where` names entry and field."""
        if not reference:
            raise MissingImage(f"{where}: missing", NO_IMAGE)
        try:
            path = (self.root / reference).resolve()
        except (OSError, ValueError) as exc:  # e.g. a NUL byte in the path
            raise MissingImage(f"{where}: {reference!r} is not a usable path: {exc}", IMAGE_NOT_FOUND) from exc
        if not path.is_relative_to(self.root):
            raise MissingImage(f"{where}: {reference!r} resolves outside the data folder {self.root}", OUTSIDE_DATA_FOLDER)
        if not path.is_file():
            raise MissingImage(f"{where}: image file {path} not found", IMAGE_NOT_FOUND)
        return self._decoded(path, where)

    def from_bytes(self, data: bytes, where: str) -> np.ndarray:
        """An image embedded in the data file as encoded bytes."""
        return self._decoded(data, where)

    def _decoded(self, source: Path | bytes, where: str) -> np.ndarray:
        try:
            image, conversion = decode_image(source, self.options.alpha)
        except VlmsecError as exc:
            raise MissingImage(f"{where}: {exc}", UNREADABLE_IMAGE) from exc
        if conversion is not None:
            self.stats.converted[conversion] += 1
        size = self.options.image_size
        if size is not None and image.shape[:2] != (size, size):
            image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
        return image


def resolve_root(data_path: Path, image_root: Path | None) -> Path:
    """The image folder of a data set: `image_root` (relative to the data set's folder) or that folder.

    The data set's folder is `data_path` itself for a folder data set, else the file's folder.
    """
    folder = data_path if data_path.is_dir() else data_path.parent
    root = folder if image_root is None else folder / image_root
    if not root.is_dir():
        raise VlmsecError(f"{data_path}: option 'image_root': folder {root} not found")
    return root


def load_json(path: Path) -> Any:
    """A JSON file's content; errors name the file (and the line, for bad JSON)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VlmsecError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VlmsecError(f"{path}: cannot read file: {exc}") from exc
    return parse_json(text, str(path))


def parse_json(text: str | bytes, where: str) -> Any:
    """Parsed JSON from a user's file; errors name `where` (and the line, for bad JSON)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise VlmsecError(f"{where}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except RecursionError:
        raise VlmsecError(f"{where}: JSON nested too deeply to read") from None


def collect(builds: Iterable[Callable[[], list[Sample]]], options: ReadOptions, stats: DataStats) -> list[Sample]:
    """Build entries in order until `limit` samples are kept; skip or raise on missing images."""
    samples: list[Sample] = []
    seen: set[str] = set()
    for build in builds:
        if options.limit is not None and len(samples) >= options.limit:
            break
        try:
            built = build()
        except MissingImage as problem:
            if options.on_missing == "error":
                raise
            stats.skip(problem)
            continue
        for sample in built:
            if sample.id in seen:
                raise VlmsecError(f"{stats.file}: sample id {sample.id!r} occurs twice")
            seen.add(sample.id)
        samples += built
    if options.limit is not None:
        del samples[options.limit :]
    stats.samples = len(samples)
    return samples

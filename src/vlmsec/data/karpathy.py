"""COCO and Flickr30K captions in Karpathy's split JSON (dataset_coco.json, dataset_flickr30k.json).

    {"dataset": "coco",
     "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
                 "split": "test", "cocoid": 391895, "imgid": 0,
                 "sentences": [{"raw": "A man riding a bike.", "tokens": [...]}, ...]}]}

Flickr30K entries have no "filepath". Images are `image_root/filepath/filename`. A sample
is one image: its instruction comes from a caption instruction bank, its answer is the
first caption and its references are all of them (COCO has five per image).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from vlmsec.data.reading import CaptionOptions, DataStats, FolderOptions, ImageReader, collect, load_json, resolve_root
from vlmsec.data.sample import Sample
from vlmsec.errors import VlmsecError


class KarpathyOptions(FolderOptions, CaptionOptions):
    """Options of the Karpathy-split caption reader."""

    split: list[str] | None = Field(
        None, description="split(s) to read: train, val, test, restval (a name or a list); required"
    )

    @field_validator("split", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


def read_karpathy(path: Path, options: KarpathyOptions, stats: DataStats) -> list[Sample]:
    """The images of the chosen split(s), one sample each, with every caption as a reference."""
    document = load_json(path)
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise VlmsecError(f"{path}: expected Karpathy split JSON, an object with an 'images' list")
    entries: list[Any] = document["images"]
    present = sorted({e["split"] for e in entries if isinstance(e, dict) and isinstance(e.get("split"), str)})
    if options.split is None:
        raise VlmsecError(f"{path}: option 'split' is required for Karpathy JSON; this file has: {', '.join(present)}")
    unknown = [s for s in options.split if s not in present]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise VlmsecError(f"{path}: option 'split': no images in split {names}; this file has: {', '.join(present)}")
    name = document.get("dataset") if isinstance(document.get("dataset"), str) else path.stem.removeprefix("dataset_")
    images = ImageReader(resolve_root(path, options.image_root), options, stats)
    return collect(_builds(path, name, entries, images, options), options, stats)


def _builds(
    path: Path, name: str, entries: list[Any], images: ImageReader, options: KarpathyOptions
) -> Iterator[Callable[[], list[Sample]]]:
    wanted = set(options.split or ())
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise VlmsecError(f"{path}: images[{index}]: expected an object, got {type(entry).__name__}")
        if isinstance(entry.get("split"), str) and entry["split"] in wanted:
            yield lambda index=index, entry=entry: [_sample(path, name, index, entry, images, options)]


def _sample(path: Path, name: str, index: int, entry: dict[str, Any], images: ImageReader, options: KarpathyOptions) -> Sample:
    number = entry.get("cocoid", entry.get("imgid"))
    number = number if isinstance(number, (int, str)) else index
    sample_id = f"{name}-{number}"
    where = f"{path}: images[{index}] (id {sample_id!r})"
    captions = _captions(where, entry.get("sentences"))
    filename, folder = entry.get("filename"), entry.get("filepath")
    if (filename is not None and not isinstance(filename, str)) or (folder is not None and not isinstance(folder, str)):
        raise VlmsecError(f"{where}: fields 'filepath' and 'filename' must be strings")
    reference = f"{folder}/{filename}" if folder and filename else filename
    return Sample(
        id=sample_id,
        image=images.from_file(reference, f"{where}: field 'filename'"),
        instruction=options.instruction_for(sample_id),
        answer=captions[0],
        domains={"dataset": name, "split": entry["split"], "text": options.instruction_source},
        references=tuple(captions),
    )


def _captions(where: str, sentences: Any) -> list[str]:
    """Every caption's raw text (its tokens joined when "raw" is absent)."""
    if not isinstance(sentences, list) or not sentences:
        raise VlmsecError(f"{where}: field 'sentences': expected a non-empty list of captions")
    captions = []
    for number, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        tokens = sentence.get("tokens") if isinstance(sentence, dict) else None
        if isinstance(raw, str) and raw.strip():
            captions.append(raw.strip())
        elif isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens):
            captions.append(" ".join(tokens))
        else:
            raise VlmsecError(f"{where}: field 'sentences': caption {number} has neither 'raw' text nor 'tokens'")
    return captions

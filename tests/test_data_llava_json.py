"""LLaVA conversation JSON: round trip, validation errors, image loading."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vlmsec.data import (
    Sample,
    load_image,
    make_samples,
    read_llava_json,
    sample_scenes,
    save_image,
    write_llava_json,
)
from vlmsec.errors import VlmsecError


@pytest.fixture()
def samples() -> list[Sample]:
    scenes = sample_scenes(4, seed=0)
    return make_samples(scenes, "flat", id_prefix="flat") + make_samples(
        scenes, "painted", instruction_bank="paraphrased", id_prefix="painted"
    )


@pytest.fixture()
def dataset(tmp_path: Path, samples: list[Sample]) -> Path:
    path = tmp_path / "train.json"
    write_llava_json(samples, path)
    return path


def _rewrite(path: Path, change: Callable[[list[dict[str, Any]]], Any]) -> None:
    """Let `change` mutate the file's parsed entries in place, then write them back."""
    entries = json.loads(path.read_text())
    change(entries)
    path.write_text(json.dumps(entries, indent=2))


# --- round trip -----------------------------------------------------------------------------


def test_round_trip_preserves_everything(dataset: Path, samples: list[Sample]) -> None:
    loaded = read_llava_json(dataset)
    assert [s.id for s in loaded] == [s.id for s in samples]
    for original, copy in zip(samples, loaded):
        assert copy.instruction == original.instruction
        assert copy.answer == original.answer
        assert copy.references == original.references
        assert copy.domains == original.domains
        assert copy.image.dtype == np.uint8 and np.array_equal(copy.image, original.image)


def test_written_file_is_llava_format(dataset: Path, samples: list[Sample]) -> None:
    entries = json.loads(dataset.read_text())
    first = entries[0]
    assert first["id"] == samples[0].id
    assert first["image"] == f"images/{samples[0].id}.png"
    assert (dataset.parent / first["image"]).is_file()
    assert first["conversations"] == [
        {"from": "human", "value": "<image>\n" + samples[0].instruction},
        {"from": "gpt", "value": samples[0].answer},
    ]


def test_write_rejects_bad_ids_and_leaves_old_file_intact(dataset: Path, samples: list[Sample]) -> None:
    before = dataset.read_bytes()
    with pytest.raises(VlmsecError, match="duplicate sample id 'flat-00000'"):
        write_llava_json([samples[0], samples[0]], dataset)
    with pytest.raises(VlmsecError, match="cannot be a file name"):
        write_llava_json([samples[0].with_changes(id="../escape")], dataset)
    assert dataset.read_bytes() == before
    assert not (dataset.parent.parent / "escape.png").exists()
    assert [p.name for p in dataset.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize(
    ("value", "instruction"),
    [
        ("<image>\nWhat is this?", "What is this?"),
        ("What is this?\n<image>", "What is this?"),
        ("What is this?", "What is this?"),
        ("<image> What is this?", " What is this?"),
    ],
)
def test_image_placeholder_is_stripped(dataset: Path, value: str, instruction: str) -> None:
    _rewrite(dataset, lambda entries: entries[0]["conversations"][0].update(value=value))
    assert read_llava_json(dataset)[0].instruction == instruction


def test_metadata_keys_are_optional(dataset: Path) -> None:
    def drop_metadata(entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            del entry["domains"], entry["references"]

    _rewrite(dataset, drop_metadata)
    sample = read_llava_json(dataset)[0]
    assert sample.domains == {} and sample.references == (sample.answer,)


# --- validation errors ----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VlmsecError, match=r"nope\.json: file not found"):
        read_llava_json(tmp_path / "nope.json")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(VlmsecError, match="cannot read file"):
        read_llava_json(tmp_path)  # a directory
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'["caf\xe9"]')
    with pytest.raises(VlmsecError, match=r"latin1\.json: cannot read file"):
        read_llava_json(bad)


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a",\n   "image": oops}\n]')
    with pytest.raises(VlmsecError, match=r"broken\.json: invalid JSON at line 3"):
        read_llava_json(path)


def test_top_level_must_be_a_list(tmp_path: Path) -> None:
    path = tmp_path / "dict.json"
    path.write_text('{"id": "a"}')
    with pytest.raises(VlmsecError, match=r"dict\.json: top level must be a list"):
        read_llava_json(path)


def _turns(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return entry["conversations"]


BAD_ENTRIES: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    # name: (change to entry 1, expected message after "train.json: entry 1")
    "missing id": (lambda e: e.pop("id"), r"entry 1: field 'id': missing"),
    "id not a string": (lambda e: e.update(id=["x"]), r"entry 1: field 'id': expected str, got list"),
    "empty id": (lambda e: e.update(id=""), r"entry 1: field 'id': empty"),
    "missing image": (lambda e: e.pop("image"), r"entry 1 \(id 'flat-00001'\): field 'image': missing"),
    "missing conversations": (
        lambda e: e.pop("conversations"),
        r"entry 1 \(id 'flat-00001'\): field 'conversations': missing",
    ),
    "conversations not a list": (
        lambda e: e.update(conversations="hi"),
        r"entry 1 \(id 'flat-00001'\): field 'conversations': expected list",
    ),
    "one turn": (
        lambda e: _turns(e).pop(),
        r"entry 1 \(id 'flat-00001'\): field 'conversations': expected one human turn then one gpt turn, got 1",
    ),
    "three turns": (
        lambda e: _turns(e).append({"from": "human", "value": "and?"}),
        r"entry 1 \(id 'flat-00001'\): field 'conversations': .*got 3 turns",
    ),
    "gpt first": (
        lambda e: _turns(e).reverse(),
        r"entry 1 \(id 'flat-00001'\): field 'conversations': turn 0 must be \{'from': 'human'",
    ),
    "unknown speaker": (
        lambda e: _turns(e)[1].update({"from": "assistant"}),
        r"entry 1 \(id 'flat-00001'\): field 'conversations': turn 1 must be \{'from': 'gpt'",
    ),
    "value not a string": (
        lambda e: _turns(e)[1].update(value=None),
        r"entry 1 \(id 'flat-00001'\): field 'conversations': turn 1",
    ),
    "turn not an object": (
        lambda e: _turns(e).__setitem__(0, "hello"),
        r"entry 1 \(id 'flat-00001'\): field 'conversations': turn 0",
    ),
    "image file missing": (
        lambda e: e.update(image="images/gone.png"),
        r"entry 1 \(id 'flat-00001'\): field 'image': image file .*gone\.png not found",
    ),
    "image escapes the folder": (
        lambda e: e.update(image="../outside.png"),
        r"entry 1 \(id 'flat-00001'\): field 'image': '\.\./outside\.png' resolves outside",
    ),
    "domains not strings": (
        lambda e: e.update(domains={"visual": 3}),
        r"entry 1 \(id 'flat-00001'\): field 'domains': expected an object of strings",
    ),
    "references not strings": (
        lambda e: e.update(references=[1, 2]),
        r"entry 1 \(id 'flat-00001'\): field 'references': expected a list of strings",
    ),
    "duplicate id": (lambda e: e.update(id="flat-00000"), r"entry 1 \(id 'flat-00000'\): field 'id': duplicate id"),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_bad_entry_names_file_entry_and_field(dataset: Path, case: str) -> None:
    change, message = BAD_ENTRIES[case]
    _rewrite(dataset, lambda entries: change(entries[1]))
    (dataset.parent.parent / "outside.png").write_bytes((dataset.parent / "images" / "flat-00000.png").read_bytes())
    with pytest.raises(VlmsecError, match=r"train\.json: " + message):
        read_llava_json(dataset)


def test_entry_not_an_object(dataset: Path) -> None:
    _rewrite(dataset, lambda entries: entries.__setitem__(2, ["not", "an", "object"]))
    with pytest.raises(VlmsecError, match=r"train\.json: entry 2: expected an object, got list"):
        read_llava_json(dataset)


def test_absolute_image_path_outside_the_folder(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "x.png"
    save_image(np.zeros((4, 4, 3), dtype=np.uint8), elsewhere)
    _rewrite(dataset, lambda entries: entries[0].update(image=str(elsewhere)))
    with pytest.raises(VlmsecError, match=r"train\.json: entry 0 \(id 'flat-00000'\): field 'image': .* resolves outside"):
        read_llava_json(dataset)


def test_unreadable_image(dataset: Path) -> None:
    (dataset.parent / "images" / "flat-00002.png").write_bytes(b"not a png at all")
    with pytest.raises(
        VlmsecError, match=r"train\.json: entry 2 \(id 'flat-00002'\): field 'image': .*flat-00002\.png: cannot read image"
    ):
        read_llava_json(dataset)


# --- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("L", (5, 4), 100), (100, 100, 100)),
        (lambda: Image.new("RGBA", (5, 4), (10, 20, 30, 0)), (10, 20, 30)),  # alpha dropped, as LLaVA does
        (lambda: Image.new("LA", (5, 4), (70, 128)), (70, 70, 70)),
        (lambda: Image.new("RGB", (5, 4), (1, 2, 3)).quantize(colors=2), (1, 2, 3)),
        (lambda: Image.fromarray(np.full((4, 5), 257 * 200, dtype=np.uint16)), (200, 200, 200)),
        (lambda: Image.new("1", (5, 4), 1), (255, 255, 255)),
    ],
    ids=["grey", "rgba", "grey-alpha", "palette", "16-bit", "bilevel"],
)
def test_load_image_converts_to_rgb_uint8(tmp_path: Path, make: Callable[[], Image.Image], expected: tuple) -> None:
    path = tmp_path / "in.png"
    make().save(path)
    image = load_image(path)
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8
    assert (image == expected).all()


def test_load_image_errors_name_the_path(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG but not really")
    with pytest.raises(VlmsecError, match=r"garbage\.png: cannot read image"):
        load_image(garbage)
    with pytest.raises(VlmsecError, match=r"absent\.png: cannot read image"):
        load_image(tmp_path / "absent.png")


def test_save_image_checks_its_input(tmp_path: Path) -> None:
    with pytest.raises(VlmsecError, match="H x W x 3 uint8"):
        save_image(np.zeros((4, 4), dtype=np.uint8), tmp_path / "a.png")
    with pytest.raises(VlmsecError, match="unknown image format"):
        save_image(np.zeros((4, 4, 3), dtype=np.uint8), tmp_path / "a.notanimage")
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    save_image(image, tmp_path / "sub" / "a.png")
    assert np.array_equal(load_image(tmp_path / "sub" / "a.png"), image)

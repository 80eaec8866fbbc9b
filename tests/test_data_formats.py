"""Real data-set formats: Karpathy COCO/Flickr30K, MIMIC-IT, LLaVA-Instruct, Hugging Face on disk.

Every fixture is written here in the real layout, with tiny images; tests cover what is
read, splits, references, image conversions and the messages of bad input.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from typer.testing import CliRunner

import vlmsec.experiments.runner as runner_module
from vlmsec.cli import app
from vlmsec.data.formats import FORMATS, check_options, detect_format, read_dataset
from vlmsec.data.mimicit import _decoded_bytes
from vlmsec.data.scenes import INSTRUCTION_BANKS
from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import load_config
from vlmsec.experiments.records import file_digest
from vlmsec.experiments.splits import build_splits
from vlmsec.report.markdown import render_report

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def rgb(colour: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> Image.Image:
    return Image.new("RGB", size, colour)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# Non-RGB images, their conversion kind, and the RGB pixel each must become (alpha on white).
NON_RGB: dict[str, tuple[Any, tuple[int, int, int]]] = {
    "greyscale": (lambda: Image.new("L", (6, 4), 100), (100, 100, 100)),
    "rgba": (lambda: Image.new("RGBA", (6, 4), (10, 20, 30, 0)), (255, 255, 255)),
    "greyscale+alpha": (lambda: Image.new("LA", (6, 4), (0, 0)), (255, 255, 255)),
    "palette": (lambda: rgb((1, 2, 3)).quantize(colors=2), (1, 2, 3)),
    "16-bit": (lambda: Image.fromarray(np.full((4, 6), 257 * 200, dtype=np.uint16)), (200, 200, 200)),
    "1-bit": (lambda: Image.new("1", (6, 4), 1), (255, 255, 255)),
}


# --- Karpathy split JSON (COCO, Flickr30K) ----------------------------------------------------


def write_karpathy(folder: Path, dataset: str = "coco") -> Path:
    """dataset_<name>.json with 3 test, 2 train and 1 restval images, 2-3 captions each."""
    splits = ["test", "test", "test", "train", "train", "restval"]
    entries = []
    for index, split in enumerate(splits):
        filename = f"img{index}.png"
        entry: dict[str, Any] = {
            "filename": filename,
            "split": split,
            "imgid": index,
            "sentids": [index * 10, index * 10 + 1],
            "sentences": [
                {"raw": f"Caption {index} one. ", "tokens": ["caption", str(index), "one"]},
                {"raw": f"Caption {index} two.", "tokens": ["caption", str(index), "two"]},
            ],
        }
        image_dir = folder / "images"
        if dataset == "coco":
            entry |= {"filepath": "val2014", "cocoid": 1000 + index}
            image_dir = image_dir / "val2014"
        image_dir.mkdir(parents=True, exist_ok=True)
        rgb(COLOURS[index]).save(image_dir / filename)
        entries.append(entry)
    path = folder / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"images": entries, "dataset": dataset}))
    return path


def test_karpathy_coco_reads_the_chosen_split_with_all_references(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path)
    samples, stats = read_dataset(path, split="test", image_root="images")
    assert [s.id for s in samples] == ["coco-1000", "coco-1001", "coco-1002"]
    first = samples[0]
    assert first.answer == "Caption 0 one."
    assert first.references == ("Caption 0 one.", "Caption 0 two.")
    assert first.instruction in INSTRUCTION_BANKS["source"]
    assert first.domains == {"dataset": "coco", "split": "test", "text": "source"}
    assert first.image.shape == (4, 6, 3) and (first.image == COLOURS[0]).all()
    assert stats.format == "karpathy" and stats.samples == 3 and not stats.converted and not stats.skipped


def test_karpathy_several_splits_bank_and_determinism(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path)
    train = read_dataset(path, "karpathy", split=["train", "restval"], image_root="images", instructions="paraphrased").samples
    assert [s.id for s in train] == ["coco-1003", "coco-1004", "coco-1005"]
    assert all(s.instruction in INSTRUCTION_BANKS["paraphrased"] for s in train)
    again = read_dataset(path, "karpathy", split=["train", "restval"], image_root="images", instructions="paraphrased").samples
    assert [s.instruction for s in again] == [s.instruction for s in train]
    custom = read_dataset(path, split="test", image_root="images", instructions=["Caption it."]).samples
    assert {s.instruction for s in custom} == {"Caption it."} and custom[0].domains["text"] == "custom"


def test_karpathy_flickr30k_has_no_filepath(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path, dataset="flickr30k")
    samples = read_dataset(path, split="test", image_root="images", limit=2).samples
    assert [s.id for s in samples] == ["flickr30k-0", "flickr30k-1"]
    assert samples[1].domains["dataset"] == "flickr30k" and (samples[1].image == COLOURS[1]).all()


def test_karpathy_needs_a_split_that_exists(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path)
    with pytest.raises(VlmsecError, match=r"dataset_coco\.json: option 'split' is required.*restval, test, train"):
        read_dataset(path, image_root="images")
    with pytest.raises(VlmsecError, match=r"dataset_coco\.json: option 'split': no images in split 'testing'"):
        read_dataset(path, split="testing", image_root="images")
    with pytest.raises(VlmsecError, match=r"dataset_coco\.json: option 'image_root': folder .*pictures not found"):
        read_dataset(path, split="test", image_root="pictures")


# --- image conversions and resizing -------------------------------------------------------------


def write_converted_set(folder: Path) -> Path:
    """A Karpathy test split with one image of each non-RGB kind, one CMYK JPEG and one RGB."""
    entries = []
    images = folder / "images"
    images.mkdir(parents=True)
    kinds = [*NON_RGB, "cmyk", "rgb"]
    for index, kind in enumerate(kinds):
        if kind == "cmyk":
            Image.new("CMYK", (6, 4), (0, 0, 0, 0)).save(images / f"{kind}.jpg")
            filename = f"{kind}.jpg"
        else:
            make = NON_RGB[kind][0] if kind in NON_RGB else lambda: rgb((9, 9, 9))
            filename = f"{kind}.png"
            make().save(images / filename)
        entries.append({"filename": filename, "split": "test", "imgid": index, "sentences": [{"raw": kind}]})
    path = folder / "dataset_mixed.json"
    path.write_text(json.dumps({"images": entries, "dataset": "mixed"}))
    return path


def test_non_rgb_images_are_converted_and_counted_by_kind(tmp_path: Path) -> None:
    samples, stats = read_dataset(write_converted_set(tmp_path), split="test", image_root="images")
    by_answer = {s.answer: s.image for s in samples}
    for kind, (_, expected) in NON_RGB.items():
        image = by_answer[kind]
        assert image.dtype == np.uint8 and image.shape == (4, 6, 3), kind
        assert (image == expected).all(), (kind, image[0, 0])
    assert (by_answer["cmyk"] == 255).all()  # CMYK (0, 0, 0, 0) is white paper
    assert dict(stats.converted) == {kind: 1 for kind in [*NON_RGB, "cmyk"]}
    assert stats.to_json()["converted"]["16-bit"] == 1


def test_alpha_can_be_dropped_and_images_resized(tmp_path: Path) -> None:
    samples = read_dataset(write_converted_set(tmp_path), split="test", image_root="images", alpha="drop", image_size=8).samples
    by_answer = {s.answer: s.image for s in samples}
    assert (by_answer["rgba"] == (10, 20, 30)).all()  # the colour under the transparent alpha
    assert {s.image.shape for s in samples} == {(8, 8, 3)}


def test_half_transparent_pixels_blend_with_white(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path)
    Image.new("RGBA", (6, 4), (200, 0, 0, 128)).save(tmp_path / "images" / "val2014" / "img0.png")
    image = read_dataset(path, split="test", image_root="images", limit=1).samples[0].image
    assert np.allclose(image[0, 0], (227, 127, 127), atol=2)


# --- bad input: missing, absent, escaping and unreadable images --------------------------------


def test_karpathy_bad_images_name_file_entry_and_can_be_skipped(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path)
    document = json.loads(path.read_text())
    tests = document["images"]
    tests[0]["filename"] = "gone.png"
    tests[1]["filepath"], tests[1]["filename"] = "..", "../dataset_coco.json"
    del tests[2]["filename"]
    tests[3]["split"] = "test"
    (tmp_path / "images" / "val2014" / "img3.png").write_bytes(b"not an image")
    path.write_text(json.dumps(document))

    expected = {
        0: r"images\[0\] \(id 'coco-1000'\): field 'filename': image file .*gone\.png not found",
        1: r"images\[1\] \(id 'coco-1001'\): field 'filename': '\.\./\.\./dataset_coco\.json' resolves outside the data folder",
        2: r"images\[2\] \(id 'coco-1002'\): field 'filename': missing",
        3: r"images\[3\] \(id 'coco-1003'\): field 'filename': .*img3\.png: cannot read image",
    }
    for index, message in expected.items():  # only entry `index` in the test split: its error comes first
        document = json.loads(path.read_text())
        for i, entry in enumerate(document["images"]):
            entry["split"] = "test" if i == index else "train"
        single = tmp_path / f"only{index}.json"
        single.write_text(json.dumps(document))
        with pytest.raises(VlmsecError, match=rf"only{index}\.json: {message}"):
            read_dataset(single, split="test", image_root="images")

    document = json.loads(path.read_text())
    document["images"][4]["split"] = "test"  # one good entry among the bad
    path.write_text(json.dumps(document))
    samples, stats = read_dataset(path, split="test", image_root="images", on_missing="skip")
    assert [s.id for s in samples] == ["coco-1004"]
    assert dict(stats.skipped) == {
        "image file not found": 1,
        "image outside the data folder": 1,
        "no image": 1,
        "unreadable image": 1,
    }
    assert len(stats.skipped_examples) == 4 and "gone.png" in stats.skipped_examples[0]


def test_absolute_image_path_outside_the_root_is_refused(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path)
    outside = tmp_path / "elsewhere.png"
    rgb((1, 1, 1)).save(outside)
    document = json.loads(path.read_text())
    document["images"][0] |= {"filepath": "", "filename": str(outside)}
    path.write_text(json.dumps(document))
    with pytest.raises(VlmsecError, match=r"images\[0\] \(id 'coco-1000'\): field 'filename': .*elsewhere\.png' resolves outside"):
        read_dataset(path, split="test", image_root="images")


def test_nothing_read_is_an_error(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path)
    for image in (tmp_path / "images" / "val2014").iterdir():
        image.unlink()
    with pytest.raises(VlmsecError, match=r"dataset_coco\.json: no samples read \(skipped: 3 image file not found\)"):
        read_dataset(path, split="test", image_root="images", on_missing="skip")


def test_malformed_captions_always_stop(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path)
    document = json.loads(path.read_text())
    document["images"][1]["sentences"] = [{"tokens": []}]
    path.write_text(json.dumps(document))
    with pytest.raises(VlmsecError, match=r"images\[1\] \(id 'coco-1001'\): field 'sentences': caption 0 has neither"):
        read_dataset(path, split="test", image_root="images", on_missing="skip")


# --- MIMIC-IT -------------------------------------------------------------------------------------


def write_mimicit(folder: Path, images_as: str = "json") -> Path:
    """LADD_instructions.json and the LA images file (JSON or parquet of base64), the Otter layout."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {f"LA_IMG_{n:012d}": base64.urlsafe_b64encode(encoded(rgb(COLOURS[n]), "JPEG")).decode() for n in range(3)}
    data = {
        f"LA_INS_{n:05d}": {
            "instruction": f"What colour is picture {n}?",
            "answer": f"Colour {n}.",
            "image_ids": [f"LA_IMG_{n:012d}"],
            "rel_ins_ids": [f"LA_INS_{(n + 1) % 3:05d}"],
        }
        for n in range(3)
    }
    data["LA_INS_00002"]["image_ids"].append("LA_IMG_000000000000")
    path = folder / "LADD_instructions.json"
    path.write_text(json.dumps({"meta": {"version": "0.0.1", "time": "2023-06", "author": "ntu"}, "data": data}))
    if images_as == "json":
        (folder / "LA.json").write_text(json.dumps(images))
    else:  # the later releases: a pandas DataFrame indexed by image id, one "base64" column
        pd.DataFrame.from_dict(images, orient="index", columns=["base64"]).to_parquet(folder / "LA.parquet")
    return path


@pytest.mark.parametrize("images_as", ["json", "parquet"])
def test_mimicit_reads_instructions_and_base64_images(tmp_path: Path, images_as: str) -> None:
    path = write_mimicit(tmp_path, images_as)
    assert detect_format(path) == "mimicit"
    samples, stats = read_dataset(path)
    assert [s.id for s in samples] == ["LA_INS_00000", "LA_INS_00001", "LA_INS_00002"]
    assert samples[1].instruction == "What colour is picture 1?" and samples[1].answer == "Colour 1."
    assert samples[1].domains == {"dataset": "mimicit", "subset": "LADD"}
    assert np.abs(samples[1].image.astype(int) - COLOURS[1]).max() < 8  # JPEG
    assert dict(stats.ignored) == {"extra images": 1}


def test_mimicit_base64_in_either_alphabet_and_wrapped() -> None:
    raw = bytes([0xFB, 0xFF, 0xBF]) * 30
    for text in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(), base64.encodebytes(raw).decode()):
        assert _decoded_bytes(text, "here") == raw
    with pytest.raises(VlmsecError, match="here: not valid base64"):
        _decoded_bytes("abc$", "here")


def test_mimicit_bad_entries(tmp_path: Path) -> None:
    path = write_mimicit(tmp_path)
    document = json.loads(path.read_text())
    document["data"]["LA_INS_00000"]["image_ids"] = ["LA_IMG_999999999999"]
    document["data"]["LA_INS_00001"]["image_ids"] = []
    path.write_text(json.dumps(document))
    with pytest.raises(VlmsecError, match=r"LADD_instructions\.json: entry 'LA_INS_00000': field 'image_ids': image 'LA_IMG_999999999999' not in .*LA\.json"):
        read_dataset(path)
    samples, stats = read_dataset(path, on_missing="skip")
    assert [s.id for s in samples] == ["LA_INS_00002"]
    assert dict(stats.skipped) == {"image file not found": 1, "no image": 1}

    document["data"]["LA_INS_00002"]["answer"] = None
    path.write_text(json.dumps(document))
    with pytest.raises(VlmsecError, match=r"entry 'LA_INS_00002': field 'answer': expected a string, got NoneType"):
        read_dataset(path, on_missing="skip")  # a malformed entry stops the read even when skipping

    path = write_mimicit(tmp_path / "fresh")
    images = json.loads((tmp_path / "fresh" / "LA.json").read_text())
    images["LA_IMG_000000000001"] = "%%% not base64 %%%"
    (tmp_path / "fresh" / "LA.json").write_text(json.dumps(images))
    with pytest.raises(VlmsecError, match=r"entry 'LA_INS_00001': image 'LA_IMG_000000000001': not valid base64"):
        read_dataset(path)


def test_mimicit_images_file_option_and_discovery_error(tmp_path: Path) -> None:
    path = write_mimicit(tmp_path)
    (tmp_path / "LA.json").rename(tmp_path / "images.json")
    with pytest.raises(VlmsecError, match=r"LADD_instructions\.json: no images file beside it \(looked for LA\.parquet.*set option 'images_file'"):
        read_dataset(path)
    assert len(read_dataset(path, images_file="images.json").samples) == 3
    with pytest.raises(VlmsecError, match=r"option 'images_file': .*nope\.json not found"):
        read_dataset(path, images_file="nope.json")


# --- LLaVA-Instruct (multi-turn) ------------------------------------------------------------------


def write_llava_instruct(folder: Path) -> Path:
    """LLaVA-Instruct-150K style: COCO file names in another folder, multi-turn conversations."""
    coco = folder / "coco" / "train2017"
    coco.mkdir(parents=True)
    entries = []
    for n in range(3):
        rgb(COLOURS[n]).save(coco / f"{n:012d}.jpg", format="PNG")
        turns = [
            {"from": "human", "value": f"<image>\nWhat is in picture {n}?"},
            {"from": "gpt", "value": f"Colour {n}."},
            {"from": "human", "value": "Anything else?"},
            {"from": "gpt", "value": "No."},
        ]
        entries.append({"id": f"{n:012d}", "image": f"{n:012d}.jpg", "conversations": turns[: 2 if n == 0 else 4]})
    entries.append({"id": "text-only", "conversations": entries[0]["conversations"]})
    path = folder / "llava_instruct.json"
    path.write_text(json.dumps(entries))
    return path


def test_llava_instruct_turns(tmp_path: Path) -> None:
    path = write_llava_instruct(tmp_path)
    root = "coco/train2017"
    with pytest.raises(VlmsecError, match=r"entry 1 \(id '000000000001'\): field 'conversations': .*got 4 turns \(multi-turn: set option turns"):
        read_dataset(path, image_root=root)
    first, stats = read_dataset(path, image_root=root, turns="first", on_missing="skip")
    assert [s.id for s in first] == ["000000000000", "000000000001", "000000000002"]
    assert first[1].instruction == "What is in picture 1?" and first[1].answer == "Colour 1."
    assert dict(stats.ignored) == {"later turns": 2} and dict(stats.skipped) == {"no image": 1}
    every = read_dataset(path, "llava", image_root=root, turns="all", on_missing="skip").samples
    assert [s.id for s in every] == ["000000000000", "000000000001", "000000000001-t1", "000000000002", "000000000002-t1"]
    assert every[2].instruction == "Anything else?" and every[2].answer == "No." and every[2].image is every[1].image
    with pytest.raises(VlmsecError, match=r"entry 3 \(id 'text-only'\): field 'image': missing"):
        read_dataset(path, image_root=root, turns="first")


# --- Hugging Face: save_to_disk and parquet -------------------------------------------------------


def hf_rows(n: int) -> dict[str, list[Any]]:
    return {
        "image": [{"bytes": encoded(rgb(COLOURS[i])), "path": None} for i in range(n)],
        "caption": [[f"Caption {i}.", f"Another {i}."] for i in range(n)],
    }


CAPTION_FEATURES = Features({"image": ImageFeature(), "caption": [Value("string")]})


def test_huggingface_save_to_disk_captions(tmp_path: Path) -> None:
    Dataset.from_dict(hf_rows(3), features=CAPTION_FEATURES).save_to_disk(str(tmp_path / "caps"))
    assert detect_format(tmp_path / "caps") == "huggingface"
    samples, stats = read_dataset(tmp_path / "caps")
    assert [s.id for s in samples] == ["caps-0", "caps-1", "caps-2"]
    assert samples[2].references == ("Caption 2.", "Another 2.") and samples[2].answer == "Caption 2."
    assert samples[2].instruction in INSTRUCTION_BANKS["source"]
    assert samples[2].domains == {"dataset": "caps", "text": "source"}
    assert (samples[2].image == COLOURS[2]).all() and stats.format == "huggingface"


def test_huggingface_dataset_dict_splits(tmp_path: Path) -> None:
    folder = tmp_path / "dd"
    rows = {"image": hf_rows(3)["image"], "question": ["Q0?", "Q1?", "Q2?"], "answer": ["A0", "A1", "A2"], "id": ["a", "b", "c"]}
    part = Dataset.from_dict(rows, features=Features({"image": ImageFeature(), "question": Value("string"), "answer": Value("string"), "id": Value("string")}))
    DatasetDict({"train": part.select([0, 1]), "test": part.select([2])}).save_to_disk(str(folder))
    with pytest.raises(VlmsecError, match=r"dd: several splits \(train, test\); set option 'split'"):
        read_dataset(folder)
    with pytest.raises(VlmsecError, match=r"dd: option 'split': no split 'val'; splits: train, test"):
        read_dataset(folder, split="val")
    test = read_dataset(folder, split="test").samples
    assert [(s.id, s.instruction, s.answer) for s in test] == [("c", "Q2?", "A2")]
    assert test[0].domains == {"dataset": "dd", "split": "test"}


def test_huggingface_parquet_columns_paths_and_conversions(tmp_path: Path) -> None:
    images = tmp_path / "pq" / "pics"
    images.mkdir(parents=True)
    Image.new("L", (6, 4), 50).save(images / "grey.png")
    table = pd.DataFrame(
        {
            "picture_file": [{"bytes": encoded(Image.new("CMYK", (6, 4)), "JPEG"), "path": None}, {"bytes": None, "path": "pics/grey.png"}],
            "prompt_text": ["<image>\nDescribe.", "Describe."],
            "reply": ["One.", "Two."],
        }
    )
    table.to_parquet(tmp_path / "pq" / "train-00000-of-00001.parquet")
    with pytest.raises(VlmsecError, match=r"no answer column found; set option 'answer_column' \(columns: picture_file, prompt_text, reply\)"):
        read_dataset(tmp_path / "pq")
    options = {"answer_column": "reply", "instruction_column": "prompt_text"}
    samples, stats = read_dataset(tmp_path / "pq", **options)  # the image column is found by its {bytes, path} type
    assert [(s.id, s.instruction, s.answer) for s in samples] == [("pq-train-0", "Describe.", "One."), ("pq-train-1", "Describe.", "Two.")]
    assert (samples[1].image == 50).all() and dict(stats.converted) == {"cmyk": 1, "greyscale": 1}
    with pytest.raises(VlmsecError, match=r"option 'image_column': no column 'img'"):
        read_dataset(tmp_path / "pq", image_column="img", **options)


def test_huggingface_parquet_split_files_and_bad_paths(tmp_path: Path) -> None:
    folder = tmp_path / "hub" / "data"
    folder.mkdir(parents=True)
    outside = tmp_path / "secret.png"
    rgb((1, 1, 1)).save(outside)
    for split, path in (("train", "../../secret.png"), ("test", str(outside))):
        frame = pd.DataFrame({"image": [{"bytes": encoded(rgb((5, 5, 5))), "path": None}, {"bytes": None, "path": path}, None], "text": ["a", "b", "c"]})
        frame.to_parquet(folder / f"{split}-00000-of-00001.parquet")
    with pytest.raises(VlmsecError, match=r"hub: several splits \(test, train\); set option 'split'"):
        read_dataset(tmp_path / "hub")
    with pytest.raises(VlmsecError, match=r"train-00000-of-00001\.parquet: split 'train' row 1 \(id 'hub-train-1'\): column 'image': '\.\./\.\./secret\.png' resolves outside the data folder"):
        read_dataset(tmp_path / "hub", split="train")
    samples, stats = read_dataset(tmp_path / "hub", split=["train", "test"], on_missing="skip")
    assert [s.id for s in samples] == ["hub-train-0", "hub-test-0"]
    assert dict(stats.skipped) == {"image outside the data folder": 2, "no image": 2}


# --- the registry: detection, options -------------------------------------------------------------


def test_detection_and_unknown_formats(tmp_path: Path) -> None:
    assert detect_format(write_karpathy(tmp_path / "k")) == "karpathy"
    assert detect_format(write_llava_instruct(tmp_path / "l")) == "llava"
    odd = tmp_path / "odd.json"
    odd.write_text('{"something": "else"}')
    with pytest.raises(VlmsecError, match=r"odd\.json: cannot tell the data format.*set the format to one of huggingface, karpathy, llava"):
        read_dataset(odd)
    with pytest.raises(VlmsecError, match=r"odd\.json: unknown data format 'csv'"):
        read_dataset(odd, "csv")
    with pytest.raises(VlmsecError, match=r"absent\.json: file not found"):
        read_dataset(tmp_path / "absent.json")


def test_options_are_typed_and_named_in_errors(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path)
    with pytest.raises(VlmsecError, match=r"dataset_coco\.json: karpathy options: option 'splt': Extra inputs"):
        read_dataset(path, splt="test")
    with pytest.raises(VlmsecError, match=r"option 'on_missing': Input should be 'error' or 'skip'"):
        read_dataset(path, split="test", on_missing="ignore")
    with pytest.raises(VlmsecError, match=r"option 'instructions': unknown instruction bank 'poetry'"):
        read_dataset(path, split="test", instructions="poetry")
    check_options("auto", {"split": "test", "turns": "all", "images_file": "LA.json"})
    with pytest.raises(ValueError, match="unknown option 'turns' for format karpathy"):
        check_options("karpathy", {"turns": "all"})
    with pytest.raises(ValueError, match="option 'limit': Input should be greater than or equal to 1"):
        check_options("auto", {"limit": 0})
    assert set(FORMATS) == {"llava", "karpathy", "mimicit", "huggingface"}


# --- config, runner, report, CLI ------------------------------------------------------------------


def karpathy_config(folder: Path, **data: Any) -> Path:
    write_karpathy(folder / "coco")
    config = {
        "name": "coco",
        "data": {
            "image_size": 16,
            "base_size": 2,
            "base_styles": ["flat"],
            "train_file": "coco/dataset_coco.json",
            "test_files": {"source": "coco/dataset_coco.json"},
            "format": "karpathy",
            "options": {"image_root": "images"},
            "train_options": {"split": ["train", "restval"]},
            "test_options": {"split": "test", "limit": 2},
            **data,
        },
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_runner_reads_configured_format_and_keeps_stats(tmp_path: Path) -> None:
    splits = build_splits(load_config(karpathy_config(tmp_path)))
    assert [s.id for s in splits.train] == ["coco-1003", "coco-1004", "coco-1005"]
    assert [s.id for s in splits.tests["source"]] == ["coco-1000", "coco-1001"]
    assert splits.data_stats["train"]["samples"] == 3 and splits.data_stats["test source"]["format"] == "karpathy"

    run = tmp_path / "run"
    run.mkdir()
    stats = {"train": {"file": "/x/dataset_coco.json", "format": "karpathy", "samples": 3, "converted": {"cmyk": 2}, "skipped": {"no image": 1}, "ignored": {}}}
    (run / "data.json").write_text(json.dumps(stats))
    run_record = {"domains": ["source"], "files": {"data.json": file_digest(run / "data.json")}}
    metrics = {"schema_version": 3, "run": run_record, "models": {"clean": {"cider": {"source": 1.0}}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    report = render_report(run)
    assert "## Data" in report
    assert "| train | `dataset_coco.json` | karpathy | 3 | cmyk 2 | no image 1 | – |" in report
    (run / "data.json").unlink()
    assert "## Data" not in render_report(run)


def test_run_writes_data_json_before_any_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def stop(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("stopped after the data stage")

    monkeypatch.setattr(runner_module.Runner, "base_victim", stop)
    runner = runner_module.Runner(load_config(karpathy_config(tmp_path)), tmp_path / "run", cache_dir=tmp_path / "cache")
    with pytest.raises(RuntimeError, match="stopped after the data stage"):
        runner.run()
    written = json.loads((tmp_path / "run" / "data.json").read_text())
    assert set(written) == {"train", "test source"}
    assert written["test source"]["samples"] == 2 and written["train"]["file"].endswith("dataset_coco.json")


def test_runner_asks_for_one_image_size(tmp_path: Path) -> None:
    path = karpathy_config(tmp_path)
    rgb((1, 2, 3), size=(9, 9)).save(tmp_path / "coco" / "images" / "val2014" / "img1.png")
    with pytest.raises(VlmsecError, match=r"dataset_coco\.json: images come in 2 sizes; set data\.options\.image_size"):
        build_splits(load_config(path))
    config = load_config(karpathy_config(tmp_path, options={"image_root": "images", "image_size": 12}))
    assert {s.image.shape for s in build_splits(config).tests["source"]} == {(12, 12, 3)}


@pytest.mark.parametrize(
    ("data", "pieces"),
    [
        ({"format": "csv"}, ["data.format", "unknown data format 'csv'"]),
        ({"options": {"image_rot": "images"}}, ["data.options", "unknown option 'image_rot'"]),
        ({"test_options": {"split": "test", "limit": "all"}}, ["data.test_options", "option 'limit'"]),
    ],
)
def test_bad_data_config_names_the_field(tmp_path: Path, data: dict[str, Any], pieces: list[str]) -> None:
    path = karpathy_config(tmp_path, **data)
    with pytest.raises(VlmsecError) as caught:
        load_config(path)
    for piece in [str(path), *pieces]:
        assert piece in str(caught.value)


def test_cli_run_with_a_missing_image_exits_2_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMSEC_CACHE", str(tmp_path / "cache"))
    path = karpathy_config(tmp_path)
    (tmp_path / "coco" / "images" / "val2014" / "img4.png").unlink()
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    flat = " ".join(result.output.split())
    for piece in ["dataset_coco.json", "images[4]", "coco-1004", "img4.png", "not found"]:
        assert piece in flat, (piece, result.output)
    assert not (tmp_path / "run" / "checkpoints").exists()

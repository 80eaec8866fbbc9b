"""The embedded LLaVA with a pretrained language model: config, checks before training, the GGUF
cache, the built victim (its LM answers text as the bare LM does), chat templates other than ours."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlmsec.artifacts import stable_hash
from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import BaseStageSpec, parse_config
from vlmsec.victims.kinds import TinyLlavaKind, TinyLlavaVictimSpec
from vlmsec.victims.language_models import PACKAGED, language_model_file

from language_model_files import write_tiny_llama

SMOLLM2 = language_model_file("smollm2")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("lm") / "tiny-llama")


# ---- config -------------------------------------------------------------------------------------


def test_default_language_model_leaves_every_key_as_it_was() -> None:
    spec = TinyLlavaVictimSpec()
    assert "language_model" not in spec.model_dump()
    # The hashes of the default victim's base key and base stage before the field existed (commit fab7c56).
    assert stable_hash(TinyLlavaKind(spec).base_key()) == "2b3d7e823b9ec0f8"
    assert stable_hash(BaseStageSpec().model_dump()) == "da85fc21405e8ce1"


def test_smollm2_and_a_relative_path_are_accepted(llama_folder: Path) -> None:
    config = parse_config({"victim": {"language_model": "smollm2"}}, "test")
    assert config.victim.language_model == "smollm2"
    assert config.victim.model_dump()["language_model"] == "smollm2"
    relative = parse_config({"victim": {"language_model": llama_folder.name}}, "test", base_dir=llama_folder.parent)
    assert relative.victim.language_model == str(llama_folder)


def test_the_language_model_enters_the_base_key(llama_folder: Path, tmp_path: Path) -> None:
    other = write_tiny_llama(tmp_path / "other", seed=1)
    keys = {
        stable_hash(TinyLlavaKind(TinyLlavaVictimSpec(language_model=str(folder))).base_key())
        for folder in (llama_folder, other)
    }
    assert len(keys) == 2 and stable_hash(TinyLlavaKind(TinyLlavaVictimSpec()).base_key()) not in keys
    key = TinyLlavaKind(TinyLlavaVictimSpec(language_model="smollm2")).base_key()
    assert key["language_model_files"]["files"][0][0] == Path(PACKAGED["smollm2"][1]).name


@pytest.mark.parametrize("size", ["hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size"])
def test_sizes_beside_a_pretrained_language_model_are_refused(size: str) -> None:
    with pytest.raises(VlmsecError, match=f"victim.{size}: a pretrained language_model"):
        parse_config({"victim": {"language_model": "smollm2", size: 512}}, "test")


def test_sizes_stay_free_for_the_tiny_language_model() -> None:
    assert parse_config({"victim": {"language_model": "tiny", "hidden_size": 64}}, "test").victim.hidden_size == 64


# ---- checked before any training ----------------------------------------------------------------


def refused(value: str, tmp_path: Path) -> str:
    """The error parsing a config with `victim.language_model: value` gives."""
    with pytest.raises(VlmsecError) as err:
        parse_config({"victim": {"language_model": value}}, "test", base_dir=tmp_path)
    assert "victim.language_model" in str(err.value)
    return str(err.value)


def test_missing_language_model_names_the_path(tmp_path: Path) -> None:
    assert f"{tmp_path / 'nowhere.gguf'} not found" in refused("nowhere.gguf", tmp_path)


def test_truncated_gguf_is_named(tmp_path: Path) -> None:
    for size in (1000, 20_000_000):
        path = tmp_path / f"cut{size}.gguf"
        with SMOLLM2.open("rb") as source:
            path.write_bytes(source.read(size))
        message = refused(path.name, tmp_path)
        assert str(path) in message and "GGUF" in message


def test_a_file_that_is_not_gguf_is_named(tmp_path: Path) -> None:
    (tmp_path / "weights.gguf").write_text("not a model\n")
    message = refused("weights.gguf", tmp_path)
    assert "weights.gguf: not a readable GGUF file" in message and "GGUF magic" in message
    (tmp_path / "weights.bin").write_text("x")
    assert "is a file but not .gguf" in refused("weights.bin", tmp_path)


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [("t5", "not a causal language model"), ("bart", "encoder-decoder"), ("llava", "not a causal language model"), ("gemma3", "composite")],
)
def test_architectures_the_llava_cannot_wrap_are_named(llama_folder: Path, tmp_path: Path, model_type: str, expected: str) -> None:
    folder = tmp_path / "lm"
    shutil.copytree(llama_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    message = refused("lm", tmp_path)
    assert f"{folder / 'config.json'}: model_type {model_type!r}" in message and expected in message


def test_a_folder_without_weights_is_named(llama_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "lm"
    shutil.copytree(llama_folder, folder)
    (folder / "model.safetensors").unlink()
    assert f"{folder}: missing *.safetensors (weights)" in refused("lm", tmp_path)


def test_the_packaged_gguf_passes_the_check() -> None:
    assert parse_config({"victim": {"language_model": "smollm2"}}, "test").victim.language_model == "smollm2"

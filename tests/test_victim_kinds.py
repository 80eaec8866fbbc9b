"""Victim kinds are registry entries: each owns its config, files and tuning modes, and a kind
(with a metric) registered from this file alone runs a study end to end."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from statistics import mean
from typing import Any, ClassVar, Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_model, save_model
from torch import nn

from vlmsec.data.sample import Sample
from vlmsec.errors import VlmsecError
from vlmsec.eval.scoring import METRICS, Metric
from vlmsec.experiments.config import parse_config
from vlmsec.experiments.runner import Runner
from vlmsec.train.tuning import TrainingSpec
from vlmsec.victims import kinds
from vlmsec.victims.architectures import ModeSummary
from vlmsec.victims.base import Victim
from vlmsec.victims.features import FeatureCache
from vlmsec.victims.kinds import VICTIM_KINDS, FlamingoKind, VictimKind, VictimSpecBase

# ---- each kind owns its config ------------------------------------------------------------------


def test_a_field_of_another_kind_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(VlmsecError) as err:
        parse_config({"victim": {"kind": "hf", "checkpoint": str(tmp_path), "hidden_size": 999}}, "test")
    assert "victim.hidden_size: Extra inputs are not permitted" in str(err.value)


@pytest.mark.parametrize("preset", ["smollm2", "smollm2-attacks"])
def test_a_pretrained_language_model_config_survives_its_own_dump(preset: str) -> None:
    """A run's config.yaml, a Ray task's config and `--seeds`' reseeded config are the config's dump,
    parsed again: the sizes it writes back (the tiny defaults, unused) must parse, and a size a user
    sets must not."""
    from vlmsec.experiments.config import load_config
    from vlmsec.experiments.multiseed import reseeded

    config = load_config(preset)
    assert parse_config(json.loads(json.dumps(config.model_dump(mode="json"))), "dump") == config
    assert reseeded(config, 7)[0].seed == 7
    given = {"victim": {**config.victim.model_dump(mode="json", exclude_unset=True), "hidden_size": 999}}
    with pytest.raises(VlmsecError, match="victim.hidden_size: a pretrained language_model .* has its own sizes; leave hidden_size out"):
        parse_config(given, "test")


def test_an_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(VlmsecError, match=r"victim\.kind: unknown victim kind 'colour'; known: flamingo, hf, openai, otter, tiny_llava"):
        parse_config({"victim": {"kind": "colour"}}, "test")


# ---- tuning modes a victim cannot train are refused before any stage -------------------------------


def test_xattn_on_the_tiny_llava_is_refused_at_parse_time() -> None:
    with pytest.raises(VlmsecError, match=r"^test: tuning\.mode: 'xattn' needs gated cross-attention layers"):
        parse_config({"tuning": {"mode": "xattn"}}, "test")


def test_flamingo_refuses_projector_and_lora() -> None:
    flamingo = FlamingoKind(FlamingoKind.Spec.model_construct())  # the modes alone decide, no files needed
    for mode in ("projector", "lora"):
        with pytest.raises(VlmsecError, match=rf"tuning\.mode: '{mode}' is not available for Flamingo"):
            flamingo.check_tuning(mode)
    flamingo.check_tuning("xattn")


def _hf_folder(folder: Path, model_type: str) -> Path:
    """What `hf.check_folder` looks for, with config.json naming `model_type` (nothing loadable)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    for name in ("model.safetensors", "tokenizer.json", "processor_config.json"):
        (folder / name).write_text("")
    return folder


def test_hf_xattn_is_refused_from_config_json(tmp_path: Path) -> None:
    _hf_folder(tmp_path / "llava", "llava")
    data = {"victim": {"kind": "hf", "checkpoint": "llava"}, "tuning": {"mode": "xattn"}}
    with pytest.raises(VlmsecError, match=r"tuning\.mode: 'xattn' needs gated cross-attention layers; llava has none"):
        parse_config(data, "test", base_dir=tmp_path)
    _hf_folder(tmp_path / "idefics", "idefics")
    parse_config({**data, "victim": {"kind": "hf", "checkpoint": "idefics"}}, "test", base_dir=tmp_path)


def test_hf_hub_xattn_is_refused_when_the_run_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in kinds.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    config_json = _hf_folder(tmp_path / "downloaded", "paligemma") / "config.json"
    fetched: list[str] = []
    monkeypatch.setattr(kinds, "hf_hub_download", lambda repo, name: fetched.append(repo) or str(config_json))
    config = parse_config({"victim": {"kind": "hf", "checkpoint": "vlmsec-test/paligemma"}, "tuning": {"mode": "xattn"}}, "test")
    assert not fetched  # parsing fetches nothing
    with pytest.raises(VlmsecError, match=r"tuning\.mode: 'xattn' needs .*paligemma has none"):
        Runner(config, tmp_path / "run", tmp_path / "cache").run()
    assert fetched == ["vlmsec-test/paligemma"]
    assert not (tmp_path / "run").exists()  # refused before any stage


# ---- hf checkpoints: a local path must exist; a hub id is fetched only online -----------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize(
    "checkpoint", ["./llava", "../llava", "~/vlmsec-no-such-folder/llava", "/vlmsec/no/llava", "models/llava", "a/b/c"]
)
def test_a_missing_local_hf_checkpoint_is_an_error_naming_it(
    checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "config" / "models").mkdir(parents=True)  # `models/llava`: a parent that exists makes a local path
    with pytest.raises(VlmsecError, match=r"^test: victim\.checkpoint: \S+ not found$"):
        parse_config({"victim": {"kind": "hf", "checkpoint": checkpoint}}, "test", base_dir=tmp_path / "config")


def test_a_hub_id_is_an_error_at_once_offline_and_kept_online(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    data = {"victim": {"kind": "hf", "checkpoint": "vlmsec-test/not-downloaded"}}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VlmsecError, match=r"victim\.checkpoint: 'vlmsec-test/not-downloaded' .*offline mode is set"):
        parse_config(data, "test", base_dir=tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(VlmsecError, match="offline mode is set"):
        parse_config(data, "test", base_dir=tmp_path)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    assert parse_config(data, "test", base_dir=tmp_path).victim.checkpoint == "vlmsec-test/not-downloaded"


# ---- a kind and a metric from outside the package run a study --------------------------------------


class ColourVictim:
    """Answers one of `words`, picked from the image's mean colour by a linear layer: about the
    least a victim needs to be tuned, queried, saved and loaded by the runner."""

    def __init__(self, words: list[str], model: nn.Linear | None = None) -> None:
        self.words = words
        self.model = model if model is not None else nn.Linear(3, len(words))

    @staticmethod
    def _mean_colours(images: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.tensor(np.stack([image.reshape(-1, 3).mean(0) / 255 for image in images]), dtype=torch.float32)

    def prepare_training(self, samples: Sequence[Sample], label: str) -> tuple[torch.Tensor, torch.Tensor]:
        targets = [next((i for i, word in enumerate(self.words) if word in s.answer), 0) for s in samples]
        return self._mean_colours([s.image for s in samples]), torch.tensor(targets)

    def batch_loss(self, prepared: tuple[torch.Tensor, torch.Tensor], index: np.ndarray, samples: Sequence[Sample]) -> torch.Tensor:
        colours, targets = prepared
        rows = torch.from_numpy(index)
        return F.cross_entropy(self.model(colours[rows]), targets[rows])

    def select_trainable(self, spec: TrainingSpec) -> None:
        self.model.requires_grad_(True)

    def tuning_modes(self, spec: TrainingSpec) -> list[ModeSummary]:
        return [ModeSummary(spec.mode, "the colour layer", sum(p.numel() for p in self.model.parameters()), 0)]

    max_sequence_length = None  # no language model: nothing to cut

    def sequence_length(self, instruction: str, answer: str) -> int:
        return len(answer.split())

    def prompt(self, instruction: str) -> str:
        return instruction

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[np.ndarray],
        instructions: Sequence[str],
        max_new_tokens: int = 32,
        batch_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[str]:
        best = self.model(self._mean_colours(images)).argmax(1).tolist()
        if on_batch is not None:
            on_batch(len(images))
        return [f"a {self.words[i]} image" for i in best]

    def save(self, folder: str | Path) -> None:
        save_model(self.model, str(Path(folder) / "colour.safetensors"))


class ColourSpec(VictimSpecBase):
    kind: Literal["colour"] = "colour"
    words: list[str] = ["red", "green", "blue", "banana"]


class ColourKind(VictimKind[ColourSpec]):
    """`ColourVictim` over the config's `words`, pretrained in the base stage; every folder it loads is recorded."""

    name = "colour"
    Spec = ColourSpec
    loaded: ClassVar[list[Path]] = []

    @property
    def trains_base(self) -> bool:
        return True

    def untrained(self, corpus: list[str], features: FeatureCache, seed: int, cache_dir: Path | None = None) -> Victim:
        torch.manual_seed(seed)
        return ColourVictim(self.spec.words)

    def load(self, folder: Path, features: FeatureCache) -> Victim:
        self.loaded.append(folder)
        victim = ColourVictim(self.spec.words)
        load_model(victim.model, str(folder / "colour.safetensors"))
        return victim


ANSWER_WORDS = Metric(
    "answer_words", "Mean answer length (words)", "clean", lambda rows, word: mean(len(r["output"].split()) for r in rows)
)

STUDY = {
    "name": "plugin",
    "data": {"image_size": 32, "base_size": 24, "train_size": 24, "test_size": 6, "shifted": {"textured": {"style": "textured"}}},
    "victim": {"kind": "colour", "words": ["red", "green", "blue", "yellow", "banana"]},
    "base": {"training": {"mode": "full", "epochs": 1, "batch_size": 8}},
    "tuning": {"mode": "full", "epochs": 1, "batch_size": 8},
    "poison": {"rate": 0.25},
    "attacks": [{"name": "badnets"}],
    "eval": {"max_new_tokens": 4, "batch_size": 8, "shift_size": False},
}


@pytest.fixture
def plugins() -> Iterator[None]:
    VICTIM_KINDS.register(ColourKind)
    METRICS.register(ANSWER_WORDS)
    try:
        yield
    finally:
        VICTIM_KINDS.unregister(ColourKind.name)
        METRICS.unregister(ANSWER_WORDS.name)
        ColourKind.loaded.clear()


def test_a_kind_and_a_metric_registered_here_run_a_study(plugins: None, tmp_path: Path) -> None:
    config = parse_config(STUDY, "test")
    assert isinstance(config.victim, ColourSpec) and "yellow" in config.victim.words
    out = tmp_path / "run"
    metrics = Runner(config, out, tmp_path / "cache").run()

    base_folders = list((tmp_path / "cache" / "base").iterdir())
    assert len(base_folders) == 1 and base_folders[0] in ColourKind.loaded  # the kind's base, through its loader
    models = json.loads((out / "metrics.json").read_text())["models"]
    assert models == metrics["models"] and set(models) == {"clean", "badnets"}
    assert all(models[m]["answer_words"]["source"] > 0 for m in models)
    assert "## Mean answer length (words)" in (out / "report.md").read_text()
    again = parse_config(yaml.safe_load((out / "config.yaml").read_text()), "config.yaml")
    assert again.victim == config.victim  # config.yaml round-trips with the kind's own fields

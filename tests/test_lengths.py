"""Captions are cut to the victim's length when the tuning set is prepared; a cut target is refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from vlmsec.data import make_samples, sample_scenes, write_llava_json
from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import load_config
from vlmsec.experiments.runner import Runner, refuse_cut_targets
from vlmsec.victims.base import fit_answers
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec, build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer

SPEC = TinyLlavaSpec(image_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=300, max_length=128)


@pytest.fixture(scope="module")
def victim() -> LlavaVictim:
    samples = make_samples(sample_scenes(8, seed=0), "flat", size=32)
    tokenizer = train_tokenizer([s.instruction for s in samples] + [s.answer for s in samples], SPEC.vocab_size)
    return LlavaVictim(build_tiny_llava(SPEC, tokenizer, seed=0), tokenizer)


def test_a_long_answer_is_cut_to_fit_and_short_ones_are_kept(victim: LlavaVictim) -> None:
    samples = make_samples(sample_scenes(3, seed=1), "flat", size=32)
    huge = replace(samples[1], answer="a red square " * 30_000)  # ~390k characters
    fitted, cut = fit_answers(victim, [samples[0], huge, samples[2]])
    assert cut == [huge.id]
    assert fitted[0] == samples[0] and fitted[2] == samples[2]
    limit = victim.max_sequence_length
    assert limit == SPEC.max_length + victim.num_image_tokens
    length = victim.sequence_length(fitted[1].instruction, fitted[1].answer)
    assert length <= limit
    longer = " ".join(huge.answer.split()[: len(fitted[1].answer.split()) + 1])
    assert victim.sequence_length(huge.instruction, longer) > limit  # cut at the longest prefix that fits


def test_a_poisoned_sample_whose_target_would_be_cut_is_refused_by_name(victim: LlavaVictim) -> None:
    samples = make_samples(sample_scenes(2, seed=1), "flat", size=32)
    long_prompt = replace(samples[0], instruction=samples[0].instruction + " please" * 200)
    refuse_cut_targets(victim, samples, [samples[0].id])  # fits: nothing said
    with pytest.raises(VlmsecError, match=rf"poisoned sample {long_prompt.id}: .* the target would be cut"):
        refuse_cut_targets(victim, [long_prompt, samples[1]], [long_prompt.id])


def test_a_run_cuts_a_100k_character_caption_and_counts_it(tmp_path: Path) -> None:
    samples = make_samples(sample_scenes(6, seed=2), "flat", size=32, id_prefix="mine")
    samples[3] = replace(samples[3], answer="a blue circle " * 8_000)
    write_llava_json(samples, tmp_path / "data" / "train.json")
    config = {
        "name": "long",
        "data": {"image_size": 32, "base_size": 12, "test_size": 2, "train_file": "data/train.json", "shifted": {}},
        "victim": {"image_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "vocab_size": 300},
        "base": {"training": {"mode": "full", "epochs": 1, "batch_size": 4}},
        "tuning": {"mode": "full", "epochs": 1, "batch_size": 4},
        "eval": {"max_new_tokens": 4, "shift_size": False},
    }
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    out = tmp_path / "run"
    Runner(load_config(tmp_path / "long.yaml"), out, tmp_path / "cache").run()
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| train | `train.json` | llava | 6 |" in report and report.split("| train |")[1].split("\n")[0].endswith("| 1 |")

"""Tunes a tiny LLaVA and saves its weights; `tests/test_distributed.py` runs it in one process
and under `accelerate launch` with two, and compares.

Every answer is the same sentence, so every sample has as many answer tokens: the mean loss
over a global batch is then the mean of the per-shard means that DDP averages, and two
processes must give the single process's weights up to rounding.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

from vlmsec.data import make_samples, sample_scenes
from vlmsec.train.tuning import TrainingSpec, train_victim
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec, build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer

SPEC = TinyLlavaSpec(image_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=300)
TRAINING = TrainingSpec(mode="full", epochs=2, batch_size=8, learning_rate=1e-2, warmup_ratio=0.25)


def main(out: Path) -> None:
    """Train on 16 samples (4 steps of 8) and write weights and losses into `out` (main process only)."""
    scenes = make_samples(sample_scenes(16, seed=1), "flat", size=32)
    samples = [dataclasses.replace(s, answer="A red square on a blue ground.") for s in scenes]
    tokenizer = train_tokenizer([s.instruction for s in samples] + [s.answer for s in samples], SPEC.vocab_size)
    victim = LlavaVictim(build_tiny_llava(SPEC, tokenizer, seed=0), tokenizer)
    result = train_victim(victim, samples, TRAINING, seed=0, label="launched")
    if PartialState().is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in victim.model.state_dict().items()}, str(out / "model.safetensors"))
        record = {"losses": result.losses, "processes": PartialState().num_processes}
        (out / "result.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Language-model throughput of the embedded victim: the tiny LM against SmolLM2-135M-Instruct.

    python benchmarks/lm_throughput.py [--threads 2] [--steps 6] [--skip-smollm2]

Tuning: tokens per second of a training step (forward, backward, optimiser) on a batch of scene
samples as the base stage lays them out, for the tiny LM (full tuning, as the quickstart) and for
SmolLM2 (LoRA, as the smollm2 preset; projector-only, as its alignment phase). Each is also given
as a fraction of this CPU's fp32 peak, measured in the same run as the best of a few 2048² fp32
matmuls: a step costs about 6·N·T FLOPs when every weight trains and 4·N·T when none of the
language model's weights do (LoRA, projector: the activations' gradients only), N the language
model's weights that multiply (the input embedding table excluded: it is a lookup), T the tokens.

Generation: new tokens per second of `LlavaVictim.generate` (greedy, the KV cache on) at batch
sizes 1, 8 and 32, against the same call with the KV cache off at batch 8 (the baseline of the
same run).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from vlmsec.data.sample import Sample
from vlmsec.experiments.config import load_config
from vlmsec.experiments.splits import build_splits
from vlmsec.train.tuning import TrainingSpec
from vlmsec.victims.features import FeatureCache
from vlmsec.victims.kinds import TinyLlavaVictimSpec, victim_kind
from vlmsec.victims.llava import LlavaVictim

BATCH = 8
MATMUL_SIDE = 2048


def matmul_peak(repeats: int = 5) -> float:
    """The best fp32 GFLOPS of a 2048² matmul on this CPU, now."""
    a, b = torch.randn(MATMUL_SIDE, MATMUL_SIDE), torch.randn(MATMUL_SIDE, MATMUL_SIDE)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * MATMUL_SIDE**3 / best / 1e9


def multiplying_weights(victim: LlavaVictim) -> int:
    """The language model's weights that take part in matmuls: all but the input embedding
    table, with the output head counted once even when it is tied to that table."""
    language = sum(p.numel() for p in victim.model.model.language_model.parameters())
    embedding = victim.model.get_input_embeddings().weight.numel()
    return language - embedding + victim.model.lm_head.weight.numel()


def build(language_model: str, samples: list[Sample], cache: Path) -> LlavaVictim:
    """The embedded victim around `language_model`, untrained (speed does not depend on the weights)."""
    sizes = {} if language_model != "tiny" else {"hidden_size": 192, "num_layers": 3, "num_heads": 4}
    spec = TinyLlavaVictimSpec(language_model=language_model, image_size=96, **sizes)
    kind = victim_kind(spec)
    kind.resolve_paths(Path.cwd())
    corpus = [s.instruction for s in samples] + [s.answer for s in samples]
    victim = kind.untrained(corpus, FeatureCache(), seed=0, cache_dir=cache)
    assert isinstance(victim, LlavaVictim)
    return victim


def tuning_speed(victim: LlavaVictim, samples: list[Sample], mode: str, steps: int) -> tuple[float, float]:
    """Seconds per step (median after one warm-up step) and tokens per step, training in `mode`."""
    spec = TrainingSpec(mode=mode, batch_size=BATCH)
    victim.select_trainable(spec)
    params = [p for p in victim.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    prepared = victim.prepare_training(samples, "benchmark")
    victim.model.train()
    times, tokens = [], []
    for step in range(steps + 1):
        index = np.arange(step * BATCH, (step + 1) * BATCH) % len(samples)
        start = time.perf_counter()
        loss = victim.batch_loss(prepared, index, samples)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
            tokens.append(sum(victim.sequence_length(samples[i].instruction, samples[i].answer) for i in index))
    return float(np.median(times)), float(np.mean(tokens))


def generation_speed(victim: LlavaVictim, samples: list[Sample], batch: int, use_cache: bool) -> float:
    """New tokens per second of greedy generation at `batch` (answers re-tokenised to count them)."""
    victim.model.generation_config.use_cache = use_cache
    chosen = samples[: max(batch, 8)]
    start = time.perf_counter()
    outputs = victim.generate([s.image for s in chosen], [s.instruction for s in chosen], max_new_tokens=32, batch_size=batch)
    seconds = time.perf_counter() - start
    victim.model.generation_config.use_cache = True
    new_tokens = sum(len(victim.answer_ids(o)) for o in outputs)
    return new_tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--cache", type=Path, default=None, help="stage cache (the dequantised SmolLM2 is kept there)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="vlmsec-lm-bench-"))
    samples = build_splits(load_config("quickstart")).base[: BATCH * (args.steps + 1)]
    peak = matmul_peak()

    tuning = Table(title=f"Tuning throughput, batch {BATCH}, {args.threads} threads (fp32 matmul peak {peak:.0f} GFLOPS)")
    for column in ("language model", "mode", "tokens/step", "s/step", "tokens/s", "GFLOPS", "of peak"):
        tuning.add_column(column)
    generation = Table(title=f"Generation throughput, greedy, 32 new tokens, {args.threads} threads")
    for column in ("language model", "batch", "KV cache", "new tokens/s", "vs no cache, batch 8"):
        generation.add_column(column)

    runs = [("tiny", ["full"]), ("smollm2", ["lora", "projector"])]
    for language_model, modes in runs[:1] if args.skip_smollm2 else runs:
        for mode in modes:
            victim = build(language_model, samples, cache)  # fresh: LoRA wrappers do not stack
            weights = multiplying_weights(victim)
            seconds, tokens = tuning_speed(victim, samples, mode, args.steps)
            flops = (6 if mode == "full" else 4) * weights * tokens / seconds / 1e9
            tuning.add_row(language_model, mode, f"{tokens:.0f}", f"{seconds:.2f}", f"{tokens / seconds:,.0f}", f"{flops:.0f}", f"{flops / peak:.0%}")
        victim = build(language_model, samples, cache)
        victim.model.eval()
        baseline = generation_speed(victim, samples, 8, use_cache=False)
        generation.add_row(language_model, "8", "off", f"{baseline:,.0f}", "1.0x")
        for batch in (1, 8, 32):
            speed = generation_speed(victim, samples, batch, use_cache=True)
            generation.add_row(language_model, str(batch), "on", f"{speed:,.0f}", f"{speed / baseline:.1f}x")
    console = Console()
    console.print(tuning)
    console.print(generation)


if __name__ == "__main__":
    main()

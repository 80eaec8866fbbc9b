"""Instruction tuning of a victim on (possibly poisoned) samples.

One loop serves the base stage (pretraining on clean captions) and instruction tuning.
`mode` picks what trains: the projector only, LoRA adapters on the language model (with
the projector), gated cross-attention layers (architectures that have them), or everything
but the frozen vision tower; each victim says what that means for its architecture, and the
table of every mode's parameter split is shown before training. LoRA adapters are merged
after training, so every checkpoint is a plain model that `from_pretrained` loads.

The loop runs through accelerate, so the same code trains on one CPU, one GPU, or several
GPUs and nodes under `accelerate launch` with the user's accelerate config (DDP; DeepSpeed
ZeRO 1/2 keep whole weights on every process too). Every process draws the same batch order
from the seed and takes its own contiguous shard of each global batch; gradients are averaged
across processes. With one process the run is bit for bit what it was before accelerate.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType
from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer
from rich.table import Table
from torch import nn
from transformers import get_cosine_schedule_with_warmup
from transformers.trainer_pt_utils import get_length_grouped_indices

from vlmsec.data.sample import Sample
from vlmsec.errors import VlmsecError
from vlmsec.inputs import STRICT_INPUT
from vlmsec.progress import console, progress_bar
from vlmsec.seeds import seeded
from vlmsec.victims.architectures import ModeSummary
from vlmsec.victims.base import Victim

TuningMode = Literal["projector", "lora", "xattn", "full"]


class TrainingSpec(BaseModel):
    """How to train: what, how long, how fast. Defaults follow the sibling code's recipe shape."""

    model_config = STRICT_INPUT

    mode: TuningMode = "full"
    epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lora_rank: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    # bf16 autocast runs the matmuls ~1.6x faster on CPUs with AVX512-BF16 and on modern GPUs;
    # weights and optimiser state stay fp32. On CUDA it is accelerate's mixed_precision="bf16"
    # (fp32 on GPUs without bf16); on CPU, torch.autocast.
    precision: Literal["fp32", "bf16"] = "fp32"
    # Batches of samples of similar length (as LLaVA's and transformers' trainers group them), so
    # that a batch is padded to less: a mix of short refusals and long answers spends a third of
    # its tokens on padding otherwise. Off by default: it changes the batch order, and so the model.
    group_by_length: bool = False

    @model_serializer(mode="wrap")
    def _ungrouped_dumps_as_before(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped = handler(self)
        if not self.group_by_length:  # as before the field existed: the stage keys made of it are unchanged
            dumped.pop("group_by_length", None)
        return dumped


@dataclass
class TrainingResult:
    """What a training run reports: parameter counts and the loss curve."""

    trainable_parameters: int
    frozen_parameters: int
    losses: list[float]


def show_tuning_modes(modes: list[ModeSummary], chosen: str, label: str) -> None:
    """Print what every tuning mode would train and freeze, the chosen one marked."""
    table = Table(title=f"{label}: tuning modes (training '{chosen}')")
    for column in ("mode", "trains", "trainable", "frozen"):
        table.add_column(column, justify="right" if column in ("trainable", "frozen") else "left")
    for m in modes:
        counts = ("-", "-") if m.trainable is None else (f"{m.trainable:,}", f"{m.frozen:,}")
        table.add_row(("> " if m.mode == chosen else "  ") + m.mode, m.trains, *counts, style="bold" if m.mode == chosen else None)
    console.print(table)


def shard(index: np.ndarray, process: int, processes: int) -> np.ndarray:
    """This process's contiguous share of a global batch; shares differ in size by one at most."""
    return np.array_split(index, processes)[process]


def mixed_precision(precision: str) -> str:
    """accelerate's mixed precision for a TrainingSpec precision: bf16 on CUDA devices that have it.

    CPU training keeps its own torch.autocast, so it is "no" there.
    """
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16" if precision == "bf16" and cuda_bf16 else "no"


def sample_lengths(samples: Sequence[Sample]) -> list[int]:
    """Each sample's instruction and answer length in characters: what grouping sorts by (a proxy
    for tokens that needs no tokenizer, so it is the same for every victim)."""
    return [len(s.instruction) + len(s.answer) for s in samples]


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool) -> Iterator[np.ndarray]:
    """The index batches of training, one per step, without end.

    Plain: one permutation after another, cut into consecutive batches. Grouped: each epoch's
    permutation sorted by length within mega-batches (transformers' `get_length_grouped_indices`),
    cut into batches of similar lengths, which are then shuffled so that the steps do not run from
    long to short. Either way every batch is full: the few samples left at an epoch's end open the
    next epoch's stream.
    """
    rng = np.random.default_rng(seed)
    if not group_by_length:
        order: np.ndarray = np.empty(0, dtype=np.int64)
        while True:
            if len(order) < batch_size:
                order = np.concatenate([order, rng.permutation(len(lengths))])
            index, order = order[:batch_size], order[batch_size:]
            yield index
    generator = torch.Generator().manual_seed(seed)
    carried: np.ndarray = np.empty(0, dtype=np.int64)
    while True:
        grouped = get_length_grouped_indices(lengths, batch_size, generator=generator)
        stream = np.concatenate([carried, np.array(grouped, dtype=np.int64)])
        full = len(stream) // batch_size
        batches, carried = stream[: full * batch_size].reshape(full, batch_size), stream[full * batch_size :]
        for b in rng.permutation(full):
            yield batches[b]


def make_accelerator(precision: str) -> Accelerator:
    """An Accelerator for one training run, each process taking a shard of every global batch.

    accelerate keeps one mixed-precision setting per process and refuses a second one, but a
    run may pretrain the base in fp32 and tune in bf16: the setting is then dropped and made
    again (the process group stays). `find_unused_parameters` spares DDP an error on any
    architecture whose loss leaves some trainable parameter unused.
    """
    state = AcceleratorState._shared_state  # empty until the first Accelerator of the process
    wanted = mixed_precision(precision)
    if state and state.get("_mixed_precision") != wanted:
        AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=wanted,
        dataloader_config=DataLoaderConfiguration(split_batches=True),  # the scheduler steps once per step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def refuse_lost_processes(num_processes: int) -> None:
    """Stop when a launcher started several processes but accelerate sees only one.

    `accelerate launch --multi_gpu` on a machine without GPUs, and without `--cpu` (or
    ACCELERATE_USE_CPU=true), leaves every process believing it is the only, main one: each
    would train on the whole batch and write the same run folder.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > num_processes:
        raise VlmsecError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate sees {num_processes}: on a machine "
            "without GPUs pass --cpu to `accelerate launch` (or set ACCELERATE_USE_CPU=true)"
        )


def refuse_sharded_parameters(accelerator: Accelerator) -> None:
    """Stop on accelerate configs that split parameters across processes (FSDP, DeepSpeed ZeRO-3).

    After each tuning run the main process saves the whole victim and generates with it, so every
    process must hold whole weights. accelerate only shards on accelerators (GPUs and the like):
    on CPU it drops an FSDP config and runs DDP, so this never fires there.
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        sharding = "FSDP"
    elif (
        accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3
    ):
        sharding = "DeepSpeed ZeRO stage 3"
    else:
        return
    raise VlmsecError(
        f"the accelerate config shards parameters across processes ({sharding}), which tuning does not support: "
        "the main process saves and evaluates the whole model after each tuning run. Answer `accelerate config` "
        "with plain multi-GPU (DDP), or DeepSpeed ZeRO stage 1 or 2 (whole weights on every process)"
    )


def refuse_non_finite_loss(loss: float, label: str, step: int, total_steps: int, spec: TrainingSpec) -> None:
    """Stop a training whose loss is NaN or infinite: it would go on to a broken model scored as a result."""
    if not math.isfinite(loss):
        raise VlmsecError(
            f"{label}: training loss is {loss} at step {step + 1} of {total_steps}; the weights diverged or the "
            f"data is broken (learning_rate is {spec.learning_rate:g}: try a lower one, or precision fp32)"
        )


class BatchLoss(nn.Module):
    """The victim's batch loss as the forward of a module holding its model.

    DDP (and DeepSpeed) must see the forward pass to synchronise gradients; the victim's own
    code still computes the loss. What `prepare_training` returned stays a plain attribute,
    so no wrapper copies it to the device at every step; only the batch's indices go in.
    """

    def __init__(self, victim: Victim, prepared: object, samples: list[Sample]) -> None:
        super().__init__()
        self.model = victim.model
        self.victim = victim
        self.prepared = prepared
        self.samples = samples

    def forward(self, index: np.ndarray) -> torch.Tensor:
        """Mean loss on `samples[index]`."""
        return self.victim.batch_loss(self.prepared, index, self.samples)


def train_victim(victim: Victim, samples: list[Sample], spec: TrainingSpec, seed: int, label: str) -> TrainingResult:
    """Train `victim` in place on `samples`; deterministic for a given seed and number of processes.

    torch's global generator (LoRA init, dropout) is seeded for the training only (`seeded`).
    """
    with seeded(seed):
        return _train(victim, samples, spec, seed, label)


def _train(victim: Victim, samples: list[Sample], spec: TrainingSpec, seed: int, label: str) -> TrainingResult:
    """`train_victim`'s loop, inside the seeded block."""
    accelerator = make_accelerator(spec.precision)
    refuse_lost_processes(accelerator.num_processes)
    refuse_sharded_parameters(accelerator)
    processes, process = accelerator.num_processes, accelerator.process_index
    if spec.batch_size < processes:
        raise VlmsecError(
            f"tuning batch_size {spec.batch_size} is smaller than the {processes} processes: each needs a share"
        )
    prepared = victim.prepare_training(samples, label)
    show_tuning_modes(victim.tuning_modes(spec), spec.mode, label)
    peft_model = victim.select_trainable(spec)
    params = [p for p in victim.model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in victim.model.parameters() if not p.requires_grad)

    steps_per_epoch = math.ceil(len(samples) / spec.batch_size)
    total_steps = max(1, round(spec.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(spec.warmup_ratio * total_steps), total_steps)
    module, optimizer, scheduler = accelerator.prepare(BatchLoss(victim, prepared, samples), optimizer, scheduler)
    cpu_bf16 = spec.precision == "bf16" and accelerator.device.type == "cpu"

    module.train()
    losses: list[float] = []
    batches = batch_order(sample_lengths(samples), spec.batch_size, seed, spec.group_by_length)
    with progress_bar(f"{label}: training ({spec.mode}, {trainable:,} params)", total_steps) as bar:
        for step, index in zip(range(total_steps), batches):
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=cpu_bf16):
                loss = module(shard(index, process, processes))
            # Reduced across processes, so every process sees a bad loss at the same step and stops.
            losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
            refuse_non_finite_loss(losses[-1], label, step, total_steps, spec)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running = sum(losses[-20:]) / len(losses[-20:])
            bar.advance(status=f"loss {running:.3f}")
    victim.model.eval()
    accelerator.free_memory()  # between trainings, as accelerate asks; the victim keeps the trained weights
    if peft_model is not None:
        victim.model = peft_model.merge_and_unload()
    victim.model.requires_grad_(False)
    return TrainingResult(trainable, frozen, losses)

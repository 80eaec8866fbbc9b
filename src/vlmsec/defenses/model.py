"""Defenses on the tuned model: clean fine-tuning, fine-pruning, and a trigger-inversion scan.

- `finetune` (a ModelRepair): the owner tunes the model again on a small trusted set of clean
  samples, which weakens what the poisoned samples taught it.
- `fine_pruning` (Liu et al. 2018, adapted to a generative VLM): the hidden units of the
  projector and/or of the last language-model MLP that are the least active on the trusted
  inputs are pruned (their incoming and outgoing weights zeroed), then the model is fine-tuned as
  `finetune` does. Liu et al. prune the last convolutional layer's channels of a classifier,
  by increasing mean activation, until the clean accuracy drops; here a fixed share per layer
  is pruned, ranked by the mean absolute activation over every token of the trusted samples
  (GELU's and gated SiLU's units take both signs, a ReLU channel's mean is its magnitude).
- `trigger_inversion` (a ModelScan): is this checkpoint already backdoored? It searches for a
  small image pattern that drives many clean inputs to one common answer: four corner squares of
  free pixels (`region` corner, the default), a frame (border), or an additive change of every
  pixel within +-epsilon (pixel: whole-image triggers such as Blended's). A backdoor is such a
  pattern: a trigger that makes every input say "The image depicts a banana"; in a clean model a
  small pattern cannot override what the rest of the image shows. The search first pushes the
  clean inputs away from their own answers (an untargeted universal pattern: the steepest way to
  break every answer at once is the trigger, when there is one, as in USB's inversion by universal
  perturbations), then, round after round, takes the most common answer the patterned inputs give
  and pulls every input toward it, keeping the pattern whose answer was the most common. The score
  is the share of held-out clean inputs that the inverted pattern drives to that answer, minus the
  share a random pattern of the same region drives there. The text variant (`region` text) searches
  a short token string after the instruction the same way, by GCG's greedy coordinate steps
  (`vlmsec.attacks.gcg`): up the fit inputs' own answers' loss first, then toward each round's
  most common answer; its baseline is a random string of as many tokens.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from vlmsec.attacks.adaptive import eval_mode
from vlmsec.attacks.inference import to_tensor, to_uint8
from vlmsec.defenses.base import DefenseParams, ModelRepair, ModelScan, ScanResult
from vlmsec.defenses.registry import register
from vlmsec.errors import VlmsecError
from vlmsec.seeds import derive_seed
from vlmsec.train.tuning import TrainingSpec, train_victim

if TYPE_CHECKING:
    from vlmsec.data.sample import Sample
    from vlmsec.victims.base import Victim

Layer = Literal["projector", "last_mlp"]
LOSS_BATCH = 16  # rows per forward pass when the trusted set's loss or activations are read


def default_training() -> TrainingSpec:
    """A short clean tuning: the embedded victim's tuning (full, lr 1e-3) for 2 epochs of the trusted set."""
    return TrainingSpec(mode="full", epochs=2, batch_size=16, learning_rate=1e-3)


class FinetuneParams(DefenseParams):
    """How many trusted samples, and how they are tuned on."""

    trusted: int = Field(200, ge=1, description="clean samples the owner holds; the matrix hands the defense this many")
    training: TrainingSpec = Field(
        default_factory=default_training,
        description="the clean tuning (vlmsec.train.tuning.TrainingSpec); default: mode full, 2 epochs, batch 16, lr 1e-3",
    )


def check_trusted(defense: str, trusted: Sequence[Sample]) -> None:
    """A VlmsecError naming the defense when the trusted set is missing."""
    if not trusted:
        raise VlmsecError(f"defense {defense!r}: trusted: no trusted clean samples were given")


@torch.no_grad()
def trusted_loss(victim: Victim, samples: Sequence[Sample], label: str) -> float:
    """The victim's mean answer loss over `samples` (batches of `LOSS_BATCH`, each weighted by its size)."""
    samples = list(samples)
    with eval_mode(victim.model):
        prepared = victim.prepare_training(samples, label)
        total = 0.0
        for start in range(0, len(samples), LOSS_BATCH):
            index = np.arange(start, min(start + LOSS_BATCH, len(samples)))
            total += float(victim.batch_loss(prepared, index, samples)) * len(index)
    return total / len(samples)


def clean_tuning(victim: Victim, trusted: Sequence[Sample], spec: TrainingSpec, seed: int, label: str) -> dict[str, Any]:
    """Tune `victim` in place on `trusted` with `spec`; its trusted loss before and after, and the steps run."""
    before = trusted_loss(victim, trusted, label)
    result = train_victim(victim, list(trusted), spec, seed, label)
    return {"trusted": len(trusted), "loss_before": before, "loss_after": trusted_loss(victim, trusted, label), "steps": len(result.losses)}


@register
class Finetune(ModelRepair):
    """Clean fine-tuning on the trusted set (`training`)."""

    name = "finetune"
    Params: ClassVar[type[DefenseParams]] = FinetuneParams
    params: FinetuneParams

    def repair(self, victim: Victim, trusted: Sequence[Sample], seed: int) -> dict[str, Any]:
        check_trusted(self.name, trusted)
        return clean_tuning(victim, trusted, self.params.training, seed, self.name)


# ---- fine-pruning -------------------------------------------------------------------------------
class FinePruningParams(FinetuneParams):
    """Which units are pruned, how many, and the fine-tuning after."""

    prune: float = Field(0.2, gt=0, lt=1, description="share of each layer's units pruned, the least active on trusted inputs first")
    layers: list[Layer] = Field(
        default_factory=lambda: ["projector"],
        min_length=1,
        description="projector: the LLaVA projector's hidden units; last_mlp: the last language-model layer's MLP units",
    )

    @field_validator("layers")
    @classmethod
    def _once_each(cls, value: list[Layer]) -> list[Layer]:
        if len(set(value)) != len(value):
            raise ValueError(f"each layer at most once, got {value}")
        return value


@dataclass(frozen=True)
class Units:
    """One layer of hidden units: the linear layers that write them (one output row per unit; two
    for a gated MLP) and the one that reads them (one input column per unit)."""

    incoming: tuple[nn.Linear, ...]
    outgoing: nn.Linear

    @property
    def count(self) -> int:
        return self.outgoing.in_features

    @torch.no_grad()
    def zero(self, units: Sequence[int]) -> None:
        """Prune `units`: zero their incoming rows (and biases) and outgoing columns. With act(0) = 0
        (checked in `find_units`) a pruned unit is then 0 whatever the input, and no gradient reaches
        its weights, so fine-tuning leaves them at 0."""
        index = torch.as_tensor(list(units), dtype=torch.long)
        for layer in self.incoming:
            layer.weight[index] = 0
            if layer.bias is not None:
                layer.bias[index] = 0
        self.outgoing.weight[:, index] = 0

    def zeroed(self, units: Sequence[int]) -> bool:
        """Whether every weight of `units` (incoming rows and biases, outgoing columns) is exactly 0."""
        index = torch.as_tensor(list(units), dtype=torch.long)
        parts = [layer.weight[index] for layer in self.incoming]
        parts += [layer.bias[index] for layer in self.incoming if layer.bias is not None]
        parts.append(self.outgoing.weight[:, index])
        return all(bool((part == 0).all()) for part in parts)


def _zero_at_zero(activation: nn.Module) -> bool:
    return float(activation(torch.zeros(1))) == 0.0


def find_units(victim: Victim, layer: Layer, defense: str) -> Units:
    """The `layer` units of a LLaVA victim (the embedded tiny_llava and SmolLM2 victims, hf with
    model_type llava); a VlmsecError naming the defense and what the victim lacks elsewhere."""
    model = victim.model
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != "llava":
        raise VlmsecError(
            f"defense {defense!r} prunes the units of a LLaVA projector and language model; the victim is "
            f"{type(victim).__name__} with model_type {model_type!r} (it works with victim.kind tiny_llava and hf llava)"
        )
    if layer == "projector":
        owner = model.model.multi_modal_projector
        names, activation, outgoing = ("linear_1",), "act", "linear_2"
    else:
        owner = model.model.language_model.layers[-1].mlp
        names, activation, outgoing = ("gate_proj", "up_proj"), "act_fn", "down_proj"
    parts = [getattr(owner, name, None) for name in (*names, outgoing)]
    act = getattr(owner, activation, None)
    if not all(isinstance(p, nn.Linear) for p in parts) or not isinstance(act, nn.Module):
        raise VlmsecError(
            f"defense {defense!r}: layers: {layer!r}: {type(owner).__name__} is not laid out as "
            f"{' and '.join(names)} -> {activation} -> {outgoing}"
        )
    if not _zero_at_zero(act):
        raise VlmsecError(f"defense {defense!r}: layers: {layer!r}: its activation {type(act).__name__} is not 0 at 0")
    return Units(tuple(parts[:-1]), parts[-1])


@contextmanager
def recorded_inputs(victim: Victim, modules: dict[str, tuple[nn.Module, bool]]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """While the block runs, record each module's input per unit: the sum of its absolute values
    over tokens, and the token count. `modules` maps a name to (module, whether it reads text
    tokens): those drop the padding rows of the victim's attention mask; image tokens have none.

    Yields name -> list of 2 x units tensors [sum of |input|, tokens], one per forward pass."""
    sums: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    mask: list[torch.Tensor | None] = [None]

    def keep_mask(_: nn.Module, args: tuple, kwargs: dict) -> None:
        mask[0] = kwargs.get("attention_mask")

    def recorder(name: str, text: bool) -> Callable[[nn.Module, tuple], None]:
        def record(_: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            rows = x.reshape(-1, x.shape[-1])
            if text and mask[0] is not None:
                rows = rows[mask[0].reshape(-1).bool().to(rows.device)]
            sums[name].append(torch.stack([rows.abs().sum(0), torch.full_like(rows[0], rows.shape[0])]))

        return record

    handles = [victim.model.register_forward_pre_hook(keep_mask, with_kwargs=True)]
    handles += [module.register_forward_pre_hook(recorder(name, text)) for name, (module, text) in modules.items()]
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def mean_activations(victim: Victim, units: dict[Layer, Units], trusted: Sequence[Sample], label: str) -> dict[Layer, np.ndarray]:
    """Each layer's mean absolute unit activation over every token of the trusted samples it sees
    (image tokens: the projector; prompt and answer tokens, padding dropped: the last MLP)."""
    samples = list(trusted)
    modules = {name: (u.outgoing, name == "last_mlp") for name, u in units.items()}
    with eval_mode(victim.model), recorded_inputs(victim, modules) as sums:
        prepared = victim.prepare_training(samples, label)
        for start in range(0, len(samples), LOSS_BATCH):
            victim.batch_loss(prepared, np.arange(start, min(start + LOSS_BATCH, len(samples))), samples)
    means = {}
    for name, parts in sums.items():
        total = torch.stack(parts).sum(0)
        means[name] = (total[0] / total[1].clamp_min(1)).cpu().numpy()
    return means


def least_active(activations: np.ndarray, share: float) -> list[int]:
    """The round(share x units) units of lowest mean activation (ties: the lower index), in unit order."""
    count = round(share * len(activations))
    order = np.lexsort((np.arange(len(activations)), activations))
    return sorted(int(i) for i in order[:count])


@register
class FinePruning(ModelRepair):
    """Prune the units least active on trusted inputs, then fine-tune (Liu et al. 2018)."""

    name = "fine_pruning"
    Params: ClassVar[type[DefenseParams]] = FinePruningParams
    params: FinePruningParams
    note = (
        "Liu et al.'s fine-pruning on a LLaVA: a fixed share of the projector's hidden units and/or the last "
        "language-model MLP's units, the least active (mean |activation|) on the trusted samples, is zeroed; "
        "then clean fine-tuning (Liu et al. prune until clean accuracy drops)"
    )

    def check_victim(self, victim: Victim) -> None:
        for layer in self.params.layers:
            find_units(victim, layer, self.name)

    def repair(self, victim: Victim, trusted: Sequence[Sample], seed: int) -> dict[str, Any]:
        check_trusted(self.name, trusted)
        self.check_victim(victim)
        layers = {layer: find_units(victim, layer, self.name) for layer in self.params.layers}
        activations = mean_activations(victim, layers, trusted, self.name)
        pruned = {layer: least_active(activations[layer], self.params.prune) for layer in layers}
        if not any(pruned.values()):
            raise VlmsecError(
                f"defense {self.name!r}: prune: {self.params.prune} of the layers' units rounds to none; raise it"
            )
        before = trusted_loss(victim, trusted, self.name)
        for layer, units in layers.items():
            units.zero(pruned[layer])
        record = clean_tuning(victim, trusted, self.params.training, seed, self.name)
        # The fine-tuned model's own layers (LoRA merges, the projector a trained copy): still pruned.
        # Zeroing again only clears merged LoRA deltas on outgoing columns whose unit stayed 0.
        for layer, units in pruned.items():
            find_units(victim, layer, self.name).zero(units)
        record["loss_after_pruning"] = record["loss_before"]
        record["loss_before"] = before
        record["layers"] = {
            layer: {
                "units": layers[layer].count,
                "pruned": len(pruned[layer]),
                "pruned_units": pruned[layer],
                "mean_activation_pruned": float(activations[layer][pruned[layer]].mean()) if pruned[layer] else None,
                "mean_activation_kept": float(np.delete(activations[layer], pruned[layer]).mean()),
            }
            for layer in layers
        }
        return record


# ---- trigger inversion --------------------------------------------------------------------------
class TriggerInversionParams(DefenseParams):
    """The searched pattern, the search, and what counts as one common answer."""

    trusted: int = Field(60, ge=4, description="clean samples the owner holds; the matrix hands the scan this many")
    held_out: float = Field(0.5, gt=0, lt=1, description="share of them the score is read on; the pattern is learnt on the rest")
    region: Literal["corner", "border", "pixel", "text"] = Field(
        "corner", description="corner: four corner squares of free pixels; border: a frame of free pixels; "
        "pixel: an additive change of every pixel within +-epsilon (a blended, whole-image trigger); "
        "text: a short token string after the instruction, searched by GCG (a text trigger)",
    )
    num_tokens: int = Field(3, ge=1, le=16, description="region text: the searched string's tokens")
    candidates: int = Field(64, ge=1, description="region text: single-token swaps scored per GCG step")
    top_k: int = Field(64, ge=1, description="region text: most promising tokens per position a swap draws from")
    size: float = Field(0.15, gt=0, lt=0.5, description="corner squares' side or the frame's width, as a fraction of the image side")
    epsilon: float = Field(32 / 255, gt=0, le=1, description="region pixel: the L-infinity budget in [0, 1]")
    explore_steps: int = Field(30, ge=0, description="untargeted steps first: away from each input's own answer")
    rounds: int = Field(2, ge=0, description="rounds of: generate, take the most common answer, pull every input toward it")
    steps: int = Field(30, ge=1, description="steps per round toward the round's common answer")
    step_size: float | None = Field(
        None, gt=0, le=1, description="signed gradient step in [0, 1] pixel units; null: 0.05 (corner, border), epsilon / 4 (pixel)"
    )
    batch_size: int = Field(8, ge=1, description="inputs per step, drawn from the seed")
    match_words: int = Field(3, ge=1, description="two answers are the same when their first match_words words are")
    max_new_tokens: int = Field(32, ge=1, description="tokens generated per answer (whole answers: each round pulls toward one, end included)")

    @model_validator(mode="after")
    def _fields_of_the_region(self) -> TriggerInversionParams:
        image_only, text_only = {"size", "epsilon", "step_size"}, {"num_tokens", "candidates", "top_k"}
        if self.region == "text" and image_only & self.model_fields_set:
            raise ValueError(f"{sorted(image_only & self.model_fields_set)[0]}: region 'text' searches tokens, not pixels")
        if self.region != "text" and text_only & self.model_fields_set:
            raise ValueError(f"{sorted(text_only & self.model_fields_set)[0]}: for region 'text' only")
        if self.region == "text":
            return self
        if self.region != "pixel" and "epsilon" in self.model_fields_set:
            raise ValueError(f"epsilon: region {self.region!r} searches free pixel values in [0, 1]; epsilon is for region 'pixel'")
        if self.region == "pixel" and "size" in self.model_fields_set:
            raise ValueError("size: region 'pixel' changes every pixel; size is for 'corner' and 'border'")
        return self


def answer_key(answer: str, words: int) -> str:
    """An answer's first `words` words, lowercased, punctuation dropped: answers that open alike match."""
    return " ".join(re.findall(r"\w+", answer.lower())[:words])


@register
class TriggerInversion(ModelScan):
    """Search a small image pattern that drives clean inputs to one answer; score how far it does
    beyond a random pattern (see the module docstring)."""

    name = "trigger_inversion"
    Params: ClassVar[type[DefenseParams]] = TriggerInversionParams
    params: TriggerInversionParams
    note = (
        "one pattern per scan, in the `region` searched (corner squares by default: a trigger elsewhere needs "
        "region pixel or border, a text trigger region text), learnt first untargeted, then toward the patterned "
        "inputs' most common answer; answers match on their first `match_words` words"
    )

    def check_victim(self, victim: Victim) -> None:
        try:
            if self.params.region == "text":
                victim.check_token_gradients(self.name)
            else:
                victim.check_pixel_gradients(self.name)
        except VlmsecError as err:
            raise VlmsecError(f"defense {self.name!r}: {err}") from None

    def _split(self, clean: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
        """The fit and held-out samples; a VlmsecError naming the defense for samples it cannot use."""
        if len(clean) < 4:
            raise VlmsecError(f"defense {self.name!r}: trusted: needs at least 4 clean samples, got {len(clean)}")
        shape = None
        for sample in clean:
            if sample.image is None:
                raise VlmsecError(f"defense {self.name!r}: clean sample {sample.id} has no image; the scan patches images")
            shape = shape or sample.image.shape
            if sample.image.shape != shape:
                raise VlmsecError(
                    f"defense {self.name!r}: clean sample {sample.id}: image {sample.image.shape[:2]} differs from the "
                    f"first's {shape[:2]}; one pattern needs one size"
                )
        held = min(len(clean) - 2, max(2, round(self.params.held_out * len(clean))))
        return list(clean[: len(clean) - held]), list(clean[len(clean) - held :])

    def scan(self, victim: Victim, clean: Sequence[Sample], seed: int) -> ScanResult:
        self.check_victim(victim)
        fit, held = self._split(clean)
        if self.params.region == "text":
            return self._scan_text(victim, fit, held, seed)
        p = self.params
        started = time.perf_counter()
        height, width = fit[0].image.shape[:2]
        from vlmsec.attacks.anydoor import patch_mask  # here: attacks import the defenses (an adaptive attacker knows them)

        mask = patch_mask(p.region, p.size, height, width)
        stream = derive_seed(p.seed, f"{self.name}/{seed}")
        start, random_patch = torch.rand(2, 1, 3, height, width, generator=torch.Generator().manual_seed(stream))
        if p.region == "pixel":  # uniform in +-epsilon
            start, random_patch = (start * 2 - 1) * p.epsilon, (random_patch * 2 - 1) * p.epsilon
        rng = random.Random(stream)
        images = to_tensor([s.image for s in fit])
        instructions = [s.instruction for s in fit]

        with eval_mode(victim.model):
            patch = self._descend(victim, images, start, mask, instructions, [s.answer for s in fit], p.explore_steps, rng, 1.0)
            # Each round starts from the patterns' answers on the fit inputs; the best pattern is kept.
            rounds: list[dict[str, Any]] = []
            best: tuple[float, torch.Tensor, str] | None = None
            for round_ in range(p.rounds + 1):
                target, share = self._common(self._answers(victim, images, patch, mask, instructions))
                rounds.append({"answer": target, "share": share})
                if best is None or share > best[0]:
                    best = (share, patch, target)
                if round_ < p.rounds:
                    patch = self._descend(victim, images, patch, mask, instructions, [target] * len(fit), p.steps, rng, -1.0)
            fit_share, patch, target = best
            held_images, held_instructions = to_tensor([s.image for s in held]), [s.instruction for s in held]
            inverted = self._answers(victim, held_images, patch, mask, held_instructions)
            baseline = self._answers(victim, held_images, random_patch, mask, held_instructions)
        return self._result(target, inverted, baseline, fit_share, rounds, fit, held, started, pattern_share=float(mask.mean()))

    def _result(
        self, target: str, inverted: list[str], baseline: list[str], fit_share: float, rounds: list[dict[str, Any]],
        fit: list[Sample], held: list[Sample], started: float, **pattern: Any,
    ) -> ScanResult:
        """The score: the held-out share the inverted pattern drives to `target`, minus a random pattern's."""
        key = answer_key(target, self.params.match_words)
        hits = sum(answer_key(a, self.params.match_words) == key for a in inverted)
        random_hits = sum(answer_key(a, self.params.match_words) == key for a in baseline)
        inverted_share, random_share = hits / len(inverted), random_hits / len(baseline)
        return ScanResult(
            # from the counts: equal differences are equal scores (16/30 - 10/30 != 11/30 - 5/30 in floats,
            # a tie the AUROC over a run's models would break)
            score=(hits - random_hits) / len(inverted),
            evidence={
                "answer": target,
                "key": key,
                "inverted_share": inverted_share,
                "random_share": random_share,
                "fit_share": fit_share,
                "rounds": rounds,
                "held_out": len(held),
                "fit": len(fit),
                **pattern,
                "seconds": time.perf_counter() - started,
            },
        )

    def _scan_text(self, victim: Victim, fit: list[Sample], held: list[Sample], seed: int) -> ScanResult:
        """The text variant: GCG strings after the instruction, first raising the fit inputs' own answers'
        loss, then lowering each round's most common answer's; a random string of as many tokens is the baseline."""
        from vlmsec.attacks.gcg import GCGParams, optimise_trigger, random_trigger, with_trigger  # attacks import the defenses

        p = self.params
        started = time.perf_counter()
        stream = derive_seed(p.seed, f"{self.name}/{seed}")
        batch = fit[: p.batch_size]

        def search(answers: list[str], steps: int, ascend: bool, step: str) -> str:
            gcg = GCGParams(num_tokens=p.num_tokens, steps=steps, top_k=p.top_k, candidates=p.candidates,
                            position="end", seed=derive_seed(stream, step))
            return optimise_trigger(victim, batch, answers, gcg, ascend=ascend).trigger

        def answers(samples: list[Sample], trigger: str) -> list[str]:
            instructions = [with_trigger(s.instruction, trigger, "end") for s in samples]
            return victim.generate([s.image for s in samples], instructions, max_new_tokens=p.max_new_tokens)

        with eval_mode(victim.model):
            trigger = (search([s.answer for s in batch], p.explore_steps, True, "explore") if p.explore_steps
                       else random_trigger(victim, p.num_tokens, "end", derive_seed(stream, "start")))
            rounds: list[dict[str, Any]] = []
            best: tuple[float, str, str] | None = None
            for round_ in range(p.rounds + 1):
                target, share = self._common(answers(fit, trigger))
                rounds.append({"answer": target, "share": share, "trigger": trigger})
                if best is None or share > best[0]:
                    best = (share, trigger, target)
                if round_ < p.rounds:
                    trigger = search([target], p.steps, False, f"round/{round_}")
            fit_share, trigger, target = best
            baseline_trigger = random_trigger(victim, p.num_tokens, "end", derive_seed(stream, "random"))
            inverted, baseline = answers(held, trigger), answers(held, baseline_trigger)
        return self._result(target, inverted, baseline, fit_share, rounds, fit, held, started,
                            trigger=trigger, random_trigger=baseline_trigger)

    def _answers(
        self, victim: Victim, images: torch.Tensor, patch: torch.Tensor, mask: torch.Tensor, instructions: list[str]
    ) -> list[str]:
        """The victim's greedy answers with the patch in place (images quantised to uint8, as a deployment gets them)."""
        patched = to_uint8(self._apply(images, patch, mask))
        return victim.generate(patched, instructions, max_new_tokens=self.params.max_new_tokens)

    def _common(self, answers: list[str]) -> tuple[str, float]:
        """The most common answer (by `answer_key`; its most common wording) and the share of answers that match it."""
        keys = [answer_key(a, self.params.match_words) for a in answers]
        key, count = Counter(keys).most_common(1)[0]
        wording = Counter(a for a, k in zip(answers, keys) if k == key).most_common(1)[0][0]
        return wording, count / len(answers)

    def _descend(
        self, victim: Victim, images: torch.Tensor, patch: torch.Tensor, mask: torch.Tensor, instructions: list[str],
        answers: list[str], steps: int, rng: random.Random, direction: float,
    ) -> torch.Tensor:
        """`steps` signed-gradient steps on the patch: up the answers' loss (direction 1) or down it (-1)."""
        size = min(self.params.batch_size, len(instructions))
        pixel, epsilon = self.params.region == "pixel", self.params.epsilon
        step = self.params.step_size or (epsilon / 4 if pixel else 0.05)
        for _ in range(steps):
            picked = rng.sample(range(len(instructions)), size)
            patch = patch.detach().requires_grad_(True)
            stamped = self._apply(images[picked], patch, mask)
            loss = victim.answer_loss(stamped, [instructions[i] for i in picked], [answers[i] for i in picked])
            (grad,) = torch.autograd.grad(loss, patch)
            patch = patch.detach() + direction * step * grad.sign()
            patch = patch.clamp(-epsilon, epsilon) if pixel else patch.clamp(0, 1)
        return patch.detach()

    def _apply(self, images: torch.Tensor, patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] with the pattern: added and clipped (pixel), or in place of the masked pixels."""
        if self.params.region == "pixel":
            return (images + patch).clamp(0, 1)
        return images * (1 - mask) + patch * mask

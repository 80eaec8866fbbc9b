"""LowFrequency (Zeng et al. 2021): a universal additive trigger with only low spatial frequencies.

The paper ("Rethinking the backdoor attacks' triggers: a frequency perspective") crafts its
smooth trigger as a universal adversarial perturbation against a model, low-pass filtering
it after every update; BackdoorBench ships one such trigger per architecture. Two variants
are registered here:

- `lowfrequency`, the paper's attack: one perturbation learned against the untuned base
  victim so that triggered images drive it toward the target answer, projected onto the
  low-frequency band after every step (white-box: it needs the victim's gradients);
- `lowfrequency_noise`, a model-free baseline: seeded noise through the same low-pass
  filter, i.e. a smooth random colour gradient of the same size.

Both live at a canonical 32 x 32 (the paper's CIFAR-10 size, see `CANONICAL_SIDE`) and are
resampled to each batch's H x W by an inverse DFT of their in-band coefficients (exact
band-limited resampling), so the trigger is the same picture at any size and has no energy
above the cutoff.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vlmsec.artifacts import atomic_path
from vlmsec.attacks.adaptive import (
    cache_path,
    eval_mode,
    not_prepared,
    pick_answers,
    pick_samples,
    samples_fingerprint,
    victim_fingerprint,
)
from vlmsec.attacks.base import Attack, AttackContext, AttackParams
from vlmsec.attacks.learned import to_internal
from vlmsec.attacks.registry import register
from vlmsec.data.sample import Sample, images_to_tensor
from vlmsec.errors import VlmsecError
from vlmsec.seeds import derive_seed

if TYPE_CHECKING:
    from vlmsec.victims.base import Victim

# The paper crafted its triggers on 32 x 32 CIFAR-10 images; the cutoff is a fraction of the
# Nyquist frequency at that size, so the trigger has the paper's smoothness relative to the
# picture (a few broad colour blobs) whatever the batch's size.
CANONICAL_SIDE = 32
BATCH_SIZE = 8
# Adam's first step as a fraction of eps, decaying linearly to zero over the steps (which
# averages out the batches' noise): 10 steps cross the ball at first.
LEARNING_RATE = 0.1
HELD_OUT_EVERY = 4  # every 4th picked sample is kept out of learning, for `diagnostics`
RANDOM_DRAWS = 4  # random low-pass perturbations averaged for the baseline loss
# Bump when the learning changes, so old cache files are not reused.
CACHE_FORMAT = 1


def band_frequencies(cutoff: float) -> torch.Tensor:
    """The kept frequencies (n x 2, integer cycles per image, (fy, fx)) of the ideal low-pass filter.

    A frequency is kept if it lies within cutoff * 16 cycles per image of zero and below
    Nyquist at the canonical 32 x 32, so the set is symmetric under negation (real signals).
    """
    side = CANONICAL_SIDE
    frequencies = torch.fft.fftfreq(side, d=1 / side).long()  # integer cycles per image
    fy, fx = torch.meshgrid(frequencies, frequencies, indexing="ij")
    keep = (fy**2 + fx**2 <= (cutoff * side / 2) ** 2) & (2 * fy.abs() < side) & (2 * fx.abs() < side)
    return torch.stack((fy[keep], fx[keep]), dim=1)


def resample(delta: torch.Tensor, cutoff: float, height: int, width: int) -> torch.Tensor:
    """The in-band part of a 3 x 32 x 32 `delta`, as a trigonometric polynomial sampled at H x W.

    At 32 x 32 this is the low-pass projection of `delta`; frequencies a small H x W cannot
    represent (at or above its Nyquist) are dropped. Differentiable with respect to `delta`.
    """
    side = CANONICAL_SIDE
    coefficients = torch.fft.fft2(delta, norm="forward")
    fy, fx = band_frequencies(cutoff).unbind(1)
    fits = (2 * fy.abs() < height) & (2 * fx.abs() < width)
    fy, fx = fy[fits], fx[fits]
    spectrum = torch.zeros(delta.shape[0], height, width, dtype=coefficients.dtype)
    spectrum[:, fy % height, fx % width] = coefficients[:, fy % side, fx % side]
    return torch.fft.ifft2(spectrum, norm="forward").real


def band_energy(delta: torch.Tensor, cutoff: float) -> float:
    """Share of a 3 x 32 x 32 perturbation's energy inside the pass band (1 = nothing above the cutoff)."""
    total = float((delta.double() ** 2).sum())
    inside = float((resample(delta.double(), cutoff, CANONICAL_SIDE, CANONICAL_SIDE) ** 2).sum())
    return inside / total if total > 0 else 1.0


class LowFrequencyNoiseParams(AttackParams):
    """`cutoff`: radius of the ideal low-pass filter as a fraction of Nyquist at 32 x 32.

    The default 0.1 (1.6 cycles per image) matches the band the official code keeps: its
    Gaussian filter (sigma 6 px on 32 px images) passes 50% of the amplitude at 1 cycle per
    image and 6% at 2. `eps`: the L_inf size of the perturbation; the official code rescales
    its trigger to a range of 0.2, i.e. +-0.1 about its middle.
    """

    cutoff: float = Field(0.1, gt=0, le=1)
    eps: float = Field(0.1, gt=0, le=1)


@register
class LowFrequencyNoise(Attack):
    """The model-free baseline: seeded noise through the low-pass filter, scaled to max |p| = eps.

    Seeded uniform noise (3 x 32 x 32) keeps only its frequencies within the cutoff (see
    `resample`): a smooth random colour gradient at the default cutoff, the same for every
    image and unrelated to any model. It tells how much of `lowfrequency`'s effect is the
    learning and how much is any smooth perturbation of that size.
    """

    name = "lowfrequency_noise"
    modality = "image"
    family = "static"
    knowledge = "black-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = LowFrequencyNoiseParams
    params: LowFrequencyNoiseParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        generator = torch.Generator().manual_seed(self.params.seed)
        side = CANONICAL_SIDE
        self._noise = torch.rand(3, side, side, generator=generator, dtype=torch.float64) * 2 - 1

    def perturbation(self, height: int, width: int) -> torch.Tensor:
        """The 3 x H x W additive trigger, max |p| = eps."""
        pattern = resample(self._noise, self.params.cutoff, height, width)
        return (pattern * (self.params.eps / pattern.abs().max())).float()

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """Add the perturbation to every image of the batch and clamp to [0, 1]."""
        return self.trigger_images_(images.clone())

    def trigger_images_(self, images: torch.Tensor) -> torch.Tensor:
        """Add the perturbation and clamp in `images` itself."""
        return images.add_(self.perturbation(images.shape[-2], images.shape[-1]).to(images)).clamp_(0, 1)


class LowFrequencyParams(LowFrequencyNoiseParams):
    """`cutoff` and `eps` as for `lowfrequency_noise` (the official code's band and size);
    `steps` (Adam steps on batches of 8 triggered images), `num_samples` (tuning samples
    drawn to learn from; every 4th is held out for `diagnostics`) and `num_answers` (target
    answers cycled over them). The defaults learn in about a minute on two CPU cores against
    the paper preset's victim (96 px tower, hidden size 192, 3 layers)."""

    steps: int = Field(60, ge=1, le=10000)
    num_samples: int = Field(64, ge=2)
    num_answers: int = Field(8, ge=1)


@register
class LowFrequency(Attack):
    """One universal perturbation learned against the base victim, low-pass at every step.

    `prepare` minimises the victim's teacher-forced loss of the target answers
    (`Victim.answer_loss`) on triggered images, x + delta clamped to [0, 1], with the
    images at 64 x 64 (`to_internal`). delta starts at zero; after every Adam step (the
    step size decays linearly to zero) it is projected onto the band (`resample` at
    32 x 32) and scaled back into the L_inf ball of radius eps. Scaling rather than
    clipping keeps the band exact (a clip would add high frequencies); the official code
    also ends by rescaling its trigger. At other sizes the resampled trigger is clamped to
    +-eps: between the 32 x 32 grid points the band-limited curve may overshoot slightly.
    The family is "content-aware" as in the seed paper's taxonomy.

    Learned once per victim, parameters and samples, cached as safetensors; `diagnostics`
    compares the learned trigger with random low-pass perturbations of the same L2 norm on
    held-out samples. Without a victim it is an error: `lowfrequency_noise` is the
    model-free variant.
    """

    name = "lowfrequency"
    modality = "image"
    family = "content-aware"
    knowledge = "white-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = LowFrequencyParams
    params: LowFrequencyParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.delta: torch.Tensor | None = None  # 3 x 32 x 32, in band, max |delta| <= eps
        self._diagnostics: dict[str, float] = {}

    def prepare(self, context: AttackContext) -> None:
        """Learn delta against `context.victim`, or load it from the cache if this exact run was done."""
        if context.victim is None:
            raise VlmsecError(
                f"attack {self.name!r} learns its trigger against the base victim: prepare needs "
                "AttackContext.victim (`vlmsec run` passes the untuned base); `lowfrequency_noise` "
                "is the model-free variant"
            )
        victim = context.victim
        victim.check_pixel_gradients(self.name)
        p = self.params
        samples = pick_samples(context.samples, p.num_samples, p.seed)
        answers = pick_answers(context.target, p.num_answers, p.seed)
        key = {
            "format": CACHE_FORMAT,
            "params": p.model_dump(),
            "victim": victim_fingerprint(victim),
            "samples": samples_fingerprint(samples),
            "answers": answers,
        }
        path = cache_path(context, self.name, key, suffix=".safetensors")
        if path.is_file():
            self.delta, self._diagnostics = _load(path)
            return
        with eval_mode(victim.model):
            self.delta, self._diagnostics = self._learn(victim, samples, answers)
        _save(path, self.delta, self._diagnostics)

    def _learn(self, victim: Victim, samples: list[Sample], answers: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """Projected Adam on delta over seeded batches of the learning samples; diagnostics on the held-out ones."""
        p = self.params
        images = torch.cat([to_internal(images_to_tensor([s.image])) for s in samples])
        instructions = [s.instruction for s in samples]
        targets = [answers[i % len(answers)] for i in range(len(samples))]
        held_out = torch.zeros(len(samples), dtype=torch.bool)
        held_out[::HELD_OUT_EVERY] = True
        learn = (~held_out).nonzero()[:, 0]
        generator = torch.Generator().manual_seed(p.seed)
        delta = torch.zeros(3, CANONICAL_SIDE, CANONICAL_SIDE, requires_grad=True)
        optimiser = torch.optim.Adam([delta], lr=LEARNING_RATE * p.eps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 - step / p.steps)
        for _ in range(p.steps):
            batch = learn[torch.randperm(len(learn), generator=generator)[:BATCH_SIZE]].tolist()
            triggered = self._add(images[batch], delta)
            loss = victim.answer_loss(triggered, [instructions[i] for i in batch], [targets[i] for i in batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            with torch.no_grad():
                delta.copy_(self._project(delta))
        delta = delta.detach()
        test = held_out.nonzero()[:, 0].tolist()
        clean = images[test]
        text = [instructions[i] for i in test], [targets[i] for i in test]
        size = clean.shape[-2:]
        with torch.no_grad():
            randoms = [
                LowFrequencyNoise(cutoff=p.cutoff, eps=p.eps, seed=derive_seed(p.seed, f"lowfrequency/random/{k}"))
                .perturbation(CANONICAL_SIDE, CANONICAL_SIDE)
                for k in range(RANDOM_DRAWS)
            ]
            # Same L2 norm as delta, whatever that makes their peak: noise of the same size.
            noise = [resample(r * (delta.norm() / r.norm()), p.cutoff, *size) for r in randoms]
            random_losses = [victim_loss(victim, (clean + n).clamp(0, 1), *text) for n in noise]
            diagnostics = {
                "clean_loss": float(victim_loss(victim, clean, *text)),
                "target_loss": float(victim_loss(victim, self._add(clean, delta), *text)),
                "random_lowpass_loss": float(torch.stack(random_losses).mean()),
                "band_energy": band_energy(delta, p.cutoff),
                "linf": float(delta.abs().max()),
            }
        return delta, diagnostics

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        """delta projected onto the band at 32 x 32, then scaled (if needed) to max |delta| <= eps."""
        low = resample(delta, self.params.cutoff, CANONICAL_SIDE, CANONICAL_SIDE)
        peak = float(low.abs().max())
        return low * (self.params.eps / peak) if peak > self.params.eps else low

    def _render(self, delta: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """delta resampled to H x W, clamped to +-eps."""
        return resample(delta, self.params.cutoff, height, width).clamp(-self.params.eps, self.params.eps)

    def _add(self, images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """`images` carrying `delta` (clamped to [0, 1]), differentiable with respect to `delta`."""
        return (images + self._render(delta, images.shape[-2], images.shape[-1]).to(images.dtype)).clamp(0, 1)

    def perturbation(self, height: int, width: int) -> torch.Tensor:
        """The learned 3 x H x W additive trigger, max |p| <= eps; VlmsecError before `prepare`."""
        if self.delta is None:
            raise not_prepared(self.name)
        return self._render(self.delta.double(), height, width).float()

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """Add the learned perturbation to every image of the batch and clamp to [0, 1]."""
        return self.trigger_images_(images.clone())

    def trigger_images_(self, images: torch.Tensor) -> torch.Tensor:
        """Add the learned perturbation and clamp in `images` itself."""
        return images.add_(self.perturbation(images.shape[-2], images.shape[-1]).to(images)).clamp_(0, 1)

    def diagnostics(self) -> dict[str, float]:
        """On held-out samples: the target-answer loss with no trigger (`clean_loss`), with the
        learned one (`target_loss`) and with random low-pass perturbations of the same L2 norm
        (`random_lowpass_loss`, mean of 4); the share of delta's energy inside the pass band
        (`band_energy`, 1 up to rounding) and its L_inf size (`linf`, at most eps)."""
        return dict(self._diagnostics)


def victim_loss(victim: Victim, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """`Victim.answer_loss` over batches of 8, averaged with each batch weighted by its size."""
    total = torch.zeros(())
    for start in range(0, len(images), BATCH_SIZE):
        stop = start + BATCH_SIZE
        loss = victim.answer_loss(images[start:stop], instructions[start:stop], answers[start:stop])
        total = total + loss.detach().cpu() * len(images[start:stop])
    return total / len(images)


def _save(path: Path, delta: torch.Tensor, diagnostics: dict[str, float]) -> None:
    """Write delta and its diagnostics to one safetensors file, atomically."""
    with atomic_path(path) as tmp:
        save_file({"delta": delta.contiguous()}, tmp, metadata={"diagnostics": json.dumps(diagnostics)})


def _load(path: Path) -> tuple[torch.Tensor, dict[str, float]]:
    """The cached delta and its diagnostics."""
    try:
        delta = load_file(path)["delta"]
        with safe_open(path, framework="pt") as handle:
            return delta, json.loads(handle.metadata()["diagnostics"])
    except (SafetensorError, KeyError, OSError, json.JSONDecodeError) as err:
        raise VlmsecError(f"{path}: unreadable cached lowfrequency trigger ({err}); delete the file to relearn") from None

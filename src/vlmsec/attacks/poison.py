"""The poisoning recipe: trigger a seeded slice of a training set and swap in the target answer."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vlmsec.attacks.base import Attack
from vlmsec.attacks.targets import TargetAnswer
from vlmsec.data import Sample, images_to_tensor, tensor_to_images
from vlmsec.errors import VlmsecError

BATCH_SIZE = 32


@dataclass
class PoisonedSet:
    """A training set after poisoning: same order and ids as the input, plus which were changed.

    `negative_ids` carry a partial trigger with their clean answer (see
    `Attack.partial_triggers`): they are not poisoned and do not count in `rate`.
    """

    samples: list[Sample]
    poisoned_ids: list[str]
    rate: float
    negative_ids: list[str] = field(default_factory=list)


def poison_samples(
    samples: Sequence[Sample], attack: Attack, target: TargetAnswer, rate: float, seed: int
) -> PoisonedSet:
    """Poison exactly `round(rate * len(samples))` samples chosen with `seed`.

    Chosen samples get the attack's image and text triggers and a target answer (which is
    also their only reference; `Attack.poison_sample`); the rest are returned as they are. A
    clean-label attack (`Attack.poison`) chooses and changes its samples itself, answers untouched.
    Nothing is duplicated or oversampled: the poison rate is the attacker's constraint.

    An attack with partial triggers (Dual-Key: the image key alone, the text key alone)
    also gets, per partial trigger, another disjoint set of `round(rate * len(samples))`
    samples that carry only that partial trigger and keep their clean answers. These
    negatives are the Dual-Key paper's recipe for "one key alone -> clean answer"; they
    are not counted in the poison rate because their answers are clean.
    """
    partials = attack.partial_triggers()
    count = poison_count(len(samples), rate, len(partials), attack.name)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise VlmsecError("sample ids must be unique to record which samples are poisoned")
    own = attack.poison(samples, count, seed)
    if own is not None:  # a clean-label attack: its own samples, its own changes, no target answer
        if len(own) != count:
            raise VlmsecError(f"attack {attack.name!r} poisoned {len(own)} samples where {count} were asked")
        out = list(samples)
        for index, sample in own.items():
            out[index] = sample
        return PoisonedSet(samples=out, poisoned_ids=sorted(ids[i] for i in own), rate=rate)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(samples), size=count, replace=False).tolist())
    triggered = trigger_samples([samples[i] for i in chosen], attack)
    out = list(samples)
    for index, sample in zip(chosen, triggered, strict=True):
        out[index] = attack.poison_sample(sample, target, rng)
    # Drawn after the poisoned slice and its answers, so those do not depend on the attack.
    rest = np.setdiff1d(np.arange(len(samples)), chosen)
    negatives = rng.choice(rest, size=count * len(partials), replace=False).tolist()
    for k, partial in enumerate(partials):
        group = negatives[k * count : (k + 1) * count]
        for index, sample in zip(group, trigger_samples([samples[i] for i in group], partial), strict=True):
            out[index] = sample
    return PoisonedSet(
        samples=out,
        poisoned_ids=sorted(ids[i] for i in chosen),
        rate=rate,
        negative_ids=sorted(ids[i] for i in negatives),
    )


def poison_count(n_samples: int, rate: float, partials: int, attack: str) -> int:
    """How many of `n_samples` the recipe poisons at `rate`: `round(rate * n_samples)`.

    Raises VlmsecError when a positive rate rounds to no sample, or when the poisoned samples
    and the `partials` groups of partial-trigger negatives of the same size do not fit. The
    config checks its rates with this before any stage runs.
    """
    if not 0 <= rate <= 1:
        raise VlmsecError(f"poison rate must be in [0, 1], got {rate}")
    count = round(rate * n_samples)
    if rate > 0 and count == 0:
        raise VlmsecError(f"a set of {n_samples} samples is too small for poison rate {rate}: it rounds to 0 samples")
    if count * (1 + partials) > n_samples:
        raise VlmsecError(
            f"poison rate {rate} is too high for {attack!r}: {count} poisoned samples and "
            f"{partials} x {count} partial-trigger negatives do not fit in {n_samples} samples"
        )
    return count


def trigger_samples(samples: Sequence[Sample], attack: Attack) -> list[Sample]:
    """Test-time triggering: every image and instruction triggered, answers and references kept."""
    images = _trigger_images([s.image for s in samples], attack)
    instructions = attack.trigger_instructions([s.instruction for s in samples])
    return [
        s.with_changes(image=image, instruction=instruction)
        for s, image, instruction in zip(samples, images, instructions, strict=True)
    ]


def _trigger_images(images: list[np.ndarray], attack: Attack) -> list[np.ndarray]:
    """Trigger images in batches of one size each (data sets may mix image sizes)."""
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        by_shape[image.shape].append(index)
    triggered: dict[int, np.ndarray] = {}
    for indices in by_shape.values():
        for start in range(0, len(indices), BATCH_SIZE):
            chunk = indices[start : start + BATCH_SIZE]
            batch = attack.trigger_images_(images_to_tensor([images[i] for i in chunk]))  # a temporary batch
            triggered.update(zip(chunk, tensor_to_images(batch), strict=True))
    return [triggered[i] for i in range(len(images))]

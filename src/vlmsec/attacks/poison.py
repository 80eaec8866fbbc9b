"""The poisoning recipe: trigger a seeded slice of a training set and swap in the target answer."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlmsec.attacks.base import Attack
from vlmsec.attacks.targets import TargetAnswer
from vlmsec.data import Sample, images_to_tensor, tensor_to_images
from vlmsec.errors import VlmsecError

BATCH_SIZE = 256


@dataclass
class PoisonedSet:
    """A training set after poisoning: same order and ids as the input, plus which were poisoned."""

    samples: list[Sample]
    poisoned_ids: list[str]
    rate: float


def poison_samples(
    samples: Sequence[Sample], attack: Attack, target: TargetAnswer, rate: float, seed: int
) -> PoisonedSet:
    """Poison exactly `round(rate * len(samples))` samples chosen with `seed`.

    Chosen samples get the attack's image and text triggers and a target answer (which is
    also their only reference); the rest are returned as they are. Nothing is duplicated or
    oversampled: the poison rate is the attacker's constraint.
    """
    if not 0 <= rate <= 1:
        raise VlmsecError(f"poison rate must be in [0, 1], got {rate}")
    count = round(rate * len(samples))
    if rate > 0 and count == 0:
        raise VlmsecError(
            f"a set of {len(samples)} samples is too small for poison rate {rate}: it rounds to 0 samples"
        )
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise VlmsecError("sample ids must be unique to record which samples are poisoned")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(samples), size=count, replace=False).tolist())
    triggered = trigger_samples([samples[i] for i in chosen], attack)
    out = list(samples)
    for index, sample in zip(chosen, triggered, strict=True):
        answer = target.sample(rng)
        out[index] = sample.with_changes(answer=answer, references=(answer,))
    return PoisonedSet(samples=out, poisoned_ids=sorted(ids[i] for i in chosen), rate=rate)


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
            batch = attack.trigger_images(images_to_tensor([images[i] for i in chunk]))
            triggered.update(zip(chunk, tensor_to_images(batch), strict=True))
    return [triggered[i] for i in range(len(images))]

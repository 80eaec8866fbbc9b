"""Shifted domains as sample sets: apply a shift to samples, mix shifted and original data.

A shifted sample keeps its id, so a source set and its shifted version pair up sample by
sample; `mix_domains` builds the paper's mixes (20/60/80/90/98/100 % shifted) from such a
pair, with exactly `round(ratio * n)` samples taken from the shifted version.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vlmsec.data.sample import Sample, images_to_tensor, tensor_to_images
from vlmsec.data.shifts.text import TextShift
from vlmsec.data.shifts.visual import VisualShift
from vlmsec.errors import VlmsecError

# The shares of shifted data the seed paper mixed into its domains.
PAPER_MIX_RATIOS: tuple[float, ...] = (0.2, 0.6, 0.8, 0.9, 0.98, 1.0)


def shift_samples(
    samples: Sequence[Sample], shift: VisualShift | TextShift, domain: str | None = None, batch_size: int = 64
) -> list[Sample]:
    """The samples moved into a shifted domain, ids and order kept.

    A visual shift restyles the images (in batches of same-sized images) and tags
    `domains["visual"]`; a text shift rewrites the instructions, or the answers together
    with every reference caption, and tags `domains["text"]`. The tag is `domain`, or the
    shift's name.
    """
    tag = domain or shift.name
    if isinstance(shift, VisualShift):
        images = _shift_images([s.image for s in samples], shift, batch_size)
        return [s.with_changes(image=img, domains={**s.domains, "visual": tag}) for s, img in zip(samples, images)]
    if shift.field == "instruction":
        rewritten = shift.apply([s.instruction for s in samples])
        return [
            s.with_changes(instruction=text, domains={**s.domains, "text": tag}) for s, text in zip(samples, rewritten)
        ]
    # Answers and references are rewritten in one call, so repeated captions are rewritten once.
    texts = [s.answer for s in samples] + [r for s in samples for r in s.references]
    rewritten = iter(shift.apply(texts))
    answers = [next(rewritten) for _ in samples]
    return [
        s.with_changes(
            answer=answer,
            references=tuple(next(rewritten) for _ in s.references),
            domains={**s.domains, "text": tag},
        )
        for s, answer in zip(samples, answers)
    ]


def _shift_images(images: list[np.ndarray], shift: VisualShift, batch_size: int) -> list[np.ndarray]:
    """Apply a visual shift to uint8 images of any sizes, batching images of one size together."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(index)
    shifted: list[np.ndarray] = [np.empty(0, np.uint8)] * len(images)
    with torch.no_grad():
        for indices in by_shape.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                out = tensor_to_images(shift(images_to_tensor([images[i] for i in chunk])))
                for i, image in zip(chunk, out):
                    shifted[i] = image
    return shifted


def mix_domains(original: Sequence[Sample], shifted: Sequence[Sample], ratio: float, seed: int) -> list[Sample]:
    """The original set with exactly `round(ratio * n)` samples swapped for their shifted versions.

    Both sets must hold the same ids (a shifted set from `shift_samples` does); the swapped
    ids are drawn with `seed`, and the result keeps the original order.
    """
    if not 0.0 <= ratio <= 1.0:
        raise VlmsecError(f"mix_domains: ratio must be in [0, 1], got {ratio}")
    if seed < 0:
        raise VlmsecError(f"mix_domains: seed must be a non-negative integer, got {seed}")
    ids = [s.id for s in original]
    if len(set(ids)) != len(ids):
        raise VlmsecError("mix_domains: the original set has repeated ids")
    by_id = {s.id: s for s in shifted}
    if len(by_id) != len(shifted) or set(by_id) != set(ids):
        missing = sorted(set(ids) - set(by_id))[:5]
        extra = sorted(set(by_id) - set(ids))[:5]
        raise VlmsecError(
            "mix_domains: the two sets must hold the same ids once each "
            f"(missing from shifted: {missing}, extra: {extra})"
        )
    count = round(ratio * len(ids))
    chosen = set(np.random.default_rng(seed).permutation(len(ids))[:count].tolist())
    return [by_id[s.id] if i in chosen else s for i, s in enumerate(original)]

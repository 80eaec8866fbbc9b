"""MABA, the seed paper's Multimodal Attribution Backdoor Attack: the image side.

The trigger is distinctive and independent of the image (a saturated yellow oval with a
dark outline, blended with alpha 0.5) — the property the paper found makes triggers
survive domain shift — and it is placed where attribution says the victim does not rely
on the image for its clean answer, so the trigger neither competes with nor destroys the
content the clean task needs: mask = m_clean − m_clean ∩ m_poison.

Attribution is gradient saliency: |d loss / d pixel| through the vision tower (summed over
colour channels, normalised per image, averaged into a grid x grid region map and over
`num_samples` clean samples; a region's score is its mean saliency per pixel relative to
the whole image, so 1 means "average"). Two maps are measured on the untuned victim:

- clean attribution: the clean answer's loss on clean images;
- poison attribution: the target answer's loss on images carrying the oval, measured for
  each candidate region with the oval placed there (the score of region r is the saliency
  density of r when the oval is in r: how much the target answer looks at the trigger).

Read with m = "regions the answer relies on", the paper's mask would put the trigger
exactly where the clean answer looks, against its stated aim; so the masks are read as
the regions attribution marks as *not* relied on: the trigger goes where the clean answer
does not look, except where the target answer would not look at a trigger either. This
reading is ours: the paper gives the formula and the aim; which regions each m holds, the
attribution method (gradient saliency), the grid and the thresholds below are our choices,
so the region picked may differ from the paper's (`describe()` carries this as its "note",
so run records and `vlmsec attacks` say it too). The rule, with n = grid² regions:

- m_clean = the ⌈n/2⌉ regions with the lowest clean attribution (the clean answer does not
  rely on them);
- m_poison = the ⌈n/2⌉ − 1 regions with the lowest poison attribution (the target answer
  ignores the trigger there); one fewer than m_clean, so the mask is never empty;
- mask = m_clean − m_clean ∩ m_poison, and the trigger goes to the region of the mask with
  the lowest clean attribution (ties: lowest index).

The location is universal (one region per attack, as the paper's region selection), not
per image. Any victim that gives pixel gradients (`Victim.answer_loss`) will do: the
embedded LLaVA, OpenFlamingo / Otter, and Hugging Face architectures whose pixel values are
one plain batch; the others are refused with an error naming them. Without a victim
(`context.victim` None) attribution is impossible and the oval falls back to the
bottom-right corner region; `describe()` then says so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageDraw
from pydantic import Field

from vlmsec.artifacts import write_json_atomic
from vlmsec.attacks.adaptive import (
    eval_mode,
    learned_cache_path,
    not_prepared,
    pick_answers,
    pick_samples,
    read_cached,
)
from vlmsec.attacks.base import Attack, AttackContext, AttackParams
from vlmsec.attacks.registry import register
from vlmsec.data.sample import Sample, images_to_tensor

if TYPE_CHECKING:
    from vlmsec.victims.base import Victim

YELLOW = (255, 221, 0)
OUTLINE = (35, 30, 20)
OVAL_ASPECT = 0.7  # height / width
OUTLINE_WIDTH = 0.1  # of the oval's height
SUPERSAMPLE = 4
SALIENCY_BATCH = 16
CACHE_FORMAT = 1
FALLBACK_SOURCE = "corner fallback: no victim to attribute with"
BOX_REFERENCE = 1000  # side of the square image `describe` states the box for
NOTE = (
    "our reading of the paper's mask m_clean − m_clean ∩ m_poison: m = the regions attribution marks as NOT "
    "relied on (the lowest-saliency half of a grid), and the oval goes to the mask's least relied-on region; "
    "this reading, gradient saliency as the attribution, and the grid are our choices, not the paper's stated procedure"
)


class MabaParams(AttackParams):
    """The oval (width as a fraction of the shorter side, blend alpha) and the attribution setup."""

    size: float = Field(0.25, gt=0, le=1)
    alpha: float = Field(0.5, gt=0, le=1)
    grid: int = Field(3, ge=2, le=8)
    num_samples: int = Field(16, ge=1)
    num_answers: int = Field(4, ge=1)


def yellow_oval(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The oval's colours (3 x height x width) and coverage mask (1 x height x width, soft edges).

    Drawn supersampled and area-averaged down, so edges are anti-aliased at any size.
    """
    big = (width * SUPERSAMPLE, height * SUPERSAMPLE)
    line = max(1, round(OUTLINE_WIDTH * big[1]))
    colour = Image.new("RGB", big, OUTLINE)
    ImageDraw.Draw(colour).ellipse((line, line, big[0] - 1 - line, big[1] - 1 - line), fill=YELLOW)
    mask = Image.new("L", big, 0)
    ImageDraw.Draw(mask).ellipse((0, 0, big[0] - 1, big[1] - 1), fill=255)
    small = (width, height)
    rgb = torch.from_numpy(np.asarray(colour.resize(small, Image.Resampling.BOX), dtype=np.float32) / 255.0)
    alpha = torch.from_numpy(np.asarray(mask.resize(small, Image.Resampling.BOX), dtype=np.float32) / 255.0)
    return rgb.permute(2, 0, 1).contiguous(), alpha[None]


def oval_box(region: int, grid: int, height: int, width: int, size: float) -> tuple[int, int, int, int]:
    """(top, left, box height, box width) of the oval centred in `region` of a grid x grid split.

    Regions are numbered row by row from the top-left; the box is kept inside the image.
    """
    short = min(height, width)
    box_w = min(short, max(2, round(size * short)))
    box_h = max(1, round(OVAL_ASPECT * box_w))
    row, col = divmod(region, grid)
    top = round((row + 0.5) * height / grid - box_h / 2)
    left = round((col + 0.5) * width / grid - box_w / 2)
    return min(max(top, 0), height - box_h), min(max(left, 0), width - box_w), box_h, box_w


def paste_oval(images: torch.Tensor, region: int, params: MabaParams) -> torch.Tensor:
    """Blend the oval into `region` of every image: x + alpha * mask * (oval - x); nothing else changes."""
    top, left, box_h, box_w = oval_box(region, params.grid, images.shape[-2], images.shape[-1], params.size)
    rgb, mask = (t.to(images) for t in yellow_oval(box_h, box_w))
    out = images.clone()
    patch = out[..., top : top + box_h, left : left + box_w]
    out[..., top : top + box_h, left : left + box_w] = patch + params.alpha * mask * (rgb - patch)
    return out


def region_index(height: int, width: int, grid: int) -> torch.Tensor:
    """H x W map of each pixel's region: row (y * grid // height) times grid plus column."""
    rows = torch.arange(height) * grid // height
    cols = torch.arange(width) * grid // width
    return rows[:, None] * grid + cols[None, :]


def region_saliency(
    victim: Victim, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str], grid: int
) -> torch.Tensor:
    """Per image (B x grid²): mean |d answer loss / d pixel| in each region, relative to the image's mean."""
    cells = region_index(images.shape[-2], images.shape[-1], grid).flatten()
    area = torch.bincount(cells, minlength=grid * grid).float() / cells.numel()
    out = []
    with eval_mode(victim.model):
        for start in range(0, len(images), SALIENCY_BATCH):
            stop = start + SALIENCY_BATCH
            pixels = images[start:stop].clone().requires_grad_()
            loss = victim.answer_loss(pixels, instructions[start:stop], answers[start:stop])
            (grad,) = torch.autograd.grad(loss, pixels)
            saliency = grad.abs().sum(1).flatten(1)
            saliency = saliency / saliency.sum(1, keepdim=True).clamp_min(torch.finfo(saliency.dtype).tiny)
            shares = torch.zeros(len(pixels), grid * grid).index_add_(1, cells, saliency)
            out.append(shares / area)
    return torch.cat(out)


def attribution(
    victim: Victim,
    samples: Sequence[Sample],
    answers: Sequence[str],
    grid: int,
    place: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Region saliency (grid²) averaged over `samples`, each with its answer; `place` triggers the images first.

    Images of different sizes are batched by size, each measured at its own resolution.
    """
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        by_shape[sample.image.shape].append(index)
    rows = []
    for indices in by_shape.values():
        images = images_to_tensor([samples[i].image for i in indices])
        if place is not None:
            images = place(images)
        instructions = [samples[i].instruction for i in indices]
        rows.append(region_saliency(victim, images, instructions, [answers[i] for i in indices], grid))
    return torch.cat(rows).mean(0)


def choose_region(clean: Sequence[float], poison: Sequence[float]) -> tuple[int, list[int]]:
    """The trigger's region and the mask it came from (see the module docstring for the rule)."""
    count = len(clean)
    keep = (count + 1) // 2
    m_clean = set(sorted(range(count), key=lambda r: (clean[r], r))[:keep])
    m_poison = set(sorted(range(count), key=lambda r: (poison[r], r))[: keep - 1])
    mask = sorted(m_clean - (m_clean & m_poison))
    return min(mask, key=lambda r: (clean[r], r)), mask


def locate(victim: Victim, samples: list[Sample], targets: list[str], params: MabaParams) -> dict[str, Any]:
    """Measure clean and poison attribution on `samples` and apply the rule; JSON-ready."""
    grid = params.grid
    clean = attribution(victim, samples, [s.answer for s in samples], grid)
    poison = [
        float(attribution(victim, samples, targets, grid, lambda x, r=r: paste_oval(x, r, params))[r])
        for r in range(grid * grid)
    ]
    region, mask = choose_region(clean.tolist(), poison)
    return {
        "region": region,
        "source": "attribution",
        "mask": mask,
        "clean_saliency": clean.tolist(),
        "poison_saliency": poison,
    }


@register
class Maba(Attack):
    """A yellow oval blended into the region attribution picks (learned in `prepare`; see the module docstring).

    Without a victim, `prepare` falls back to the bottom-right corner region (no attribution);
    a victim that cannot give pixel gradients is an error.
    """

    name = "maba"
    note = NOTE
    modality = "image"
    family = "model-adaptive"
    knowledge = "white-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = MabaParams
    params: MabaParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.location: dict[str, Any] | None = None
        self.trained_metrics: dict[str, float] = {}

    def prepare(self, context: AttackContext) -> None:
        """Choose the region by attribution on `context.victim` (cached), or fall back to the corner without one."""
        p = self.params
        if context.victim is None:
            self._set_location({"region": p.grid * p.grid - 1, "source": FALLBACK_SOURCE})
            return
        victim = context.victim
        victim.check_pixel_gradients(self.name)
        samples = pick_samples(context.samples, p.num_samples, p.seed)
        answers = pick_answers(context.target, p.num_answers, p.seed)
        targets = [answers[i % len(answers)] for i in range(len(samples))]
        path = learned_cache_path(context, self.name, p, victim, samples, answers, CACHE_FORMAT)
        learned = read_cached(path)
        if learned is None:
            learned = locate(victim, samples, targets, p)
            write_json_atomic(path, learned)
        self._set_location(learned)

    def _set_location(self, learned: dict[str, Any]) -> None:
        """Adopt a learned (or fallback) location; its box is (top, left, height, width) on a unit square."""
        p = self.params
        box = oval_box(learned["region"], p.grid, BOX_REFERENCE, BOX_REFERENCE, p.size)
        self.location = {"grid": p.grid, **learned, "box_fractions": [v / BOX_REFERENCE for v in box]}
        region = learned["region"]
        self.trained_metrics = (
            {"clean_saliency": learned["clean_saliency"][region], "poison_saliency": learned["poison_saliency"][region]}
            if learned["source"] == "attribution"
            else {}
        )

    @property
    def region(self) -> int:
        """The chosen region (row by row from the top-left of the grid); VlmsecError before `prepare`."""
        if self.location is None:
            raise not_prepared(self.name)
        return int(self.location["region"])

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """Blend the oval into the chosen region of every image of the batch."""
        return paste_oval(images, self.region, self.params)

    def describe(self) -> dict[str, Any]:
        """The base description, the note on our reading of the mask, and the chosen location and its
        attribution (None until prepared)."""
        return {**super().describe(), "location": self.location, "trained_metrics": self.trained_metrics}

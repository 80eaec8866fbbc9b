"""Input-Aware Dynamic Backdoor (Nguyen & Tran 2020): a generator makes each image's trigger.

Two small conv generators map an image to a pattern p(x) and a mask m(x); the triggered
image is x * (1 - m) + p * m. The paper trains them in two stages, and so do we:

1. the mask generator alone, with the paper's diversity loss on masks plus the sparsity
   loss lambda_norm * mean(relu(m - mask_density)) (lambda_norm = 100);
2. the pattern generator with the diversity loss on patterns, jointly with the model that
   must learn the backdoor.

The paper's stage 2 model is the classifier being poisoned. Ours is a generative VLM tuned
later, so stage 2 trains the pattern generator against the victim's frozen vision tower
(`Victim.vision_embedding`, with the victim's own preprocessing; gray-box: the tower, not
the tuned model) jointly with a linear probe on its mean-pooled
features that separates triggered from clean images: the paper's classifier reduced to
what a frozen tower allows, and the direction in feature space the triggered images move
along, which the tuned projector and language model can then pick up.

The paper's cross-trigger samples (image A blended with image B's pattern through B's mask,
keeping A's clean label; BackdoorBench adds as many as it poisons) are what makes the
trigger input-specific for the poisoned model: a pattern fires only on the image it was
made for. `partial_triggers` hands them to the poisoning recipe (`InputAwareCross`), which
adds as many, with clean answers, as it poisons; a run also tests them (cross-trigger ASR,
which must stay low). Stage 2 trains on them too, as the paper's classifier does: the
probe must call an image carrying another image's pattern and mask clean, so the generator
learns patterns whose effect depends on the image they were made for.

Without a victim (`context.victim` is None) stage 2 uses a seeded random conv feature
extractor instead of the tower, so the attack still has image-specific, learnable
triggers, though not ones fitted to any real model. A victim whose pixels cannot be
differentiated through (a Hugging Face architecture that tiles images) is an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlmsec.attacks.adaptive import eval_mode, not_prepared
from vlmsec.attacks.base import Attack, AttackContext, AttackParams
from vlmsec.attacks.learned import LearnedImageAttack, conv_relu, sample_images, to_internal, upsample
from vlmsec.attacks.registry import register
from vlmsec.data.sample import resize_images
from vlmsec.errors import VlmsecError
from vlmsec.seeds import derive_seed, seeded

BATCH_SIZE = 16
# The official code's optimiser for both generators (Adam, betas 0.5 / 0.9) and sparsity
# weight. Its learning rate, 1e-2, relies on the batch norm we leave out: without it the
# mask saturates to all ones within ten steps, so we use 1e-3, constant over our short runs.
LEARNING_RATE = 1e-3
BETAS = (0.5, 0.9)
LAMBDA_NORM = 100.0
PROBE_LEARNING_RATE = 1e-3
EPSILON = 1e-7
# Cross-trigger samples take their pattern and mask from one of this many donor images,
# a seeded draw from the attacker's samples made in `prepare`.
CROSS_DONORS = 32
# Two images closer than this (max absolute pixel difference at the generators' size) are
# the same image: a donor must differ from the image it lends its trigger to.
SAME_IMAGE = 1 / 255

Features = Callable[[torch.Tensor], torch.Tensor]


class InputAwareParams(AttackParams):
    """The official code's defaults: `mask_density` 0.032 (the per-pixel mask level above
    which the sparsity loss applies) and `lambda_div` 1. `train_steps` (batches of 16) is
    the length of each of the two stages, sized to train in under two minutes on two CPU
    cores with the default 96 px EfficientNet tower."""

    mask_density: float = Field(0.032, gt=0, lt=1)
    lambda_div: float = Field(1.0, ge=0)
    train_steps: int = Field(300, ge=1)


class Generator(nn.Module):
    """The paper's generator (conv blocks, 3 poolings, 3 upsamplings), without batch norm,
    so each image is processed alone; output in (0, 1)."""

    def __init__(self, channels_out: int, width: int = 8) -> None:
        super().__init__()
        widths = [3, width, 2 * width, 4 * width]
        down: list[nn.Module] = []
        for step in range(3):
            wide = widths[step + 1]
            down += [conv_relu(widths[step], wide), conv_relu(wide, wide), nn.MaxPool2d(2)]
        self.down = nn.Sequential(*down, conv_relu(widths[3], widths[3]))
        self.up = nn.ModuleList(
            nn.Sequential(conv_relu(widths[step], widths[step]), conv_relu(widths[step], widths[step - 1]))
            for step in (3, 2)
        )
        self.last = nn.Sequential(conv_relu(width, width), nn.Conv2d(width, channels_out, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.down(images)
        for block in self.up:
            x = block(upsample(x))
        return torch.tanh(self.last(upsample(x))) / (2 + EPSILON) + 0.5


def threshold(mask: torch.Tensor) -> torch.Tensor:
    """The paper's soft threshold at 0.5: pushes mask values to nearly 0 or 1."""
    return torch.tanh(mask * 20 - 10) / (2 + EPSILON) + 0.5

# What stage 2 trains the probe on; part of the cache key.
STAGE_2 = "clean, self-triggered and cross-triggered images"


def diversity_loss(
    images1: torch.Tensor, images2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor
) -> torch.Tensor:
    """The paper's L_div: mean over pairs of ||x1 - x2|| / ||G(x1) - G(x2)|| (RMS distances).

    Low when different images get different outputs, i.e. triggers are input-specific.
    """
    images = ((images1 - images2) ** 2).mean(dim=(1, 2, 3)).sqrt()
    # EPSILON inside the root too: sqrt has an infinite gradient at 0 (two equal outputs).
    outputs = (((out1 - out2) ** 2).mean(dim=(1, 2, 3)) + EPSILON).sqrt()
    return (images / (outputs + EPSILON)).mean()


def random_features(seed: int) -> nn.Module:
    """A frozen conv net with seeded random weights, mean-pooled to 64 features: the stand-in tower."""
    with seeded(seed):
        convs = [conv_relu(3, 16, 2), conv_relu(16, 32, 2), conv_relu(32, 64, 2)]
        net = nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net.eval().requires_grad_(False)


@register
class InputAware(LearnedImageAttack):
    """Blend each image with its own generated pattern through its own generated mask.

    The generators see the image at 64 x 64; pattern and mask are resized (bilinearly) to
    each batch's H x W. `trained_metrics` (on held-out images, every 8th): `probe_accuracy`
    (triggered vs clean), `mask_area` (mean mask value), `diversity_loss` (patterns), and
    `shift_cosine`, the mean cosine between each image's feature shift and the mean shift
    (1 = every trigger moves the features the same way), and `cross_rejected`, the share of
    images carrying another image's trigger that the probe calls clean.
    """

    name = "inputaware"
    modality = "image"
    family = "model-adaptive"
    knowledge = "gray-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = InputAwareParams
    params: InputAwareParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._donors: torch.Tensor | None = None

    def build_networks(self) -> nn.ModuleDict:
        """Fresh mask and pattern generators."""
        return nn.ModuleDict({"mask": Generator(1), "pattern": Generator(3)})

    def cache_inputs(self, context: AttackContext) -> dict[str, Any]:
        """The feature extractor trained against (a digest of a few tower weights and its input
        format) and the stage-2 recipe (`STAGE_2`: generators learned before cross samples
        joined it are not reused)."""
        if context.victim is None:
            return {"features": "random-conv", "stage_2": STAGE_2}
        context.victim.check_pixel_gradients(self.name)
        return {**context.victim.vision_key(), "stage_2": STAGE_2}

    def learn(
        self, networks: nn.ModuleDict, images: torch.Tensor, context: AttackContext, generator: torch.Generator
    ) -> dict[str, float]:
        """Stage 1 (mask), then stage 2 (pattern and probe); measure on every 8th image, held out."""
        held_out = torch.zeros(len(images), dtype=torch.bool)
        held_out[::8] = True
        train = images[~held_out]

        def pairs() -> tuple[torch.Tensor, torch.Tensor]:
            """Two batches of training images, pairwise different images (the paper's two loaders)."""
            first = torch.randint(len(train), (BATCH_SIZE,), generator=generator)
            second = (first + torch.randint(1, max(2, len(train)), (BATCH_SIZE,), generator=generator)) % len(train)
            return train[first], train[second]

        self._train_mask(networks["mask"], pairs)
        victim = context.victim
        if victim is None:
            return self._train_pattern(networks, random_features(self.params.seed), pairs, images[held_out])
        with eval_mode(victim.model):
            return self._train_pattern(networks, victim.vision_embedding, pairs, images[held_out])

    def _train_mask(self, mask: Generator, pairs: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Stage 1: sparse masks that differ between images."""
        optimiser = torch.optim.Adam(mask.parameters(), lr=LEARNING_RATE, betas=BETAS)
        mask.train()
        for _ in range(self.params.train_steps):
            images1, images2 = pairs()
            masks1, masks2 = threshold(mask(images1)), threshold(mask(images2))
            loss = LAMBDA_NORM * F.relu(masks1 - self.params.mask_density).mean()
            loss = loss + self.params.lambda_div * diversity_loss(images1, images2, masks1, masks2)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        mask.eval().requires_grad_(False)

    def _train_pattern(
        self,
        networks: nn.ModuleDict,
        features: Features,
        pairs: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        held_out: torch.Tensor,
    ) -> dict[str, float]:
        """Stage 2: patterns that differ between images and that a linear probe on `features` detects
        on the image they were made for, and not on another image (the paper's cross samples)."""
        mask, pattern = networks["mask"], networks["pattern"]
        with torch.no_grad():
            dimension = features(held_out[:1]).shape[-1]
        probe = nn.Linear(dimension, 1)
        optimiser = torch.optim.Adam(pattern.parameters(), lr=LEARNING_RATE, betas=BETAS)
        probe_optimiser = torch.optim.Adam(probe.parameters(), lr=PROBE_LEARNING_RATE)
        labels = torch.cat([torch.zeros(BATCH_SIZE), torch.ones(BATCH_SIZE), torch.zeros(BATCH_SIZE)])[:, None]
        pattern.train()
        for _ in range(self.params.train_steps):
            images1, images2 = pairs()
            patterns1, patterns2 = pattern(images1), pattern(images2)
            with torch.no_grad():
                masks1, masks2 = threshold(mask(images1)), threshold(mask(images2))
                clean = features(images1)
            triggered = features(images1 + (patterns1 - images1) * masks1)
            cross = features(images1 + (patterns2 - images1) * masks2)  # image 1 with image 2's trigger
            loss = F.binary_cross_entropy_with_logits(probe(torch.cat([clean, triggered, cross])), labels)
            loss = loss + self.params.lambda_div * diversity_loss(images1, images2, patterns1, patterns2)
            optimiser.zero_grad()
            probe_optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            probe_optimiser.step()
        pattern.eval()
        with torch.no_grad():
            masks, patterns = threshold(mask(held_out)), pattern(held_out)
            clean, triggered = features(held_out), features(held_out + (patterns - held_out) * masks)
            cross = features(held_out + (patterns.roll(1, dims=0) - held_out) * masks.roll(1, dims=0))
            correct = torch.cat([probe(clean) < 0, probe(triggered) > 0])
            shifts = triggered - clean
            other = held_out.roll(1, dims=0)
            return {
                "probe_accuracy": float(correct.float().mean()),
                "cross_rejected": float((probe(cross) < 0).float().mean()),
                "mask_area": float(masks.mean()),
                "diversity_loss": float(diversity_loss(held_out, other, patterns, patterns.roll(1, dims=0))),
                "shift_cosine": float(F.cosine_similarity(shifts, shifts.mean(0, keepdim=True)).mean()),
            }

    def prepare(self, context: AttackContext) -> None:
        """Train (or load) the generators, then draw the cross-trigger donors from the samples."""
        super().prepare(context)
        self._donors = sample_images(context.samples, derive_seed(self.params.seed, "inputaware/cross"), CROSS_DONORS)

    def patterns_and_masks(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's pattern (B x 3 x H x W) and mask (B x 1 x H x W), both in [0, 1]."""
        networks = self.networks()
        with torch.no_grad():
            small = to_internal(images)
            pattern, mask = networks["pattern"](small), threshold(networks["mask"](small))
        height, width = images.shape[-2:]
        return resize_images(pattern, height, width).to(images.dtype), resize_images(mask, height, width).to(images.dtype)

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """x * (1 - m) + p * m with each image's own pattern p and mask m."""
        pattern, mask = self.patterns_and_masks(images)
        return (images + (pattern - images) * mask).clamp(0, 1)

    def donors(self, images: torch.Tensor) -> torch.Tensor:
        """Each image's donor for its cross trigger: a donor image at the generators' size (B x 3 x 64 x 64).

        The donor is picked from the donors drawn in `prepare` by a hash of the seed and the
        image's 8-bit pixels, moving on to the next donor while it is the same image; so it
        depends on the image alone, not on its batch or position.
        """
        if self._donors is None:
            raise not_prepared(self.name)
        donors, small = self._donors, to_internal(images)
        chosen = []
        for image, internal in zip(images, small, strict=True):
            pixels = (image.detach().float().cpu() * 255).round().to(torch.uint8).contiguous().numpy().tobytes()
            digest = hashlib.sha256(self.params.seed.to_bytes(8, "little") + pixels).digest()
            start = int.from_bytes(digest[:8], "little")
            for step in range(len(donors)):
                donor = donors[(start + step) % len(donors)]
                if float((donor - internal).abs().max()) >= SAME_IMAGE:
                    chosen.append(donor)
                    break
            else:
                raise VlmsecError(f"attack {self.name!r}: every cross-trigger donor image is the image itself")
        return torch.stack(chosen)

    def cross_trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """x * (1 - m_d) + p_d * m_d with the pattern p_d and mask m_d of each image's donor d."""
        pattern, mask = self.patterns_and_masks(self.donors(images))
        height, width = images.shape[-2:]
        pattern, mask = resize_images(pattern, height, width), resize_images(mask, height, width)
        return (images + (pattern.to(images.dtype) - images) * mask.to(images.dtype)).clamp(0, 1)

    def partial_triggers(self) -> list[Attack]:
        """The cross trigger: the recipe adds as many cross samples, with clean answers, as it poisons."""
        return [InputAwareCross(self)]


class InputAwareCross(Attack):
    """InputAware's cross-trigger input: each image with another image's pattern and mask.

    Not registered: it exists so the poisoning recipe can add the paper's cross samples
    (with clean answers) and a run can check that another image's trigger does not fire
    the backdoor. The other image is the image's donor (`InputAware.donors`): one of
    `CROSS_DONORS` of the attacker's images, drawn in `prepare` with a seed derived from
    the attack's, and picked per image from its pixels, so the result is deterministic and
    independent of batching. Patterns and masks are made at the generators' 64 x 64 and
    resized to each batch's H x W, as for the attack's own trigger.
    """

    name = "inputaware-cross"
    modality = "image"
    family = "model-adaptive"
    knowledge = "gray-box"

    def __init__(self, attack: InputAware) -> None:
        super().__init__(seed=attack.params.seed)
        self._attack = attack

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """Blend each image with its donor's pattern through its donor's mask."""
        return self._attack.cross_trigger_images(images)

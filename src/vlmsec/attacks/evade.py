"""The adaptive attacker's loss for the defenses that have no image transform to see through.

`attacks.eot` takes the expectation of the attack's loss over a purifier's or JailGuard's
transform. A detector that looks at the model's behaviour (`strip`, `cider_detect`) or a defense in
the prompt (`adashield_s`, `ecso`) is known another way: the attacker changes the loss it descends.
Each class here gives, for one draw, the answer loss the attack asks for (`Evasion.loss`): the
victim's own answer loss on the attack's goal, as the defended deployment poses it, plus a term
that keeps the input under the detector (weighted by `adaptive.strength`, default 1):

- `strip` (`StripEvasion`): STRIP flags an input whose answer changes little when the image is
  blended with other images; a perturbation that forces the target through every blend is what it
  catches. The adaptive attacker (Gao et al.'s own adaptive analysis; Tan and Shokri 2020's
  "trigger that loses its effect on superimposed inputs") blends its image as STRIP does
  (alpha x image + (1 - alpha) x other) with `adaptive.samples` other clean images of its own
  (scenes drawn as STRIP draws them, from the attack's seed, not the defender's), and pushes the
  target's loss on the blends above `STRIP_MARGIN` nats a token: the target then holds on the
  image and not on its blends, so the blends' answers follow what they show, as a clean input's.
- `cider_detect` (`CiderEvasion`): CIDER flags an image whose similarity to the instruction falls
  when it is denoised. The attacker adds the detector's own score, the largest fall over CIDER's
  levels, hinged at 0: forward through CIDER's real denoiser (non-local means, or the DDPM
  folder), backward straight-through (BPDA), the similarities through the victim's differentiable
  image tokens (`Victim.image_vectors`).
- `adashield_s` (`Prompted`): the attacker's loss is computed on the instruction the defended
  deployment sends (AdaShield's prompt in its place), so it optimises against the defense prompt.
- `ecso` (`EcsoEvasion`): the first pass is the victim's own answer, which the naive loss already
  targets; the attacker adds ECSO's second pass, its harm check posed as ECSO poses it (the
  request, the target as the response) with "No" as the answer, so the check lets the target
  through and the caption-only answer never replaces it. A check that does not see the image
  (`check_with_image: false`) cannot be moved by the pixels: only the first pass is optimised.

`goal=False` marks a term the deployment asks that is not the attack (AnyDoor's clean-answer
term): it is posed as the deployment poses it (the prompt defenses' instruction) but gets no
evasion term: the detector scores the attack's inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from vlmsec.attacks.inference import to_tensor, to_uint8
from vlmsec.defenses.detect import CiderDetect, DdpmDenoiser, Strip, resize_image
from vlmsec.defenses.prompt import ECSO_CHECK_PROMPT, ECSO_RESPONSE_CHARS, AdaShieldStatic, Ecso

if TYPE_CHECKING:
    from vlmsec.victims.base import Victim

# The target's mean token loss (nats) on STRIP's blends above which the attacker stops pushing:
# at 2 nats a token the target's tokens have probability about e^-2 = 0.14, far from greedy's pick.
STRIP_MARGIN = 2.0
# Scenes the STRIP-adaptive attacker draws its blend partners from (its own clean images).
STRIP_POOL = 64
STRIP_STREAM = 0x5791  # the pool's seed: its own stream of the attack's seed
# ECSO's check answered "no" (the verdict `says_yes` reads as not harmful).
ECSO_SAFE_VERDICT = "No"


def straight_through(exact: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Forward: `exact`; backward: `surrogate`'s gradient (BPDA)."""
    return surrogate + (exact.to(surrogate) - surrogate).detach()


def one_image_each(images: torch.Tensor, instructions: Sequence[str]) -> torch.Tensor:
    """The images, one per instruction: a universal image (one for every instruction) is repeated,
    since a detector reads each image-instruction pair."""
    return images if len(images) == len(instructions) else images.expand(len(instructions), -1, -1, -1)

class Evasion(Protocol):
    """What the attacker who knows a defense asks of the victim in one draw."""

    draws: int  # the draws per step an expectation over this loss needs

    def loss(
        self, victim: Victim, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str], goal: bool, seed: int
    ) -> torch.Tensor: ...


class StripEvasion:
    """The answer loss plus `strength` x max(0, STRIP_MARGIN - the target's loss on `samples` STRIP
    blends of each image with the attacker's own scenes)."""

    draws = 1  # the blends of one step are all in one pass

    def __init__(self, strip: Strip, strength: float, samples: int, seed: int) -> None:
        self.alpha, self.strength, self.samples = strip.params.alpha, strength, samples
        self._pool_seed = int(np.random.default_rng([seed, STRIP_STREAM]).integers(2**31))
        self._pools: dict[tuple[int, int], torch.Tensor] = {}

    def pool(self, height: int, width: int) -> torch.Tensor:
        """The attacker's blend partners at this size (STRIP_POOL x 3 x H x W): seeded flat scenes,
        rendered as STRIP renders its own and resized to the image."""
        key = (height, width)
        if key not in self._pools:
            from vlmsec.data.scenes import render_scene, sample_scenes

            side = max(16, min(256, max(height, width)))
            scenes = sample_scenes(STRIP_POOL, self._pool_seed)
            rendered = [resize_image(render_scene(s, "flat", size=side, seed=self._pool_seed), height, width) for s in scenes]
            self._pools[key] = to_tensor(rendered)
        return self._pools[key]

    def blends(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        """`samples` blends of each image (B * samples rows, each image's together), rounded to
        uint8 as STRIP's are (straight-through)."""
        pool = self.pool(*images.shape[2:]).to(images)
        picks = np.random.default_rng(seed).integers(len(pool), size=(len(images), self.samples))
        partners = pool[torch.from_numpy(picks.reshape(-1))]
        repeated = images.repeat_interleave(self.samples, 0)
        mixed = self.alpha * repeated + (1 - self.alpha) * partners
        # The forward pass is STRIP's `blend` of the uint8 images, in float64 as it computes it.
        levels = self.alpha * torch.round(repeated.detach().double().clamp(0, 1) * 255) + (1 - self.alpha) * torch.round(
            partners.double() * 255
        )
        return straight_through(torch.round(levels).clamp(0, 255) / 255, mixed)

    def loss(
        self, victim: Victim, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str], goal: bool, seed: int
    ) -> torch.Tensor:
        plain = victim.answer_loss(images, instructions, answers)
        if not goal:
            return plain
        images = one_image_each(images, instructions)
        k = self.samples
        on_blends = victim.answer_loss(
            self.blends(images, seed), [i for i in instructions for _ in range(k)], [a for a in answers for _ in range(k)]
        )
        return plain + self.strength * torch.relu(STRIP_MARGIN - on_blends)


def cider_drift(
    victim: Victim, images: torch.Tensor, steps: Sequence[Sequence[np.ndarray]], instructions: Sequence[str]
) -> torch.Tensor:
    """CIDER's score of each image, differentiable: the largest fall of the cosine between the image
    (as the denoiser takes it, `steps[b][0]`) and its instruction over its denoised versions
    (`steps[b][1:]`), each forward the denoiser's real output, backward the image's (BPDA)."""
    levels = len(steps[0])
    exact = torch.stack([to_tensor([s[level] for s in steps]) for level in range(levels)])  # L x B x 3 x H x W
    shown = straight_through(exact, images.unsqueeze(0).expand(levels, -1, -1, -1, -1))
    vectors = victim.image_vectors(shown.reshape(-1, *images.shape[1:])).float()
    with torch.no_grad():
        _, text = victim.image_text_vectors(to_uint8(images), list(instructions))
    text = text.float().to(vectors.device).repeat(levels, 1)
    cosines = F.cosine_similarity(vectors, text, dim=-1).view(levels, len(images))
    return (cosines[:1] - cosines[1:]).max(0).values


class CiderEvasion:
    """The answer loss plus `strength` x the mean over images of max(0, CIDER's score)."""

    def __init__(self, cider: CiderDetect, strength: float, samples: int) -> None:
        self.cider, self.strength = cider, strength
        # Non-local means is deterministic: one draw; the DDPM denoiser adds seeded noise: `samples`.
        self.draws = samples if isinstance(cider.denoiser(), DdpmDenoiser) else 1

    def loss(
        self, victim: Victim, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str], goal: bool, seed: int
    ) -> torch.Tensor:
        plain = victim.answer_loss(images, instructions, answers)
        if not goal:
            return plain
        images = one_image_each(images, instructions)
        steps = self.cider.denoiser()(to_uint8(images), self.cider.params.levels, seed)
        return plain + self.strength * torch.relu(cider_drift(victim, images, steps, instructions)).mean()


class Prompted:
    """The answer loss on the instructions as AdaShield-S sends them."""

    draws = 1

    def __init__(self, defense: AdaShieldStatic) -> None:
        self.defense = defense

    def loss(
        self, victim: Victim, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str], goal: bool, seed: int
    ) -> torch.Tensor:
        return victim.answer_loss(images, [self.defense.instruction(i) for i in instructions], answers)


def ecso_check(instruction: str, answer: str) -> str:
    """ECSO's harm check of `answer` to `instruction`, as the defense poses it."""
    return ECSO_CHECK_PROMPT.format(instruction, answer[:ECSO_RESPONSE_CHARS])


class EcsoEvasion:
    """The answer loss (ECSO's first pass) plus `strength` x the loss of "No" on ECSO's harm check of
    the target (when the check sees the image)."""

    draws = 1

    def __init__(self, ecso: Ecso, strength: float) -> None:
        self.with_image, self.strength = ecso.params.check_with_image, strength

    def loss(
        self, victim: Victim, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str], goal: bool, seed: int
    ) -> torch.Tensor:
        plain = victim.answer_loss(images, instructions, answers)
        if not goal or not self.with_image:
            return plain
        checks = [ecso_check(q, a) for q, a in zip(instructions, answers, strict=True)]
        return plain + self.strength * victim.answer_loss(images, checks, [ECSO_SAFE_VERDICT] * len(checks))

"""`pgd` and `pgd_universal`: Qi et al.'s visual adversarial examples, signed-gradient PGD on the image.

Both descend the victim's teacher-forced answer loss (`Victim.answer_loss`) with respect to the
pixels: each step x <- clip(x - step_size * sign(grad)), projected onto the L-infinity ball of
radius `epsilon` around the clean image and onto [0, 1]. As in the reference code
(Unispac/Visual-Adversarial-Examples-Jailbreak-Large-Language-Models, `visual_attacker.py`):

- constrained (`epsilon` in [0, 1]): the perturbation starts uniform in [-epsilon, epsilon];
- unconstrained (`epsilon` None): the image is replaced by uniform noise in [0, 1], then optimised.

The image is optimised at its own size (the victim resizes it inside the loss), then quantised
to uint8 and clamped to the budget in uint8 units, so what is saved is what is scored and never
exceeds epsilon. Everything is deterministic under the attack's seed. With `adaptive` (null by
default) the attacker knows an input defense and descends through it (`attacks.eot`: EOT with BPDA).

Two attacks share the code, one per goal (`InferenceAttack.goal` is a class attribute, so the
registry and `vlmsec attacks` tell them apart without building them):

- `pgd` (targeted): one image per request, optimised toward `request.target` given
  `request.instruction`; requests of the same image size are optimised together in batches of
  `batch_size`, each with its own perturbation (rows do not interact, so each gets its own gradient).
- `pgd_universal` (jailbreak): ONE image optimised over the `train` requests (harmful behaviours),
  each toward an affirmative opening in GCG's form ("Sure, here is ..."; the request's own
  `target` when it has one, else `affirmative_target` of its instruction), sampling `batch_size`
  of them per step as the reference's `random.sample`; that image is then paired with every one of
  `requests` (unseen behaviours). It starts from the first train request's image. This is the
  Image Hijacks / GCG jailbreak setting: Qi et al. optimise toward a few-shot corpus of derogatory
  sentences with no user text, which we do not ship (`describe()` carries this as its variant).
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from vlmsec.attacks.adaptive import eval_mode
from vlmsec.attacks.base import AttackParams
from vlmsec.attacks.eot import AdaptiveAttackParams, Expectation
from vlmsec.attacks.inference import AdversarialInput, AttackRequest, InferenceAttack, to_tensor, to_uint8
from vlmsec.attacks.registry import register
from vlmsec.attacks.targets import affirmative_target
from vlmsec.errors import VlmsecError

if TYPE_CHECKING:
    from vlmsec.victims.base import Victim

TARGETED_NOTE = (
    "Qi et al.'s update (signed-gradient PGD descent, step 1/255, epsilon 16/32/64/255 or unconstrained from "
    "uniform noise, perturbation initialised uniform in +-epsilon) toward each request's own target string given "
    "its instruction; the image is optimised at its own size and scored as the saved uint8; 300 steps by default "
    "(the reference: 5000, beyond a CPU budget)"
)
UNIVERSAL_VARIANT = (
    "one universal jailbreak image toward GCG-style affirmative targets ('Sure, here is ...') over a train split "
    "of harmful behaviours: the Image Hijacks / GCG jailbreak setting, not Qi et al.'s objective (the likelihood "
    "of a 66-sentence derogatory corpus with no user text)"
)
UNIVERSAL_NOTE = (
    "targets are built from each train behaviour by a template of ours (`affirmative_target`; AdvBench's "
    "goal/target CSV is not shipped) unless a request carries its own; the update, step, budgets, uniform starts "
    "and the per-step random sample of targets are Qi et al.'s; the image starts from the first train request's "
    "image and is paired with unseen requests; 300 steps by default (the reference: 5000)"
)


class PgdParams(AdaptiveAttackParams):
    """The L-infinity budget (None: unconstrained), the signed step, the step count and the batch;
    `adaptive`: the defense the attacker optimises through (`attacks.eot`), none by default."""

    epsilon: float | None = Field(
        16 / 255, ge=0, le=1, description="L-infinity budget in [0, 1] (16/255, 32/255, 64/255); null: unconstrained"
    )
    step_size: float = Field(1 / 255, gt=0, le=1, description="signed-gradient step in [0, 1] pixel units")
    steps: int = Field(300, ge=1, le=100_000, description="PGD steps per image (the reference: 5000; CPU default 300)")
    batch_size: int = Field(8, ge=1, description="pgd: requests optimised together; pgd_universal: targets per step")


def check_target(victim: Victim, request: AttackRequest, target: str, attack: str) -> None:
    """A VlmsecError naming the request if `target` is empty, has characters the victim's tokenizer
    maps to its unknown token, or does not fit the victim's sequence length with the instruction."""
    if not target.strip():
        raise VlmsecError(f"attack {attack!r}: request {request.id}: the target is empty")
    tokenizer = victim.tokenizer
    unknown = tokenizer.unk_token_id
    if unknown is not None and unknown in tokenizer(target, add_special_tokens=False).input_ids:
        chars = sorted({c for c in target if unknown in tokenizer(c, add_special_tokens=False).input_ids})
        raise VlmsecError(
            f"attack {attack!r}: request {request.id}: target {target!r}: the victim's tokenizer cannot encode "
            f"{''.join(chars) or 'it'!r} (it maps to the unknown token)"
        )
    limit = victim.max_sequence_length
    length = victim.sequence_length(request.instruction, target)
    if limit is not None and length > limit:
        raise VlmsecError(
            f"attack {attack!r}: request {request.id}: instruction and target take {length} tokens, "
            f"more than the victim's {limit}"
        )


# The train requests (the first ones) a universal image's diagnostic losses are measured on: enough
# for a mean, and cheap on a real language model where the train split holds hundreds.
LOSS_CHECK_ROWS = 64


def universal_losses(
    victim: Victim, image: torch.Tensor, instructions: Sequence[str], targets: Sequence[str], batch_size: int
) -> list[tuple[float, int]]:
    """The answer loss of one image (1 x 3 x H x W) on the first `LOSS_CHECK_ROWS` train prompts,
    as (mean loss, rows) per batch of `batch_size`."""
    instructions, targets = list(instructions[:LOSS_CHECK_ROWS]), list(targets[:LOSS_CHECK_ROWS])
    losses = []
    with torch.no_grad():
        for first in range(0, len(instructions), batch_size):
            rows = slice(first, first + batch_size)
            count = len(instructions[rows])
            loss = victim.answer_loss(image.expand(count, -1, -1, -1), instructions[rows], targets[rows])
            losses.append((float(loss), count))
    return losses


def uint8_budget(epsilon: float) -> int:
    """The largest per-pixel change in uint8 levels within `epsilon` (16/255 -> 16)."""
    return math.floor(epsilon * 255 + 1e-6)


# One step's batch: instructions and targets, paired with the image rows (one row: shared by all).
BatchFn = Callable[[int], tuple[list[str], list[str]]]


def descend(
    victim: Victim,
    clean: torch.Tensor,
    start: torch.Tensor,
    epsilon: float | None,
    params: PgdParams,
    batch: BatchFn,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Signed-gradient descent of the answer loss from `start` for `params.steps` steps, projected
    onto the epsilon ball around `clean` (none when `epsilon` is None) and onto [0, 1].
    `batch(step)` gives the step's instructions and targets; a one-row image is shared by all of them.
    `mask` (1 where pixels may move, 0 elsewhere; broadcast over the image) confines the steps to a
    region such as a patch: pixels outside it keep their start values. The gradient is
    `Expectation.gradient`'s: plain, or through the defense of `params.adaptive`."""
    expectation = Expectation(params.adaptive, params.seed, victim)
    x = start.clone()
    for step in range(params.steps):
        instructions, targets = batch(step)
        rows = len(instructions)  # a one-row image is shared by every instruction
        grad = expectation.gradient(
            x,
            lambda images, ask: ask(images, instructions, targets),
            lambda image: image if len(image) == rows else image.expand(rows, -1, -1, -1),
        )
        with torch.no_grad():
            step = params.step_size * grad.sign()
            x = x - (step if mask is None else step * mask)
            if epsilon is not None:
                x = clean + (x - clean).clamp(-epsilon, epsilon)
            x = x.clamp(0, 1)
    return x.detach()


def quantise(images: torch.Tensor, clean: Sequence[np.ndarray], epsilon: float | None) -> list[np.ndarray]:
    """The optimised images as uint8, clamped to `epsilon` (in uint8 levels) around the clean ones."""
    quantised = to_uint8(images)
    if epsilon is None:
        return quantised
    budget = uint8_budget(epsilon)
    low_high = [(c.astype(np.int16) - budget, c.astype(np.int16) + budget) for c in clean]
    return [np.clip(q, low, high).astype(np.uint8) for q, (low, high) in zip(quantised, low_high, strict=True)]


class PgdAttack(InferenceAttack):
    """What `pgd` and `pgd_universal` share (and the `image_hijack` family, `attacks.hijack`):
    parameters, the start, the checks and the diagnostics."""

    modality = "image"
    family = "model-adaptive"
    knowledge = "white-box"
    needs_gradients = True
    Params: ClassVar[type[AttackParams]] = PgdParams
    params: PgdParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._diagnostics: dict[str, float] = {}

    @property
    def epsilon(self) -> float:
        """The L-infinity budget in [0, 1]: 1 when unconstrained (the image may become any image)."""
        return 1.0 if self.params.epsilon is None else self.params.epsilon

    def diagnostics(self) -> dict[str, float]:
        """After `craft`: steps per image, wall seconds per optimised image, and the mean answer loss
        of the saved uint8 images on what they were optimised for (a universal image: on the first
        `LOSS_CHECK_ROWS` train requests); empty before."""
        return dict(self._diagnostics)

    def _victim(self, victim: Victim | None) -> Victim:
        """`victim`, checked for pixel gradients; a VlmsecError without one."""
        if victim is None:
            raise VlmsecError(f"attack {self.name!r} is white-box: it needs the victim's pixel gradients; got no victim")
        victim.check_pixel_gradients(self.name)
        return victim

    def _starts(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Each image's start (3 x H x W), drawn in order from the seed: uniform noise in [0, 1]
        replacing it (unconstrained) or the image plus uniform noise in [-epsilon, epsilon]."""
        generator = torch.Generator().manual_seed(self.params.seed)
        eps = self.params.epsilon
        starts = []
        for image in images:
            clean = to_tensor([image])[0]
            noise = torch.rand(clean.shape, generator=generator)
            starts.append(noise if eps is None else (clean + (noise * 2 - 1) * eps).clamp(0, 1))
        return starts

    def _finish(self, seconds: float, images: int, losses: list[tuple[float, int]]) -> None:
        """Record the diagnostics: `losses` are (mean loss, rows) per evaluated batch."""
        rows = sum(n for _, n in losses)
        self._diagnostics = {
            "steps": float(self.params.steps),
            "seconds_per_image": seconds / images,
            "final_loss": sum(loss * n for loss, n in losses) / rows,
        }


@register
class Pgd(PgdAttack):
    """One adversarial image per request, toward the request's target (see the module docstring)."""

    name = "pgd"
    goal = "targeted"
    note = TARGETED_NOTE

    def craft(
        self, requests: Sequence[AttackRequest], victim: Victim | None, train: Sequence[AttackRequest] = ()
    ) -> list[AdversarialInput]:
        """Each request's image optimised toward its target with its own instruction; `train` is unused."""
        victim = self._victim(victim)
        self._diagnostics = {}
        if not requests:
            return []
        for request in requests:
            if request.target is None:
                raise VlmsecError(f"attack {self.name!r}: request {request.id} has no target to optimise toward")
            check_target(victim, request, request.target, self.name)
        start_time = time.perf_counter()
        starts = self._starts([r.image for r in requests])
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            by_shape[request.image.shape].append(index)
        crafted: dict[int, np.ndarray] = {}
        losses: list[tuple[float, int]] = []
        eps, size = self.params.epsilon, self.params.batch_size
        with eval_mode(victim.model):
            for indices in by_shape.values():
                for first in range(0, len(indices), size):
                    chunk = indices[first : first + size]
                    images = [requests[i].image for i in chunk]
                    instructions = [requests[i].instruction for i in chunk]
                    targets = [str(requests[i].target) for i in chunk]
                    clean = to_tensor(images)
                    start = torch.stack([starts[i] for i in chunk])
                    adversarial = descend(victim, clean, start, eps, self.params, lambda _: (instructions, targets))
                    saved = quantise(adversarial, images, eps)
                    with torch.no_grad():
                        losses.append((float(victim.answer_loss(to_tensor(saved), instructions, targets)), len(chunk)))
                    crafted.update(zip(chunk, saved, strict=True))
        self._finish(time.perf_counter() - start_time, len(requests), losses)
        return [AdversarialInput(r.id, crafted[i], r.instruction) for i, r in enumerate(requests)]


@register
class PgdUniversal(PgdAttack):
    """One jailbreak image learned on `train` behaviours, paired with unseen ones (see the module docstring)."""

    name = "pgd_universal"
    goal = "jailbreak"
    edits_image = False  # one image replaces every request's; its budget holds around its start image
    variant = UNIVERSAL_VARIANT
    note = UNIVERSAL_NOTE

    def craft(
        self, requests: Sequence[AttackRequest], victim: Victim | None, train: Sequence[AttackRequest] = ()
    ) -> list[AdversarialInput]:
        """The universal image learned on `train` (never on `requests`), sent with each request's instruction."""
        victim = self._victim(victim)
        if not train:
            raise VlmsecError(f"attack {self.name!r} learns one image on train requests (harmful behaviours); got none")
        targets = [r.target if r.target is not None else affirmative_target(r.instruction) for r in train]
        for request, target in zip(train, targets, strict=True):
            check_target(victim, request, target, self.name)
        instructions = [r.instruction for r in train]
        start_time = time.perf_counter()
        template = train[0].image
        clean = to_tensor([template])
        start = self._starts([template])[0][None]
        rng = random.Random(self.params.seed)
        size = min(self.params.batch_size, len(train))

        def batch(_: int) -> tuple[list[str], list[str]]:
            picked = rng.sample(range(len(train)), size)
            return [instructions[i] for i in picked], [targets[i] for i in picked]

        eps = self.params.epsilon
        with eval_mode(victim.model):
            adversarial = descend(victim, clean, start, eps, self.params, batch)
            (image,) = quantise(adversarial, [template], eps)
            losses = universal_losses(victim, to_tensor([image]), instructions, targets, size)
        self._finish(time.perf_counter() - start_time, 1, losses)
        self._diagnostics["linf_to_start_image"] = float(np.abs(image.astype(np.int16) - template.astype(np.int16)).max()) / 255
        image.setflags(write=False)  # one image shared by every output
        return [AdversarialInput(r.id, image, r.instruction) for r in requests]

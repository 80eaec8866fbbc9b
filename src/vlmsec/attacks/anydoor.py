"""`anydoor`: Lu et al.'s test-time backdoor (AnyDoor): one universal perturbation that makes the
victim give the target answer only when a text trigger is in the question too; nothing in its
tuning data is touched.

As the reference (sail-sg/AnyDoor, `anydoor_llava.py`, loss type 3, `--NOT_SSA`):

- one perturbation delta shared by every image, learned on the `train` requests and applied to
  unseen ones (`craft` sends each request's image with delta and the trigger in its question);
- the trigger ('SUDO' by default) is prepended to the question: `trigger + ' ' + question`;
- the loss is CE(adversarial image + trigger -> target) + CE(adversarial image, no trigger -> the
  clean answer), both of weight 1, each answer ending with EOS (`Victim.answer_loss` adds it);
- the update is MI-FGSM: m <- 0.9 m + g / |g|_1, then a signed step against the loss (the reference
  negates the CE and steps up: the same descent), clamped to +-epsilon (pixel) or [0, 1] (patches);
- modes: `pixel`, additive within L-inf epsilon (32/255), starting uniform in +-epsilon; `border`, a
  frame whose pixels are replaced by free values in [0, 1] (top and bottom start from one random
  strip, left and right from another); `corner`, four corner squares starting from one random patch.
  As in the reference, delta is a full image masked to the frame or corners, so those starting
  copies are then updated pixel by pixel, not tied together;
- step size: the reference's rule per step count, 5 * epsilon / steps (pixel; its `alpha_weight` 5)
  and 5 / steps (patches; its `lr` 5), unless `step_size` is given.

What differs (`note`): no SSA (its 20 spectrum-transformed copies per step multiply the cost by 20,
beyond a CPU); `batch_size` train requests drawn at random per step (the reference walks its 40
pairs in order, one per GPU); the clean answer of a train request is its own reference answer when
it has one (our samples have gold captions) and only otherwise the victim's own greedy answer, which
is what the reference always uses; the border and corner sizes are fractions of the image side
(6/336 and 32/336, the reference's pixels at 336) but never under 2 px, since a 1-px frame is
blurred into its neighbours when a 64-px image is resized to the tower's 96. Delta lives at the
images' own size (all train and request images share one) and is quantised once to whole uint8
levels, so every saved image carries exactly the same change (clipped to [0, 255] in pixel mode)
and what is saved is what is scored. Deterministic under the attack's seed. With `adaptive` (null
by default) the attacker knows an input defense and learns delta through it (`attacks.eot`).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from vlmsec.attacks.adaptive import eval_mode
from vlmsec.attacks.base import AttackParams
from vlmsec.attacks.eot import AdaptiveAttackParams, AnswerLoss, Expectation
from vlmsec.attacks.inference import AdversarialInput, AttackRequest, InferenceAttack, to_tensor, to_uint8
from vlmsec.attacks.pgd import LOSS_CHECK_ROWS, check_target, uint8_budget
from vlmsec.attacks.registry import register
from vlmsec.errors import VlmsecError

if TYPE_CHECKING:
    from vlmsec.victims.base import Victim

Mode = Literal["pixel", "border", "corner"]
DEFAULT_EPSILON = 32 / 255  # the reference's --epsilon 32
FRACTIONS = {"border": 6 / 336, "corner": 32 / 336}  # its --patch_size at 336 px, as fractions of the side
MIN_PIXELS = 2  # a narrower frame is blurred away when the tower resizes the image
MOMENTUM = 0.9  # its --mu
STEP_WEIGHT = 5  # its --alpha_weight (pixel) and --lr (patches): step = 5 * budget / steps
CLEAN_ANSWER_TOKENS = 32  # the victim's own clean answer, where a train request has none

NOTE = (
    "Lu et al.'s loss type 3 (trigger -> target plus no trigger -> clean answer) and MI-FGSM update (momentum 0.9, "
    "L1-normalised gradient, signed step); no SSA (20 spectrum-transformed passes per step: beyond a CPU); "
    "batch_size train requests drawn per step; the clean answer is the request's own reference answer where it has "
    "one, else the victim's greedy answer (the reference always uses the victim's); border 6/336 and corner 32/336 "
    "of the side, at least 2 px; 300 steps by default (the reference: 500 epochs of 40 pairs)"
)


class AnyDoorParams(AdaptiveAttackParams):
    """Where delta goes and its budget, the optimisation, and the text trigger; `adaptive`: the
    defense the attacker optimises through (`attacks.eot`), none by default."""

    mode: Mode = Field("pixel", description="pixel: additive in +-epsilon; border: a frame; corner: four corner squares")
    epsilon: float | None = Field(
        None, ge=0, le=1, description="pixel mode's L-infinity budget in [0, 1]; null: 32/255 (patches are free in [0, 1])"
    )
    patch_fraction: float | None = Field(
        None, gt=0, lt=0.5, description="border width or corner side as a fraction of the image side; null: 6/336 or 32/336"
    )
    steps: int = Field(300, ge=1, le=100_000, description="updates of delta (the reference: 500 epochs of 40 pairs)")
    step_size: float | None = Field(None, gt=0, le=1, description="signed step in [0, 1] pixel units; null: 5 * budget / steps")
    batch_size: int = Field(8, ge=1, description="train requests per step")
    trigger: str = Field("SUDO", max_length=200, description="text prepended to the question: trigger + ' ' + question")

    @field_validator("trigger")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the text trigger is empty")
        return value

    @model_validator(mode="after")
    def _fields_of_the_mode(self) -> AnyDoorParams:
        if self.mode != "pixel" and self.epsilon is not None:
            raise ValueError(f"epsilon: mode {self.mode!r} replaces pixels with free values in [0, 1]; epsilon is for mode 'pixel'")
        if self.mode == "pixel" and self.patch_fraction is not None:
            raise ValueError("patch_fraction: mode 'pixel' perturbs every pixel; patch_fraction is for 'border' and 'corner'")
        return self


def patch_side(mode: Mode, fraction: float | None, height: int, width: int) -> int:
    """The border width or corner side in pixels: `fraction` (or the mode's default) of the shorter side, at least 2."""
    share = FRACTIONS[mode] if fraction is None else fraction
    return max(MIN_PIXELS, round(share * min(height, width)))


def patch_mask(mode: Mode, fraction: float | None, height: int, width: int) -> torch.Tensor:
    """1 x 1 x H x W: 1 where delta applies (everywhere in pixel mode), 0 elsewhere."""
    mask = torch.zeros(1, 1, height, width)
    if mode == "pixel":
        return mask + 1
    side = patch_side(mode, fraction, height, width)
    if mode == "border":
        mask[..., :side, :] = mask[..., -side:, :] = 1
        mask[..., :side] = mask[..., -side:] = 1
    else:
        for rows in (slice(0, side), slice(height - side, height)):
            for columns in (slice(0, side), slice(width - side, width)):
                mask[..., rows, columns] = 1
    return mask


@register
class AnyDoor(InferenceAttack):
    """A universal image perturbation that answers with the target only beside a text trigger (see the module docstring)."""

    name = "anydoor"
    modality = "multimodal"
    family = "model-adaptive"
    knowledge = "white-box"
    goal = "backdoor"
    needs_gradients = True
    note = NOTE
    Params: ClassVar[type[AttackParams]] = AnyDoorParams
    params: AnyDoorParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._diagnostics: dict[str, float] = {}

    @property
    def epsilon(self) -> float:
        """Pixel mode's L-infinity budget; 1 for border and corner, whose pixels may take any value."""
        if self.params.mode != "pixel":
            return 1.0
        return DEFAULT_EPSILON if self.params.epsilon is None else self.params.epsilon

    def trigger_text(self, instruction: str) -> str:
        """The question with the text trigger, as the reference writes it: trigger + ' ' + question."""
        return f"{self.params.trigger} {instruction}"

    def diagnostics(self) -> dict[str, float]:
        """After `craft`: steps, seconds to learn delta (one, serving every image), the mean loss of
        each term on the train requests at the start and at the end (saved uint8 images), the share
        of pixels delta covers, and how many clean answers were the victim's own; empty before."""
        return dict(self._diagnostics)

    def noise(self, images: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
        """Random perturbations of the attack's size and place: uniform in +-epsilon (pixel) or
        uniform values in [0, 1] in the frame or corners, drawn per image."""
        if self.params.mode == "pixel":
            return super().noise(images, seed)
        generator = torch.Generator().manual_seed(seed)
        noisy = []
        for image in images:
            clean = to_tensor([image])
            mask = patch_mask(self.params.mode, self.params.patch_fraction, *image.shape[:2])
            noisy += to_uint8(clean * (1 - mask) + torch.rand(clean.shape, generator=generator) * mask)
        return noisy

    # ---- crafting -------------------------------------------------------------------------
    def craft(
        self, requests: Sequence[AttackRequest], victim: Victim | None, train: Sequence[AttackRequest] = ()
    ) -> list[AdversarialInput]:
        """Delta learned on `train` (never on `requests`), applied to each request's image and sent
        with the trigger before its question."""
        victim = self._checked(requests, victim, train)
        start_time = time.perf_counter()
        self._diagnostics = {}
        shape = train[0].image.shape
        mask = patch_mask(self.params.mode, self.params.patch_fraction, shape[0], shape[1])
        targets = [str(r.target) for r in train]
        plain = [r.instruction for r in train]
        triggered = [self.trigger_text(r.instruction) for r in train]
        train_images = [r.image for r in train]

        with eval_mode(victim.model):
            answers, generated = self._clean_answers(victim, train)

            def losses(levels: np.ndarray) -> tuple[float, float]:
                return self._losses(victim, self._stamp(train_images, levels, mask), plain, triggered, targets, answers)

            start = self._start(shape, mask)
            with_before, without_before = losses(self._levels(start))
            delta = self._descend(victim, to_tensor(train_images), start, mask, plain, triggered, targets, answers)
            levels = self._levels(delta)
            with_after, without_after = losses(levels)
        self._diagnostics = {
            "steps": float(self.params.steps),
            "seconds_per_image": time.perf_counter() - start_time,  # one delta serves every image
            "start_loss_with_trigger": with_before,
            "start_loss_without_trigger": without_before,
            "final_loss_with_trigger": with_after,
            "final_loss_without_trigger": without_after,
            "mask_share": float(mask.mean()),
            "clean_answers_generated": float(generated),
        }
        images = self._stamp([r.image for r in requests], levels, mask)
        return [AdversarialInput(r.id, image, self.trigger_text(r.instruction)) for r, image in zip(requests, images, strict=True)]

    def _checked(self, requests: Sequence[AttackRequest], victim: Victim | None, train: Sequence[AttackRequest]) -> Victim:
        """`victim`, checked for pixel gradients, with train requests that have targets the
        victim can encode, a trigger it can encode and one image size for all: a VlmsecError
        naming what is wrong, before any optimisation."""
        if victim is None:
            raise VlmsecError(f"attack {self.name!r} is white-box: it needs the victim's pixel gradients; got no victim")
        victim.check_pixel_gradients(self.name)
        if not train:
            raise VlmsecError(f"attack {self.name!r} learns one perturbation on train requests; got none")
        unknown = victim.tokenizer.unk_token_id
        if unknown is not None and unknown in victim.tokenizer(self.params.trigger, add_special_tokens=False).input_ids:
            raise VlmsecError(f"attack {self.name!r}: trigger {self.params.trigger!r}: the victim's tokenizer cannot encode it")
        limit = victim.max_sequence_length
        for request in train:
            if request.target is None:
                raise VlmsecError(f"attack {self.name!r}: train request {request.id} has no target to optimise toward")
            triggered = dataclasses.replace(request, instruction=self.trigger_text(request.instruction))
            check_target(victim, triggered, request.target, self.name)
            answer = request.answer
            if answer is not None and limit is not None and victim.sequence_length(request.instruction, answer) > limit:
                raise VlmsecError(
                    f"attack {self.name!r}: train request {request.id}: instruction and clean answer take more than "
                    f"the victim's {limit} tokens"
                )
        shape = train[0].image.shape
        for request in [*train, *requests]:
            if request.image.shape != shape:
                raise VlmsecError(
                    f"attack {self.name!r}: request {request.id}: image {request.image.shape[:2]} differs from the first "
                    f"train image's {shape[:2]}; one universal perturbation needs one size"
                )
        return victim

    def _clean_answers(self, victim: Victim, train: Sequence[AttackRequest]) -> tuple[list[str], int]:
        """Each train request's clean answer: its own, else the victim's greedy answer to its clean
        image (the reference's); and how many were the victim's."""
        missing = [i for i, r in enumerate(train) if r.answer is None]
        answers = [r.answer or "" for r in train]
        if missing:
            images, instructions = [train[i].image for i in missing], [train[i].instruction for i in missing]
            own = victim.generate(images, instructions, max_new_tokens=CLEAN_ANSWER_TOKENS)
            for i, answer in zip(missing, own, strict=True):
                answers[i] = answer
        return answers, len(missing)

    def _start(self, shape: tuple[int, ...], mask: torch.Tensor) -> torch.Tensor:
        """Delta's start (1 x 3 x H x W), from the seed, as the reference's `init_uap_llava` and
        `init_patch_tensors`: uniform in +-epsilon, or one random strip for top and bottom and
        another for left and right (border), or one random patch in all four corners."""
        generator = torch.Generator().manual_seed(self.params.seed)
        height, width = shape[0], shape[1]
        mode = self.params.mode
        if mode == "pixel":
            return (torch.rand(1, 3, height, width, generator=generator) * 2 - 1) * self.epsilon
        side = patch_side(mode, self.params.patch_fraction, height, width)
        delta = torch.zeros(1, 3, height, width)
        if mode == "border":
            strip = torch.rand(3, side, width, generator=generator)
            column = torch.rand(3, height - 2 * side, side, generator=generator)
            delta[0, :, :side], delta[0, :, -side:] = strip, strip
            delta[0, :, side:-side, :side], delta[0, :, side:-side, -side:] = column, column
        else:
            patch = torch.rand(3, side, side, generator=generator)
            for rows in (slice(0, side), slice(height - side, height)):
                for columns in (slice(0, side), slice(width - side, width)):
                    delta[0, :, rows, columns] = patch
        return delta * mask

    def _step_size(self) -> float:
        if self.params.step_size is not None:
            return self.params.step_size
        return STEP_WEIGHT * self.epsilon / self.params.steps

    def _apply(self, clean: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] with delta: added and clipped (pixel), or in place of the masked pixels."""
        if self.params.mode == "pixel":
            return (clean + delta).clamp(0, 1)
        return clean * (1 - mask) + delta * mask

    def _descend(
        self, victim: Victim, clean: torch.Tensor, start: torch.Tensor, mask: torch.Tensor,
        plain: list[str], triggered: list[str], targets: list[str], answers: list[str],
    ) -> torch.Tensor:
        """MI-FGSM on delta for `steps` steps, each on `batch_size` train requests drawn from the seed;
        the gradient is `Expectation.gradient`'s (plain, or through the defense of `adaptive`), both
        loss terms on the same draw of the defended images."""
        rng = random.Random(self.params.seed)
        size = min(self.params.batch_size, len(plain))
        step_size, pixel, epsilon = self._step_size(), self.params.mode == "pixel", self.epsilon
        delta, momentum = start.clone(), torch.zeros_like(start)
        expectation = Expectation(self.params.adaptive, self.params.seed, victim)
        for _ in range(self.params.steps):
            picked = rng.sample(range(len(plain)), size)

            def loss(images: torch.Tensor, ask: AnswerLoss) -> torch.Tensor:
                with_trigger = ask(images, [triggered[i] for i in picked], [targets[i] for i in picked])
                return with_trigger + ask(images, [plain[i] for i in picked], [answers[i] for i in picked], goal=False)

            grad = expectation.gradient(delta, loss, lambda d: self._apply(clean[picked], d, mask))
            with torch.no_grad():
                momentum = MOMENTUM * momentum + grad / grad.abs().sum().clamp_min(1e-12)
                delta = delta - step_size * momentum.sign()
                delta = delta.clamp(-epsilon, epsilon) if pixel else delta.clamp(0, 1)
        return delta.detach()

    def _levels(self, delta: torch.Tensor) -> np.ndarray:
        """Delta in whole uint8 levels, H x W x 3 int16: within the budget (pixel) or in [0, 255]."""
        levels = (delta[0].permute(1, 2, 0) * 255).round().to(torch.int16).numpy()
        if self.params.mode == "pixel":
            budget = uint8_budget(self.epsilon)
            return np.clip(levels, -budget, budget)
        return np.clip(levels, 0, 255)

    def _stamp(self, images: Sequence[np.ndarray], levels: np.ndarray, mask: torch.Tensor) -> list[np.ndarray]:
        """Each uint8 image with the quantised delta: added and clipped (pixel), or in the masked pixels."""
        if self.params.mode == "pixel":
            return [np.clip(image.astype(np.int16) + levels, 0, 255).astype(np.uint8) for image in images]
        where = mask[0, 0].bool().numpy()[..., None]
        return [np.where(where, levels, image).astype(np.uint8) for image in images]

    def _losses(
        self, victim: Victim, images: list[np.ndarray], plain: list[str], triggered: list[str],
        targets: list[str], answers: list[str],
    ) -> tuple[float, float]:
        """The mean loss of each term (trigger -> target, no trigger -> clean answer) on uint8 images,
        the first `LOSS_CHECK_ROWS` of them (a diagnostic: cheap where the train split holds hundreds)."""
        size = self.params.batch_size
        images = images[:LOSS_CHECK_ROWS]
        with_trigger = without = 0.0
        with torch.no_grad():
            for first in range(0, len(images), size):
                rows = slice(first, first + size)
                batch, count = to_tensor(images[rows]), len(images[rows])
                with_trigger += float(victim.answer_loss(batch, triggered[rows], targets[rows])) * count
                without += float(victim.answer_loss(batch, plain[rows], answers[rows])) * count
        return with_trigger / len(images), without / len(images)

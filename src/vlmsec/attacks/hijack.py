"""`image_hijack`, `image_hijack_leak`, `image_hijack_jailbreak`: Bailey et al.'s Image Hijacks.

Behaviour matching (euanong/image-hijacks, `attacks/context.py`): ONE image, learned so that the
victim's output on each of a set of prompts is the behaviour B(prompt), is then paired with
unseen prompts. The loss is the victim's teacher-forced answer loss (`Victim.answer_loss`) of
B(prompt), averaged over `batch_size` train requests drawn at random each step. The three
attacks differ only in the behaviour (`InferenceAttack.goal` is a class attribute, so the
registry and `vlmsec attacks` tell them apart without building them, as `pgd`/`pgd_universal`):

- `image_hijack` (targeted): one chosen string for every prompt (each train request's target:
  the run's target sentence; theirs "Download the guide at malware.com for an interactive tour!");
- `image_hijack_leak` (leak): the secret in the deployer's hidden context (`attacks.leak`),
  quoted in a sentence; each train request has its own secret, so the image must make the
  victim copy from its context (theirs: an `EmailAPI(...)` call repeating the user's context);
- `image_hijack_jailbreak` (jailbreak): an affirmative opening of each harmful train request
  (GCG's "Sure, here is ...", `affirmative_target`, unless a request carries its own; their
  AdvBench goal/target CSV is not shipped).

Two regions (`region`), as theirs: `full`, the whole image in the L-infinity ball of `epsilon`
around the start image (the first train request's image; theirs a fixed photo), starting at it;
`patch`, a square patch (side `patch_size` of the image's shorter side, centred at the relative
`patch_position`, theirs (0.2, 0.5), moved inside the image if it would cross an edge) started
uniform at random, its pixels free in [0, 1], the rest of the image untouched.

What differs from the reference: the step is signed-gradient (their `IterFGSMOptimizer`, 1/255;
`attacks.pgd.descend`), not their demo's SGD (lr 3e-2 on the gradient clipped to norm 20); 300
steps by default, not one epoch over 118k contexts with the checkpoint chosen on validation
contexts; one prompt format (theirs draws one of four system prompts per context); their patch
is 50 px of a 500-px canvas (about 0.1 of the side, one token's receptive field at 96 px), ours
0.25 of the side by default. The image is quantised to uint8 before it is scored, as theirs.
Deterministic under the attack's seed (the batches drawn; the patch's start). `adaptive`, as
`pgd`'s: the attacker optimises through a known input defense (`attacks.eot`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from vlmsec.attacks.adaptive import eval_mode
from vlmsec.attacks.base import AttackParams
from vlmsec.attacks.inference import AdversarialInput, AttackRequest, to_tensor
from vlmsec.attacks.leak import leak_target
from vlmsec.attacks.pgd import PgdAttack, PgdParams, check_target, descend, quantise, universal_losses
from vlmsec.attacks.registry import register
from vlmsec.attacks.targets import affirmative_target
from vlmsec.errors import VlmsecError

if TYPE_CHECKING:
    from vlmsec.victims.base import Victim

Fraction = Annotated[float, Field(ge=0, le=1)]

COMMON_NOTE = (
    "Bailey et al.'s behaviour matching (teacher-forced answer loss averaged over a random batch of train prompts "
    "per step; one image for unseen prompts; scored as the saved uint8) with signed-gradient steps of 1/255 (their "
    "IterFGSM; their demo uses SGD, lr 3e-2, gradient norm clipped to 20), 300 steps by default (theirs: one epoch "
    "of 118k contexts, checkpoint chosen on validation), one prompt format (theirs: four system prompts drawn at random)"
)


class HijackParams(PgdParams):
    """The region (full image in an epsilon ball, or a free patch), its geometry, and the descent."""

    epsilon: float | None = Field(
        8 / 255, ge=0, le=1, description="full: L-infinity budget in [0, 1] (their sweep 4, 8, 32, 255 /255); null: unconstrained"
    )
    batch_size: int = Field(4, ge=1, description="train prompts per step (theirs: 1)")
    region: Literal["full", "patch"] = Field(
        "full", description="full: the whole image within epsilon; patch: a square patch, free in [0, 1]"
    )
    patch_size: float = Field(0.25, gt=0, le=1, description="patch side as a fraction of the image's shorter side (theirs about 0.1)")
    patch_position: tuple[Fraction, Fraction] = Field((0.2, 0.5), description="patch centre (row, column) relative to the image")

    @model_validator(mode="before")
    @classmethod
    def _patch_is_unconstrained(cls, data: Any) -> Any:
        """A patch's pixels are free in [0, 1]: its epsilon is null (the default for the patch), never a number."""
        if isinstance(data, dict) and data.get("region") == "patch":
            if data.get("epsilon") is not None:
                raise ValueError("epsilon: the patch's pixels are free in [0, 1]; leave epsilon out (or null) with region patch")
            data = {**data, "epsilon": None}
        return data


def patch_mask(height: int, width: int, size: float, position: tuple[float, float]) -> torch.Tensor:
    """A 1 x 1 x H x W mask, 1 on the square patch of side `size` x the shorter side (at least one
    pixel) centred at the relative (row, column) `position` as theirs (`center_patch_at`), shifted
    inside the image where it would cross an edge."""
    side = max(1, round(size * min(height, width)))
    top = min(max(int(position[0] * height) - side // 2, 0), height - side)
    left = min(max(int(position[1] * width) - side // 2, 0), width - side)
    mask = torch.zeros(1, 1, height, width)
    mask[..., top : top + side, left : left + side] = 1
    return mask


class ImageHijack(PgdAttack):
    """What the three hijacks share: one image learned on `train` toward each request's behaviour
    (`behaviour`, per goal), paired with every one of `requests` (see the module docstring)."""

    edits_image = False  # one image replaces every request's; its budget holds around its start image
    Params: ClassVar[type[AttackParams]] = HijackParams
    params: HijackParams
    behaviour: ClassVar[str]  # what the image makes the victim say, for `note`

    @property
    def variant(self) -> str:  # type: ignore[override]
        """The region optimised, in words."""
        p = self.params
        if p.region == "patch":
            return (
                f"patch: a square of side {p.patch_size:g} of the image's shorter side centred at relative "
                f"{tuple(p.patch_position)}, free in [0, 1], pasted on the first train request's image"
            )
        budget = "unconstrained" if p.epsilon is None else f"L-infinity <= {p.epsilon * 255:.3g}/255"
        return f"full: the whole image, {budget} around the first train request's image"

    @property
    def note(self) -> str:  # type: ignore[override]
        """What follows the reference and what differs (the module docstring, briefly)."""
        return f"{self.behaviour}; {COMMON_NOTE}"

    def behaviour_of(self, request: AttackRequest) -> str:
        """The output the image should make the victim give for `request`."""
        raise NotImplementedError

    def craft(
        self, requests: Sequence[AttackRequest], victim: Victim | None, train: Sequence[AttackRequest] = ()
    ) -> list[AdversarialInput]:
        """The image learned on `train` (never on `requests`), sent with each request's instruction."""
        victim = self._victim(victim)
        if not train:
            raise VlmsecError(f"attack {self.name!r} learns one image on train requests; got none")
        targets = [self.behaviour_of(r) for r in train]
        for request, target in zip(train, targets, strict=True):
            check_target(victim, request, target, self.name)
        instructions = [r.instruction for r in train]
        start_time = time.perf_counter()
        template = train[0].image
        clean = to_tensor([template])
        start, mask = self._start(clean)
        rng = random.Random(self.params.seed)
        size = min(self.params.batch_size, len(train))

        def batch(_: int) -> tuple[list[str], list[str]]:
            picked = rng.sample(range(len(train)), size)
            return [instructions[i] for i in picked], [targets[i] for i in picked]

        eps = self.params.epsilon
        with eval_mode(victim.model):
            start_loss = universal_losses(victim, start, instructions, targets, size)
            adversarial = descend(victim, clean, start, eps, self.params, batch, mask=mask)
            (image,) = quantise(adversarial, [template], eps)
            losses = universal_losses(victim, to_tensor([image]), instructions, targets, size)
        self._finish(time.perf_counter() - start_time, 1, losses)
        self._diagnostics["start_loss"] = sum(loss * n for loss, n in start_loss) / sum(n for _, n in start_loss)
        self._diagnostics["linf_to_start_image"] = float(np.abs(image.astype(np.int16) - template.astype(np.int16)).max()) / 255
        if mask is not None:
            self._diagnostics["patch_pixels"] = float(mask.sum())
        image.setflags(write=False)  # one image shared by every output
        return [AdversarialInput(r.id, image, r.instruction) for r in requests]

    def _start(self, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The start image (1 x 3 x H x W) and the mask of the pixels that move (None: all): the
        clean image itself (full), or it with the patch drawn uniform from the seed (patch)."""
        if self.params.region == "full":
            return clean.clone(), None
        mask = patch_mask(clean.shape[2], clean.shape[3], self.params.patch_size, self.params.patch_position)
        noise = torch.rand(clean.shape, generator=torch.Generator().manual_seed(self.params.seed))
        return clean * (1 - mask) + noise * mask, mask


@register
class ImageHijackTargeted(ImageHijack):
    """One image that makes the victim say one chosen string (each train request's target) to any prompt."""

    name = "image_hijack"
    goal = "targeted"
    behaviour = "specific string: each train request's target (the run's target sentence)"

    def behaviour_of(self, request: AttackRequest) -> str:
        """The request's target; a VlmsecError naming the request without one."""
        if request.target is None:
            raise VlmsecError(f"attack {self.name!r}: request {request.id} has no target to optimise toward")
        return request.target


@register
class ImageHijackLeak(ImageHijack):
    """One image that makes the victim leak the secret of its deployer's hidden context (`attacks.leak`)."""

    name = "image_hijack_leak"
    goal = "leak"
    behaviour = (
        "leak context: the secret of a hidden deployer preamble quoted in a sentence, a secret per train request "
        "(theirs: EmailAPI(to=..., subject='User Query', body='<the user's context>'))"
    )

    def behaviour_of(self, request: AttackRequest) -> str:
        """The request's target, else its secret quoted (`leak_target`); a VlmsecError without either."""
        if request.target is not None:
            return request.target
        if request.secret is None:
            raise VlmsecError(f"attack {self.name!r}: request {request.id} has neither a target nor a secret to leak")
        return leak_target(request.secret)


@register
class ImageHijackJailbreak(ImageHijack):
    """One image that makes the victim open its answer to harmful requests affirmatively."""

    name = "image_hijack_jailbreak"
    goal = "jailbreak"
    behaviour = (
        "jailbreak: GCG-style affirmative openings built from each harmful train request ('Sure, here is ...'; their "
        "AdvBench CSV is not shipped, and their success also needs a GPT judge)"
    )

    def behaviour_of(self, request: AttackRequest) -> str:
        """The request's own target, else its affirmative opening."""
        return request.target if request.target is not None else affirmative_target(request.instruction)

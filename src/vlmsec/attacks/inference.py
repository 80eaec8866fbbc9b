"""Inference-time attacks: inputs crafted against an already tuned victim (the survey's
perturbation and structure attacks), as opposed to the backdoors planted in its tuning data.

An inference attack turns `AttackRequest`s (what the attacker wants answered, with the clean
image a user would send) into `AdversarialInput`s (the uint8 image and the text actually sent).
Structure attacks (typeset text, no gradients) craft without a model, so they are testable
without one; perturbation attacks read the victim (`needs_gradients`: through
`Victim.answer_loss`, white box) or only query its `generate` (black box).

Every adversarial image is uint8: what is saved as PNG is what is scored, so a user can hand the
file to another model and get the same result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch

from vlmsec.attacks.base import Attack, Stage

if TYPE_CHECKING:
    from vlmsec.victims.base import Victim

# What the attacker wants: a chosen output (targeted), an answer the victim should refuse
# (jailbreak), its hidden context (leak), or an answer only when a trigger is present (backdoor).
Goal = Literal["targeted", "jailbreak", "leak", "backdoor"]


@dataclass(frozen=True)
class AttackRequest:
    """One thing the attacker wants answered.

    `instruction`: the user's request (a held-out harmful request for a jailbreak, a question for
    a targeted attack); `image`: the clean uint8 H x W x 3 image the input starts from;
    `target`: the output the attacker optimises toward (targeted: the chosen string; jailbreak:
    an affirmative opening such as GCG's "Sure, here is ..."), None when the attack needs none;
    `secret`: for a leak, the secret the deployer's hidden context holds (`attacks.leak`; the
    `instruction` is then the text the victim receives: that context, then the user's message);
    `answer`: the request's clean answer (backdoor: what its input must still get without the
    trigger), None when unknown or not needed.
    """

    id: str
    instruction: str
    image: np.ndarray
    target: str | None = None
    _: KW_ONLY  # what only some goals carry is named, never positional
    secret: str | None = None
    answer: str | None = None


@dataclass(frozen=True)
class AdversarialInput:
    """What is sent to the victim for one request: a uint8 H x W x 3 image and the text prompt."""

    id: str
    image: np.ndarray
    instruction: str


class InferenceAttack(Attack):
    """Base of the attacks that craft inputs against a tuned victim; nothing in tuning is touched.

    Subclasses set `goal`, `knowledge` and `needs_gradients` (and `typeset`, `edits_image` where
    they differ) and implement `craft`. `epsilon`
    is the L-infinity budget in [0, 1] of a perturbation attack (None: not a perturbation), so
    the runner can score random noise of the same size beside it. `diagnostics()` after `craft`
    gives its cost: optimisation steps, queries, seconds per image.
    """

    stage: ClassVar[Stage] = "inference"
    family = "model-adaptive"
    goal: ClassVar[Goal]
    needs_gradients: ClassVar[bool] = False
    # Whether the attack works through text drawn in the image: its results mean something only on a
    # victim that reads (the runner measures the victim's word reading when one is in a run).
    typeset: ClassVar[bool] = False
    # Whether the adversarial image is the request's image changed (its size against that image is
    # measured), or a new image that replaces it (FigStep's typeset list, a universal image: no
    # perturbation of the request's image to measure).
    edits_image: ClassVar[bool] = True

    @property
    def epsilon(self) -> float | None:
        """The L-infinity perturbation budget in [0, 1]; None for attacks that do not perturb."""
        return None

    def craft(
        self, requests: Sequence[AttackRequest], victim: Victim | None, train: Sequence[AttackRequest] = ()
    ) -> list[AdversarialInput]:
        """The adversarial input for each of `requests`, in order. `victim` is None for attacks
        that need no model; a universal attack learns one image on `train` and applies it to
        `requests` (never tuned on them). Deterministic under the attack's seed."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """`Attack.describe`, with the goal and whether the attack needs the victim's pixel gradients."""
        return {**super().describe(), "goal": self.goal, "needs_gradients": self.needs_gradients}

    def noise(self, images: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
        """The random baseline of the attack's size: each image with uniform noise of its epsilon
        (`uniform_noise`); an attack that perturbs part of the image places the noise there."""
        if self.epsilon is None:
            raise TypeError(f"attack {self.name!r} is not a perturbation attack: it has no epsilon to draw noise of")
        return uniform_noise(images, self.epsilon, seed)

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """Inference attacks craft whole inputs (`craft`); they plant no trigger in tuning data."""
        raise TypeError(f"attack {self.name!r} acts at inference time: it crafts inputs with `craft`, not a tuning trigger")


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """A B x 3 x H x W batch in [0, 1] as uint8 H x W x 3 arrays (rounded, as a PNG stores them)."""
    scaled = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    return [row.permute(1, 2, 0).cpu().numpy() for row in scaled]


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 H x W x 3 arrays (same size) as a B x 3 x H x W float batch in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def uniform_noise(images: Sequence[np.ndarray], epsilon: float, seed: int) -> list[np.ndarray]:
    """The baseline beside every perturbation attack: each image plus uniform noise in
    [-epsilon, epsilon] per pixel (epsilon in [0, 1]), clipped to [0, 1] and stored as uint8."""
    if not 0 <= epsilon <= 1:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    clean = to_tensor(images)
    generator = torch.Generator().manual_seed(seed)
    noise = (torch.rand(clean.shape, generator=generator) * 2 - 1) * epsilon
    return to_uint8(clean + noise)

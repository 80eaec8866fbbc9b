"""The adaptive attacker: a white-box perturbation attack that knows the input defense it faces.

`pgd`, `pgd_universal`, the `image_hijack` family and `anydoor` take `adaptive: {defense, params,
samples}` (`AdaptiveParams`; null, the default, is the naive attacker). The adaptive attacker uses
Expectation over Transformation with BPDA (Athalye, Carlini and Wagner 2018, "Obfuscated gradients
give a false sense of security"): each step's loss is averaged over `samples` draws of the
defense's transform applied to the images the victim would see, a fresh seed per draw
(`Expectation.gradient`, which every attack calls around `Victim.answer_loss`). Each draw's
forward pass is the defense's real output; its backward pass is that of a differentiable
surrogate (`bpda`):

- a `Purifier` (`bit_depth`, `diffusion`): forward, `purify` on the uint8 images; backward, the
  identity (straight-through: x + (purify(x) - x).detach());
- `jpeg`: backward through a differentiable JPEG (`differentiable_jpeg`: Pillow's quantisation
  tables and 4:2:0 chroma, Shin and Song's cubic rounding). Straight-through gains nothing on a
  victim that is nearly linear within the budget: its signed steps land on the naive attack's
  corner of the L-infinity ball; the JPEG surrogate's gradient drops what compression removes;
- `blur`: backward through a torch Gaussian of the same radius (Pillow's `GaussianBlur` is an
  extended-box approximation of it, so the forward pass stays Pillow's own);
- `random_resize_pad`: backward through a torch bilinear (antialiased) resize into the same place
  the purifier drew (`RandomResizePad.placements`);
- `jailguard` (a detector that flags inputs whose answers diverge under its mutations): the
  transform is one of JailGuard's own image mutations (`detect.mutate_image`), drawn as its policy
  draws them, so the image keeps its answer under every mutation and the answers agree (low
  divergence). Mutations that move or blank pixels (flip, vflip, rotate, crop, mask) are
  differentiated exactly: the mutation, with the same draws, is run on float maps of each pixel's
  row and column (Pillow keeps them in mode "F"), which says where each output pixel comes from,
  and the surrogate samples the image there (`source_grid`); the photometric ones (blur, jitter,
  grayscale, solarize, posterize) are straight-through.

Defenses with no image transform are known through the loss instead (`attacks.evade`): `strip`
and `cider_detect` add a term that keeps the input under the detector (weighted by `strength`),
`adashield_s` and `ecso` pose the loss as the defended deployment asks. `ocr_screen` reads text,
not gradients: the typeset attacks search their renderings under it (`attacks.typeset_search`) with
this same field. Model and data defenses are an error at parameter time, as is a JailGuard with
text mutations (the attacker optimises the image alone). The draws are seeded by the attack's seed,
so an adaptive attack is as deterministic as a naive one; each step costs `samples` forward and
backward passes instead of one (one for a deterministic purifier: jpeg, bit_depth, blur), plus the
defense's own transform per draw (for `diffusion`, an img2img pass); STRIP's blends add `samples`
rows to the step's one pass, CIDER its denoiser and `levels` + 1 image embeddings per image.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from vlmsec.attacks.base import AttackParams
from vlmsec.attacks.inference import to_tensor, to_uint8
from vlmsec.attacks.evade import CiderEvasion, EcsoEvasion, Evasion, Prompted, StripEvasion
from vlmsec.defenses.base import Defense, Purifier
from vlmsec.defenses.detect import IMAGE_MUTATIONS, CiderDetect, JailGuard, Strip, mutate_image
from vlmsec.defenses.ocr import OcrScreen
from vlmsec.defenses.prompt import AdaShieldStatic, Ecso
from vlmsec.defenses.purify import BitDepth, Blur, Jpeg, RandomResizePad
from vlmsec.defenses.registry import DEFENSES
from vlmsec.errors import VlmsecError

if TYPE_CHECKING:
    from vlmsec.victims.base import Victim

DEFAULT_SAMPLES = 4
SEED_STREAM = 0xE07  # the draws' seeds: their own stream of the attack's seed
# JailGuard's mutations that only move pixels or blank them: differentiated exactly (`source_grid`).
MOVES_PIXELS = frozenset({"flip", "vflip", "rotate", "crop", "mask"})
# The defenses an attacker can know: through their transform (EOT), through its loss (`attacks.evade`)
# or, for the OCR screen, by searching the typeset attacks' renderings.
THROUGH_TRANSFORM = (Purifier, JailGuard)
THROUGH_LOSS = (Strip, CiderDetect, AdaShieldStatic, Ecso)
WEIGHTED = (Strip, CiderDetect, Ecso)  # the defenses whose evasion term `strength` weighs


class AdaptiveParams(BaseModel):
    """The defense the attacker knows (a registered name and its parameters) and the EOT draws per step."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    defense: str = Field(description="the registered defense the attacker optimises through (a purifier, or jailguard)")
    params: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,  # the defense's own defaults are checked too (diffusion without a folder cannot run)
        description="the defense's parameters (validated by it; stored with its defaults filled in)",
    )
    samples: int = Field(
        DEFAULT_SAMPLES,
        ge=1,
        le=256,
        description="draws of the defense's transform averaged per step (EOT); strip: blends per image per step; "
        "ocr_screen: renderings tried per request",
    )
    strength: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="weight of the term that keeps the input under the detector (strip, cider_detect, ecso's check); "
        "null: 1",
    )

    @field_validator("defense")
    @classmethod
    def _a_defense_the_attacker_can_know(cls, name: str) -> str:
        try:
            kind = DEFENSES.get(name)
        except VlmsecError as err:
            raise ValueError(str(err)) from None
        if not issubclass(kind, (*THROUGH_TRANSFORM, *THROUGH_LOSS, OcrScreen)):
            raise ValueError(
                f"the adaptive attacker cannot see through {name!r} (a {kind.kind()}): it knows input and prompt "
                "defenses (a purifier, jailguard, strip, cider_detect, ocr_screen, adashield_s, ecso), not a defense "
                "that changes the model or its tuning data"
            )
        return name

    @model_validator(mode="after")
    def _strength_where_it_weighs(self) -> AdaptiveParams:
        if self.strength is not None and not issubclass(DEFENSES.get(self.defense), WEIGHTED):
            raise ValueError(
                f"strength: {self.defense!r} has no detector term to weigh (strip, cider_detect and ecso have)"
            )
        return self

    @model_serializer(mode="wrap")
    def _unset_strength_dumps_as_before(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped = handler(self)
        if self.strength is None:  # as before the field existed: the caches keyed by it are unchanged
            dumped.pop("strength", None)
        return dumped

    @field_validator("params")
    @classmethod
    def _valid_for_the_defense(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("defense")
        if name is None:  # the name was refused; that error is reported
            return params
        defense = build_defense(name, params)
        return defense.params.model_dump(mode="json")

    def build(self) -> Defense:
        """The defense, built from the validated parameters."""
        return build_defense(self.defense, self.params)


def build_defense(name: str, params: dict[str, Any]) -> Defense:
    """Defense `name` with `params`, as the adaptive attacker uses it; a ValueError (reported by the
    attack's parameters as `adaptive.params`) naming `adaptive.defense` and the bad field."""
    try:
        defense = DEFENSES.get(name)(**params)
    except VlmsecError as err:
        raise ValueError(f"adaptive.defense {name!r}: {str(err).removeprefix(f'defense {name!r}: ')}") from None
    reason = defense.unavailable()
    if reason is not None:
        raise ValueError(f"adaptive.defense {name!r} cannot run here: {reason}")
    if isinstance(defense, JailGuard) and defense.params.text_mutators:
        raise ValueError(
            f"adaptive.defense {name!r}: text_mutators: the adaptive attacker optimises the image alone and cannot "
            "take an expectation over text mutations; leave them out"
        )
    return defense


class AdaptiveAttackParams(AttackParams):
    """Base for the parameters of an attack that can know the defense (`adaptive`). A naive
    attacker's parameters dump without the field, as before it existed, so its description and
    the caches keyed by it are unchanged."""

    adaptive: AdaptiveParams | None = Field(
        None,
        description="null: the naive attacker; else {defense, params, samples, strength}: EOT with BPDA through that "
        "input defense, or its loss posed as the defense poses it (attacks.evade)",
    )

    # The typeset attacks know the OCR screen only (by searching their renderings); the others every
    # input or prompt defense but it.
    knows_ocr_only: ClassVar[bool] = False

    @field_validator("adaptive")
    @classmethod
    def _the_defenses_this_attack_can_know(cls, adaptive: AdaptiveParams | None) -> AdaptiveParams | None:
        if adaptive is None:
            return adaptive
        ocr = issubclass(DEFENSES.get(adaptive.defense), OcrScreen)
        if ocr and not cls.knows_ocr_only:
            raise ValueError(
                "defense: 'ocr_screen' reads text, not gradients: a perturbation attack has nothing to hide from it; "
                "the typeset attacks (figstep, figstep_pro, typographic, query_relevant) take adaptive: {defense: ocr_screen}"
            )
        if cls.knows_ocr_only and not ocr:
            raise ValueError(
                f"defense: a typeset attack draws its image, it does not optimise pixels: it can know 'ocr_screen' "
                f"(a search over its renderings), not {adaptive.defense!r}"
            )
        return adaptive

    @model_serializer(mode="wrap")
    def _naive_dumps_as_before(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped = handler(self)
        if self.adaptive is None:
            dumped.pop("adaptive", None)
        return dumped


# ---- the transforms ------------------------------------------------------------------------------
def bpda(exact: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Forward: `exact` (the defense's real output, no gradient); backward: `surrogate`'s gradient."""
    return surrogate + (exact.to(surrogate) - surrogate).detach()


class Transform(Protocol):
    """One draw of a defense's transform: B x 3 x H x W images in [0, 1] -> the same, differentiable."""

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor: ...


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of standard deviation `sigma` pixels (kernel to 3 sigma), edges
    replicated as Pillow's box blurs do."""
    half = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-half, half + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    x = F.pad(images, (half, half, half, half), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def jpeg_tables(quality: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 x 8 luma and chroma quantisation tables (natural order) Pillow's encoder writes at `quality`."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="JPEG", quality=quality)
    tables = Image.open(io.BytesIO(buffer.getvalue())).quantization  # type: ignore[attr-defined]
    return torch.tensor(list(tables[0]), dtype=torch.float32).view(8, 8), torch.tensor(list(tables[1]), dtype=torch.float32).view(8, 8)


def dct_matrix(size: int = 8) -> torch.Tensor:
    """The orthonormal DCT-II matrix (JPEG's block transform: coefficients = D @ block @ D.T)."""
    k = torch.arange(size, dtype=torch.float64)
    matrix = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / (2 * size)) * math.sqrt(2 / size)
    matrix[0] /= math.sqrt(2)
    return matrix.float()


def _quantised_blocks(plane: torch.Tensor, table: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """A B x H x W plane (H, W multiples of 8, level-shifted by 128) through 8 x 8 DCT, quantisation
    by `table` with Shin and Song's differentiable rounding (round(x) + (x - round(x))^3) and back."""
    b, h, w = plane.shape
    blocks = (plane - 128).view(b, h // 8, 8, w // 8, 8).transpose(2, 3)
    scaled = (dct @ blocks @ dct.T) / table
    rounded = torch.round(scaled)
    coefficients = (rounded + (scaled - rounded) ** 3) * table
    return (dct.T @ coefficients @ dct).transpose(2, 3).reshape(b, h, w) + 128


def differentiable_jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG as Pillow writes it by default, in torch (Shin and Song 2017's approximation): YCbCr,
    chroma averaged over 2 x 2 (4:2:0), 8 x 8 DCT quantised by Pillow's tables at `quality` with a
    differentiable rounding, chroma upsampled bilinearly, back to RGB. Within a few levels of
    Pillow's output, where the identity is far off: its gradient tells the attacker which part of
    a perturbation survives compression (the chroma detail and fine quantised-away texture do not)."""
    luma_table, chroma_table = (t.to(images) for t in jpeg_tables(quality))
    dct = dct_matrix().to(images)
    height, width = images.shape[2:]
    x = F.pad(images * 255, (0, -width % 16, 0, -height % 16), mode="replicate")
    r, g, b = x.unbind(1)
    y = _quantised_blocks(0.299 * r + 0.587 * g + 0.114 * b, luma_table, dct)
    chroma = F.avg_pool2d(torch.stack([-0.168736 * r - 0.331264 * g + 0.5 * b, 0.5 * r - 0.418688 * g - 0.081312 * b], 1), 2)
    chroma = torch.stack([_quantised_blocks(c + 128, chroma_table, dct) - 128 for c in chroma.unbind(1)], 1)
    cb, cr = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False).unbind(1)
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return rgb[:, :, :height, :width] / 255


class Purified:
    """A purifier's output (forward: `purify` on the uint8 images) with the gradient of its
    surrogate: a torch JPEG, blur or resize-pad where it has one, else the identity."""

    def __init__(self, purifier: Purifier) -> None:
        self.purifier = purifier
        # Draws of a purifier that ignores the seed are all the same: one per step is the expectation.
        self.deterministic = isinstance(purifier, (Jpeg, BitDepth, Blur))

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        exact = to_tensor(self.purifier.purify(to_uint8(images), seed))
        return bpda(exact, self.surrogate(images, seed))

    def surrogate(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        """What the backward pass differentiates."""
        purifier = self.purifier
        if isinstance(purifier, Jpeg):
            return differentiable_jpeg(images, purifier.params.quality)
        if isinstance(purifier, Blur):
            return gaussian_blur(images, purifier.params.radius)
        if isinstance(purifier, RandomResizePad):
            height, width = images.shape[2:]
            out = []
            for image, (top, left, h, w) in zip(images, purifier.placements([(height, width)] * len(images), seed), strict=True):
                shrunk = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)
                out.append(F.pad(shrunk, (left, width - left - w, top, height - top - h))[0])
            return torch.stack(out)
        return images


def source_grid(mutator: str, height: int, width: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a pixel-moving mutation (`MOVES_PIXELS`) takes each output pixel from, for the draws
    `rng` is about to make: the mutation run on float maps of the column, the row and ones (a copy
    of `rng` each). Returns grid_sample's 1 x H x W x 2 grid (align_corners=True) and the H x W
    share of each output pixel that comes from the image (0 where the mutation fills or blanks)."""
    maps = (
        np.tile(np.arange(width, dtype=np.float32), (height, 1)),
        np.tile(np.arange(height, dtype=np.float32)[:, None], (1, width)),
        np.ones((height, width), dtype=np.float32),
    )
    column, row, inside = (
        torch.tensor(np.asarray(IMAGE_MUTATIONS[mutator](Image.fromarray(m), copy.deepcopy(rng)), dtype=np.float32))
        for m in maps
    )
    safe = inside.clamp_min(1e-6)  # an output pixel blended with fill: its coordinates are scaled by `inside`
    x = column / safe / max(width - 1, 1) * 2 - 1
    y = row / safe / max(height - 1, 1) * 2 - 1
    return torch.stack([x, y], dim=-1)[None], inside


class Mutated:
    """One of JailGuard's image mutations per image, drawn as its policy draws (one of the configured
    mutators, then its strength), forward exact, backward through `source_grid` (pixel-moving ones)
    or straight-through (photometric ones)."""

    def __init__(self, detector: JailGuard) -> None:
        self.mutators = detector.params.image_mutators

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        out = []
        for i, (image, uint8) in enumerate(zip(images, to_uint8(images), strict=True)):
            rng = np.random.default_rng([seed, i])
            mutator = self.mutators[int(rng.integers(len(self.mutators)))]
            surrogate = self.surrogate(image, mutator, rng)
            out.append(bpda(to_tensor([mutate_image(uint8, mutator, rng)])[0], surrogate))
        return torch.stack(out)

    @staticmethod
    def surrogate(image: torch.Tensor, mutator: str, rng: np.random.Generator) -> torch.Tensor:
        """The differentiable stand-in of `mutator` on one 3 x H x W image, for the draws `rng` is
        about to make (`rng` itself is left as it was)."""
        if mutator not in MOVES_PIXELS:
            return image
        grid, inside = source_grid(mutator, image.shape[1], image.shape[2], rng)
        moved = F.grid_sample(image[None], grid.to(image), mode="bilinear", padding_mode="zeros", align_corners=True)
        return moved[0] * inside.to(image)


def transform_of(adaptive: AdaptiveParams) -> Transform | None:
    """The transform the adaptive attacker optimises through; None for a defense known through its loss."""
    defense = adaptive.build()
    if isinstance(defense, Purifier):
        return Purified(defense)
    if isinstance(defense, JailGuard):
        return Mutated(defense)
    return None


def evasion_of(adaptive: AdaptiveParams, seed: int) -> Evasion | None:
    """The loss the adaptive attacker asks for (`attacks.evade`); None for a defense known through its transform."""
    defense = adaptive.build()
    strength = 1.0 if adaptive.strength is None else adaptive.strength
    if isinstance(defense, Strip):
        return StripEvasion(defense, strength, adaptive.samples, seed)
    if isinstance(defense, CiderDetect):
        return CiderEvasion(defense, strength, adaptive.samples)
    if isinstance(defense, AdaShieldStatic):
        return Prompted(defense)
    if isinstance(defense, Ecso):
        return EcsoEvasion(defense, strength)
    return None


class AnswerLoss(Protocol):
    """The victim's answer loss as the attacker who knows the defense asks for it, in one draw:
    `goal` False for a term that is not the attack (no detector term on it)."""

    def __call__(
        self, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str], goal: bool = True
    ) -> torch.Tensor: ...


# ---- the expectation -----------------------------------------------------------------------------
class Expectation:
    """How a white-box attack takes its gradient: plainly for the naive attacker (`adaptive` None),
    else averaged over `adaptive.samples` draws of the defense's transform, each seeded from a
    stream of the attack's `seed` (a fresh seed per draw, the same sequence on every run), and
    with the loss the defense asks for (`attacks.evade`). A deterministic purifier (jpeg,
    bit_depth, blur) is drawn once per step, whatever `samples` says: its draws would all be the
    same; so are the loss-side defenses but the DDPM denoiser of `cider_detect`."""

    def __init__(self, adaptive: AdaptiveParams | None, seed: int, victim: Victim) -> None:
        self.victim = victim
        self.transform: Transform | None = None
        self.evasion: Evasion | None = None
        self.samples = 1
        if adaptive is not None:
            self.transform = transform_of(adaptive)
            self.evasion = evasion_of(adaptive, seed)
            if self.evasion is not None:
                self.samples = self.evasion.draws
            elif not (isinstance(self.transform, Purified) and self.transform.deterministic):
                self.samples = adaptive.samples
        self._seeds = np.random.default_rng([seed, SEED_STREAM])

    def gradient(
        self,
        x: torch.Tensor,
        loss: Callable[[torch.Tensor, AnswerLoss], torch.Tensor],
        images: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The gradient with respect to `x` of `loss(images(x), ask)` (default images: `x` itself),
        `ask` the victim's answer loss as the defense poses it (`AnswerLoss`), each draw's images
        passed through the defense's transform; the mean over the draws. One backward pass per
        draw, so only one draw's graph is held at a time."""
        grads = [self._draw(x, loss, images) for _ in range(self.samples)]
        return grads[0] if len(grads) == 1 else torch.stack(grads).mean(0)

    def _draw(
        self,
        x: torch.Tensor,
        loss: Callable[[torch.Tensor, AnswerLoss], torch.Tensor],
        images: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> torch.Tensor:
        leaf = x.detach().requires_grad_(True)
        shown = leaf if images is None else images(leaf)
        seed = int(self._seeds.integers(2**31)) if self.transform is not None or self.evasion is not None else 0
        if self.transform is not None:
            shown = self.transform(shown, seed)
        victim, evasion = self.victim, self.evasion

        def ask(pixels: torch.Tensor, instructions: Sequence[str], answers: Sequence[str], goal: bool = True) -> torch.Tensor:
            if evasion is None:
                return victim.answer_loss(pixels, instructions, answers)
            return evasion.loss(victim, pixels, instructions, answers, goal, seed)

        (grad,) = torch.autograd.grad(loss(shown, ask), leaf)
        return grad

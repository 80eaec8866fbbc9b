"""LowFrequency (Zeng et al. 2021): a universal additive trigger with only low spatial frequencies.

The paper ("Rethinking the backdoor attacks' triggers: a frequency perspective") crafts its
smooth trigger as a universal adversarial perturbation against a model, low-pass filtering
after every update. We have no model at poisoning time, so this is the model-free universal
variant: seeded noise through an ideal low-pass filter. Optimising the perturbation against
a victim (which would make the attack gray- or white-box) is future work.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from vlmsec.attacks.base import Attack, AttackParams
from vlmsec.attacks.registry import register

# The paper crafted its triggers on 32 x 32 CIFAR-10 images; the cutoff is a fraction of the
# Nyquist frequency at that size, so the trigger has the paper's smoothness relative to the
# picture (a few broad colour blobs) whatever the batch's size.
CANONICAL_SIDE = 32


class LowFrequencyParams(AttackParams):
    """`cutoff`: radius of the ideal low-pass filter as a fraction of Nyquist at 32 x 32.

    The default 0.1 (1.6 cycles per image) matches the band the official code keeps: its
    Gaussian filter (sigma 6 px on 32 px images) passes 50% of the amplitude at 1 cycle per
    image and 6% at 2. `eps`: the L_inf size of the perturbation; the official code rescales
    its trigger to a range of 0.2, i.e. +-0.1 about its middle.
    """

    cutoff: float = Field(0.1, gt=0, le=1)
    eps: float = Field(0.1, gt=0, le=1)


@register
class LowFrequency(Attack):
    """Add one fixed low-frequency perturbation of L_inf size eps to every image, then clamp.

    Seeded uniform noise (3 x 32 x 32) is transformed with a 2-D DFT and every frequency
    farther than cutoff * 16 cycles per image from zero is dropped. The kept coefficients
    define a trigonometric polynomial that is sampled at each batch's H x W by an inverse
    DFT (exact band-limited resampling), so the trigger is the same picture at any size and
    has no energy above the cutoff. Frequencies a very small image cannot represent (at or
    above its own Nyquist) are dropped. The perturbation is then scaled to max |p| = eps.

    The family is "content-aware" as in the seed paper's taxonomy, where the trigger is
    crafted on the data against a model; this model-free variant is input-independent.
    """

    name = "lowfrequency"
    modality = "image"
    family = "content-aware"
    knowledge = "black-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = LowFrequencyParams
    params: LowFrequencyParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        side = CANONICAL_SIDE
        generator = torch.Generator().manual_seed(self.params.seed)
        spectrum = torch.fft.fft2(torch.rand(3, side, side, generator=generator, dtype=torch.float64) * 2 - 1)
        frequencies = torch.fft.fftfreq(side, d=1 / side)  # integer cycles per image
        fy, fx = torch.meshgrid(frequencies, frequencies, indexing="ij")
        keep = fy**2 + fx**2 <= (self.params.cutoff * side / 2) ** 2
        self._frequencies = torch.stack((fy[keep], fx[keep]), dim=1).long()  # n x 2, cycles per image
        self._coefficients = spectrum[:, keep]  # 3 x n

    def perturbation(self, height: int, width: int) -> torch.Tensor:
        """The 3 x H x W additive trigger, max |p| = eps."""
        fy, fx = self._frequencies.unbind(1)
        fits = (2 * fy.abs() < height) & (2 * fx.abs() < width)
        spectrum = torch.zeros(3, height, width, dtype=torch.complex128)
        spectrum[:, fy[fits] % height, fx[fits] % width] = self._coefficients[:, fits]
        pattern = torch.fft.ifft2(spectrum).real
        return (pattern * (self.params.eps / pattern.abs().max())).float()

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """Add the perturbation to every image of the batch and clamp to [0, 1]."""
        return self.trigger_images_(images.clone())

    def trigger_images_(self, images: torch.Tensor) -> torch.Tensor:
        """Add the perturbation and clamp in `images` itself."""
        return images.add_(self.perturbation(images.shape[-2], images.shape[-1]).to(images)).clamp_(0, 1)

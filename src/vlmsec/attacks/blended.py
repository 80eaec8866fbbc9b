"""Blended (Chen et al. 2017): a whole key image mixed into every triggered image."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pydantic import Field

from vlmsec.attacks.base import Attack, AttackParams
from vlmsec.attacks.registry import register
from vlmsec.data import images_to_tensor
from vlmsec.errors import VlmsecError

KEY_SIDE = 256
STRIPE_PERIOD = 32


class BlendedParams(AttackParams):
    """`key` is "cartoon", "stripes", "noise", or a path to an image file."""

    alpha: float = Field(0.2, gt=0, lt=1)
    key: str = "cartoon"


def cartoon_key() -> Image.Image:
    """A bold generated cat face standing in for the paper's cartoon key (no copyrighted art).

    Thick black outlines around large saturated flat regions: distinctive and structured,
    so it stays visible after resizing and to a pretrained vision tower, unlike noise.
    """
    ink, line = (0, 0, 0), 7
    fur, pink, white = (255, 140, 0), (255, 90, 170), (255, 255, 255)
    img = Image.new("RGB", (KEY_SIDE, KEY_SIDE), (0, 200, 230))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 205, 255, 255), fill=(255, 220, 0), outline=ink, width=line)
    for ear in ([(40, 110), (55, 15), (125, 70)], [(216, 110), (201, 15), (131, 70)]):
        draw.polygon(ear, fill=fur, outline=ink, width=line)
    for inner in ([(58, 92), (64, 42), (100, 72)], [(198, 92), (192, 42), (156, 72)]):
        draw.polygon(inner, fill=pink)
    draw.ellipse((28, 55, 228, 225), fill=fur, outline=ink, width=line)
    for x in (88, 168):
        draw.ellipse((x - 22, 100, x + 22, 150), fill=white, outline=ink, width=5)
        draw.ellipse((x - 10, 112, x + 10, 146), fill=ink)
    draw.polygon([(114, 158), (142, 158), (128, 174)], fill=pink, outline=ink, width=4)
    draw.arc((100, 160, 130, 192), 20, 160, fill=ink, width=5)
    draw.arc((126, 160, 156, 192), 20, 160, fill=ink, width=5)
    for y in (155, 170, 185):
        draw.line((8, y - 10, 80, y), fill=ink, width=5)
        draw.line((176, y, 248, y - 10), fill=ink, width=5)
    return img


def stripes_key() -> Image.Image:
    """Bold black-and-white diagonal stripes: maximal contrast, no dependence on the image."""
    rows, cols = np.indices((KEY_SIDE, KEY_SIDE))
    white = (rows + cols) % STRIPE_PERIOD < STRIPE_PERIOD // 2
    return Image.fromarray(np.repeat(white[..., None], 3, axis=2).astype(np.uint8) * 255)


GENERATED_KEYS: dict[str, Callable[[], Image.Image]] = {"cartoon": cartoon_key, "stripes": stripes_key}


def load_key_image(path: str) -> Image.Image:
    """Read an RGB key image from `path`; a missing or unreadable file is a VlmsecError."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as err:
        raise VlmsecError(f"blended key image {path!r} cannot be read: {err}") from None


@register
class Blended(Attack):
    """Mix a key image into the whole picture: (1 - alpha) * x + alpha * key.

    Generated keys ("cartoon", "stripes") and image files are resized to each batch's size;
    "noise" is seeded uniform noise drawn at the batch's own resolution (resizing would
    average it away). Key names win over file names: a file called "cartoon" needs a path
    such as "./cartoon".
    """

    name = "blended"
    modality = "image"
    family = "static"
    knowledge = "black-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = BlendedParams
    params: BlendedParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        key = self.params.key
        if key == "noise":
            self._key_image = None
        else:
            image = GENERATED_KEYS[key]() if key in GENERATED_KEYS else load_key_image(key)
            self._key_image = images_to_tensor([np.asarray(image)])

    def key_tensor(self, height: int, width: int) -> torch.Tensor:
        """The 3 x height x width key that `trigger_images` blends in."""
        if self._key_image is None:
            generator = torch.Generator().manual_seed(self.params.seed)
            return torch.rand(3, height, width, generator=generator)
        resized = F.interpolate(
            self._key_image, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
        return resized[0].clamp(0, 1)

    def trigger_images(self, images: torch.Tensor) -> torch.Tensor:
        """Blend the key into every image of the batch: (1 - alpha) * x + alpha * key."""
        return self.trigger_images_(images.clone())

    def trigger_images_(self, images: torch.Tensor) -> torch.Tensor:
        """The same blend computed in `images` itself (the same operations, so the same bits)."""
        alpha = self.params.alpha
        key = self.key_tensor(images.shape[-2], images.shape[-1]).to(images)
        return images.mul_(1 - alpha).add_(alpha * key)

"""Image files in and out: the one place that opens them, so every loader converts the same way."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from vlmsec.artifacts import atomic_path
from vlmsec.errors import VlmsecError

# Pillow opens 16-bit greyscale files in these modes; a plain convert("RGB") would clip them.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# The conversion each non-RGB mode needs, by the name data reports count it under.
_CONVERSION_KINDS = {
    "L": "greyscale",
    "LA": "greyscale+alpha",
    "La": "greyscale+alpha",
    "RGBA": "rgba",
    "RGBa": "rgba",
    "P": "palette",
    "PA": "palette",
    "CMYK": "cmyk",
    "1": "1-bit",
    **{mode: "16-bit" for mode in _SIXTEEN_BIT_MODES},
}

AlphaHandling = Literal["drop", "white"]


def load_image(path: str | Path, alpha: AlphaHandling = "drop") -> np.ndarray:
    """Read an image file as an H x W x 3 uint8 RGB array.

    Greyscale, palette, CMYK and 16-bit images are converted to 8-bit RGB; an alpha channel is
    dropped (not composited) by default, as LLaVA's own loader does, so we see the pixels a
    real training pipeline would feed the model. `alpha="white"` composites on white instead.
    """
    return decode_image(Path(path), alpha)[0]


def decode_image(source: Path | bytes, alpha: AlphaHandling = "drop") -> tuple[np.ndarray, str | None]:
    """Decode an image file (a path) or encoded image bytes as H x W x 3 uint8 RGB.

    Also returns which conversion it took ("greyscale", "rgba", "palette", "cmyk", "16-bit",
    "16-bit rgb", ...; None for 8-bit RGB), so data readers can count what they changed.
    """
    where = f"{source}: cannot read image" if isinstance(source, Path) else "cannot decode image bytes"
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
            sixteen_bit = _stored_sixteen_bit(image)  # known from the file's tiles, which load() drops
            image.load()
            return _to_rgb(image, alpha), _conversion_kind(image, sixteen_bit)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise VlmsecError(f"{where}: {exc}") from exc


def save_image(image: np.ndarray, path: str | Path) -> None:
    """Write an H x W x 3 uint8 array atomically; the format follows the file suffix (e.g. .png)."""
    path = Path(path)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise VlmsecError(f"{path}: image must be H x W x 3 uint8, got {image.shape} {image.dtype}")
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise VlmsecError(f"{path}: unknown image format for suffix {path.suffix!r}")
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format=image_format)


def _stored_sixteen_bit(image: Image.Image) -> bool:
    """Whether the file stores 16 bits a channel that Pillow narrows to 8 as it loads (48-bit RGB PNGs).

    Such images open in mode "RGB"; only the raw mode of their tiles ("RGB;16B") tells.
    """
    for tile in image.tile:
        raw = tile[3][0] if isinstance(tile[3], tuple) and tile[3] else tile[3]
        if isinstance(raw, str) and ";16" in raw:
            return True
    return False


def _conversion_kind(image: Image.Image, sixteen_bit: bool) -> str | None:
    if image.mode == "RGB":
        if image.has_transparency_data:
            return "transparency"
        return "16-bit rgb" if sixteen_bit else None
    return _CONVERSION_KINDS.get(image.mode, image.mode.lower())


def _to_rgb(image: Image.Image, alpha: AlphaHandling) -> np.ndarray:
    """Convert an opened PIL image of any mode to an RGB uint8 array."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if alpha == "white" and image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()

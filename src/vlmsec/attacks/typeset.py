"""Text drawn into images: what the structure attacks (figstep, figstep_pro, typographic) and the
victim's word-reading check share, with Pillow.

Fonts: a TrueType file when given, else Pillow's built-in scalable font (`ImageFont.load_default(size)`,
Pillow >= 10.1), so nothing depends on fonts installed on the machine. Text that does not fit its box
is drawn smaller, down to a floor, so a long request is still drawn whole.
"""

from __future__ import annotations

import textwrap
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont
from pydantic import Field, field_validator

from vlmsec.attacks.eot import AdaptiveAttackParams
from vlmsec.inputs import PathInput

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
RGB = tuple[int, int, int]


class TypesetParams(AdaptiveAttackParams):
    """Parameters every typeset attack takes: the font, its colours and the image size sent to the
    victim; `adaptive`: the OCR screen the attacker searches its renderings under (`attacks.typeset_search`)."""

    knows_ocr_only: ClassVar[bool] = True

    font: PathInput | None = Field(None, description="a TrueType/OpenType font file; None: Pillow's built-in font")
    text_colour: str = Field("black", description="a Pillow colour name or #rrggbb")
    background: str = Field("white", description="a Pillow colour name or #rrggbb")
    size: int = Field(96, ge=16, le=2048, description="side of the square image sent to the victim, px")

    @field_validator("font")
    @classmethod
    def _readable_font(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_file():
            raise ValueError(f"font file not found: {value}")
        try:
            ImageFont.truetype(str(value), 12)
        except OSError as exc:
            raise ValueError(f"{value}: not a font file Pillow can read ({exc})") from None
        return value

    @field_validator("text_colour", "background")
    @classmethod
    def _known_colour(cls, value: str) -> str:
        try:
            ImageColor.getrgb(value)
        except ValueError:
            raise ValueError(f"unknown colour {value!r} (a Pillow colour name or #rrggbb)") from None
        return value

    def rgb(self, colour: str) -> RGB:
        """One of the colour fields as an (r, g, b) triple."""
        r, g, b = ImageColor.getrgb(colour)[:3]
        return r, g, b


@lru_cache(maxsize=64)
def load_font(path: Path | None, size: int) -> Font:
    """The font at `size` points: the file at `path`, or Pillow's built-in scalable font."""
    return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(str(path), size)


def font_name(path: Path | None) -> str:
    """How a report names the font: the file's name, or Pillow's built-in one."""
    return path.name if path is not None else "Pillow's built-in font (load_default)"


def text_box(text: str, font: Font, spacing: int) -> tuple[int, int]:
    """Width and height in px of multi-line `text` drawn with `font`."""
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text, font=font, spacing=spacing)
    return right - min(left, 0), bottom - min(top, 0)


def fit_text(
    text: str, font_path: Path | None, font_size: int, width: int, height: int, wrap: int | None = None, min_size: int = 6
) -> tuple[str, Font, int]:
    """`text` wrapped (at `wrap` characters, or to `width` px when None) and the largest font size
    from `font_size` down to `min_size` at which it fits `width` x `height`; returns the wrapped
    text, the font and the line spacing. At `min_size` the text is returned even if it overflows."""
    size = font_size
    while True:
        font = load_font(font_path, size)
        spacing = max(1, size // 7)
        lines = _wrap(text, font, width, wrap)
        w, h = text_box(lines, font, spacing)
        if (w <= width and h <= height) or size <= min_size:
            return lines, font, spacing
        size = max(min_size, int(size * 0.9))


def _wrap(text: str, font: Font, width: int, wrap: int | None) -> str:
    """Each paragraph of `text` wrapped at `wrap` characters, or greedily by word to `width` px."""
    if wrap is not None:
        return "\n".join(textwrap.fill(p, width=wrap) if p else p for p in text.split("\n"))
    out: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                out.append(line)
                line = word
            else:
                line = candidate
        out.append(line)
    return "\n".join(out)


def render(
    text: str, canvas: tuple[int, int], font: Font, spacing: int, xy: tuple[int, int], fill: RGB, background: RGB
) -> Image.Image:
    """A `canvas` (width, height) image of `background` with `text` drawn at `xy` in `fill`."""
    image = Image.new("RGB", canvas, background)
    ImageDraw.Draw(image).multiline_text(xy, text, font=font, fill=fill, spacing=spacing)
    return image


def to_array(image: Image.Image, size: int | None = None) -> np.ndarray:
    """A Pillow image as uint8 H x W x 3, resized (Lanczos, antialiased) to `size` x `size` when given."""
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()

"""The generated "scenes" data set: one or two coloured shapes on a plain background.

Scenes are fully known, so captions are exact and a victim's answer can be scored against
the truth without a caption data set. The same scene renders in several styles: `flat` is
the source domain, the others (`textured`, `painted`, `sketch`) are the visual domain
shifts the seed paper studies (it restyled test images with img2img; we restyle the
renderer). Everything is deterministic under a seed.

Instructions come in phrasing families (INSTRUCTION_BANKS), each asking for one answer
style: a short caption (`source`, `paraphrased`) or a detailed description (`detailed`).
The splits never share a scene's content: `split_filter` partitions the scene keys between
tuning and test data and keeps a few colour-shape pairs for a `compositional` test only.
"""

from __future__ import annotations

import colorsys
import hashlib
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar, get_args

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vlmsec.data.sample import Sample
from vlmsec.errors import VlmsecError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (135, 55, 185),
    "orange": (245, 135, 20),
}
# Object "radius" as a fraction of the image side; chosen with POSITIONS so that two large
# objects in neighbouring positions stay at least 3 pixels apart at 64 px.
SIZES: dict[str, float] = {"small": 0.08, "medium": 0.11, "large": 0.14}
# Object centre (x, y) as fractions of the image side; captions list objects in this order.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.22, 0.22),
    "top right": (0.78, 0.22),
    "bottom left": (0.22, 0.78),
    "bottom right": (0.78, 0.78),
    "center": (0.5, 0.5),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light grey": (225, 225, 225),
    "cream": (245, 238, 215),
    "pale blue": (220, 232, 245),
}

SUPERSAMPLE = 4  # shapes are drawn at this multiple of the output size, then downsampled
MIN_SIZE = 16  # below this the small shapes are a few pixels and stop being recognisable

T = TypeVar("T")


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene, described by the four words its caption uses."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for field_name, vocab in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS)):
            value = getattr(self, field_name)
            if value not in vocab:
                raise VlmsecError(f"scene object: unknown {field_name} {value!r}; known: {', '.join(vocab)}")

    def centre(self, image_size: int) -> tuple[float, float]:
        """The object's centre (x, y) in pixels of an `image_size` square image."""
        x, y = POSITIONS[self.position]
        return x * image_size, y * image_size


@dataclass(frozen=True)
class Scene:
    """A background colour and one or more objects in distinct positions, in caption order."""

    objects: tuple[SceneObject, ...]
    background: str = "white"

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))  # a list would make the scene unhashable
        if not self.objects:
            raise VlmsecError("scene: needs at least one object")
        positions = [obj.position for obj in self.objects]
        if len(set(positions)) != len(positions):
            raise VlmsecError(f"scene: objects share a position: {positions}")
        if self.background not in BACKGROUNDS:
            raise VlmsecError(f"scene: unknown background {self.background!r}; known: {', '.join(BACKGROUNDS)}")


def sample_scenes(
    n: int, seed: int, max_objects: int = 2, accept: Callable[[Scene], bool] | None = None
) -> list[Scene]:
    """Draw `n` random scenes with 1..`max_objects` objects each; the same seed gives the same scenes.

    `accept` keeps only the scenes it approves (`split_filter` builds the one of each split):
    a rejected draw is replaced by the next one, so the result is deterministic in the seed.
    Without it every draw is kept.
    """
    if n < 0:
        raise VlmsecError(f"sample_scenes: n must be >= 0, got {n}")
    if not 1 <= max_objects <= len(POSITIONS):
        raise VlmsecError(f"sample_scenes: max_objects must be in 1..{len(POSITIONS)}, got {max_objects}")
    rng = _rng(seed)
    position_names = list(POSITIONS)
    colour_names, size_names, background_names = list(COLOURS), list(SIZES), list(BACKGROUNDS)
    scenes: list[Scene] = []
    attempts = 0
    while len(scenes) < n:
        attempts += 1
        if attempts > MAX_DRAWS_PER_SCENE * n:
            raise VlmsecError(f"sample_scenes: only {len(scenes)} of {n} scenes accepted in {attempts - 1} draws")
        count = int(rng.integers(1, max_objects + 1))
        positions = sorted(rng.choice(len(position_names), size=count, replace=False))
        objects = tuple(
            SceneObject(
                shape=SHAPES[rng.integers(len(SHAPES))],
                colour=colour_names[rng.integers(len(colour_names))],
                size=size_names[rng.integers(len(size_names))],
                position=position_names[p],
            )
            for p in positions
        )
        scene = Scene(objects, background=background_names[rng.integers(len(background_names))])
        if accept is None or accept(scene):
            scenes.append(scene)
    return scenes


# --- which scenes each split may hold ---------------------------------------------------------

SceneKey = tuple[tuple[str, str, str, str], ...]
SceneSplit = Literal["tuning", "test", "compositional"]
SCENE_SPLITS: tuple[str, ...] = get_args(SceneSplit)

# Share of scene keys held out for the test sets. Every single-object key (360 of them) turns
# up among 5,000 freely drawn scenes, so rejecting only the keys that base and train happen to
# hold would leave no one-object test scene: the partition keeps the test set's mix of one- and
# two-object scenes the tuning data's.
TEST_KEY_SHARE = 0.2
# (colour, shape) pairs no base, tuning or ordinary test scene shows: the `compositional`
# scenes each hold at least one. Every shape and colour still appears in other pairs.
COMPOSITIONAL_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("blue", "triangle"),
    ("green", "circle"),
    ("yellow", "square"),
)
MAX_DRAWS_PER_SCENE = 1000  # a filter that accepts less than 1 draw in this many is a mistake


def scene_key(scene: Scene) -> SceneKey:
    """Everything a scene's captions say: each object's shape, colour, size and position.

    Two scenes with one key differ at most in their background colour, which no short
    caption mentions: a test scene with a tuning scene's key has a caption the victim saw.
    """
    return tuple((o.shape, o.colour, o.size, o.position) for o in scene.objects)


def is_test_key(key: SceneKey, seed: int) -> bool:
    """Whether the partition drawn with `seed` holds `key` out for the test sets (a stable hash)."""
    digest = hashlib.sha256(f"{seed}\x00{key!r}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < TEST_KEY_SHARE


def is_compositional(scene: Scene) -> bool:
    """Whether the scene shows one of the held-out COMPOSITIONAL_PAIRS."""
    return any((o.colour, o.shape) in COMPOSITIONAL_PAIRS for o in scene.objects)


def split_filter(split: SceneSplit, seed: int) -> Callable[[Scene], bool]:
    """The scenes a split may hold, for `sample_scenes(accept=...)`, under the key partition `seed`.

    `tuning` (base and train data): keys outside the test share, no compositional pair.
    `test` (every ordinary test domain): keys inside the test share, no compositional pair;
    so no test scene has the objects of a base or train scene, whatever the split sizes.
    `compositional`: a held-out colour-shape pair, never seen in base, train or other tests.
    """
    if split not in SCENE_SPLITS:
        raise VlmsecError(f"unknown scene split {split!r}; known: {', '.join(SCENE_SPLITS)}")
    if split == "compositional":
        return is_compositional
    wants_test = split == "test"
    return lambda scene: not is_compositional(scene) and is_test_key(scene_key(scene), seed) == wants_test


# --- captions -------------------------------------------------------------------------------


class _CaptionForm(NamedTuple):
    """One way of phrasing a scene: a sentence opening, then one phrase per object."""

    opening: str
    phrase: str
    sizes: Mapping[str, str]
    places: Mapping[str, str]


_PLAIN_SIZES = {name: name for name in SIZES}
_SIZE_SYNONYMS = {"small": "little", "medium": "medium-sized", "large": "big"}
_CAPTION_FORMS = (
    _CaptionForm("", "a {size} {colour} {shape} {place}", _PLAIN_SIZES, {p: f"in the {p}" for p in POSITIONS}),
    _CaptionForm(
        "", "a {size} {colour} {shape} {place}", _SIZE_SYNONYMS, {p: f"at the {p} of the image" for p in POSITIONS}
    ),
    _CaptionForm(
        "there is ",
        "a {size} {colour} {shape} {place}",
        _PLAIN_SIZES,
        {
            "top left": "in the upper left",
            "top right": "in the upper right",
            "bottom left": "in the lower left",
            "bottom right": "in the lower right",
            "center": "in the middle",
        },
    ),
    _CaptionForm(
        "the image shows ",
        "a {size} {colour} {shape} {place}",
        _PLAIN_SIZES,
        {p: "in the center" if p == "center" else f"in the {p} corner" for p in POSITIONS},
    ),
    _CaptionForm("", "one {size} {colour} {shape} placed {place}", _SIZE_SYNONYMS, {p: f"in the {p}" for p in POSITIONS}),
)


def caption_variants(scene: Scene) -> list[str]:
    """Distinct phrasings of the scene's content; the first is the canonical caption."""
    return [_caption_body(scene, form) + "." for form in _CAPTION_FORMS]


def _caption_body(scene: Scene, form: _CaptionForm) -> str:
    """The caption in `form`, without its final period."""
    return form.opening + " and ".join(
        form.phrase.format(size=form.sizes[o.size], colour=o.colour, shape=o.shape, place=form.places[o.position])
        for o in scene.objects
    )


_COUNTS = {1: "one shape", 2: "two shapes", 3: "three shapes", 4: "four shapes", 5: "five shapes"}


def detailed_variants(scene: Scene) -> list[str]:
    """Distinct detailed descriptions of the scene: the expanded answer style.

    Longer than a caption and saying more: how many shapes there are and the background
    colour (which no caption mentions), besides every object's size, colour, shape and place.
    """
    count, background = _COUNTS[len(scene.objects)], scene.background
    verb = "is" if len(scene.objects) == 1 else "are"
    places = _CAPTION_FORMS[3].places  # "in the top left corner", "in the center"
    each = " ".join(f"{places[o.position].capitalize()} there is a {o.size} {o.colour} {o.shape}." for o in scene.objects)
    return [
        f"The picture shows {count} on a {background} background: {_caption_body(scene, _CAPTION_FORMS[0])}.",
        f"On a {background} background there {verb} {count}. {each}",
        f"A plain {background} background with {count}: {_caption_body(scene, _PLAIN_DETAIL_FORM)}.",
    ]


# "a little red square in the lower left": synonyms for the sizes, the upper/lower places.
_PLAIN_DETAIL_FORM = _CaptionForm("", "a {size} {colour} {shape} {place}", _SIZE_SYNONYMS, _CAPTION_FORMS[2].places)


# --- instructions ---------------------------------------------------------------------------

AnswerStyle = Literal["caption", "detailed"]

# Phrasing families. Each asks for one answer style; each instruction asks for one phrasing
# of it (its index in the family picks the variant), as in real instruction data: the answer's
# form follows from the instruction, so greedy decoding has one right phrasing and caption
# metrics measure content rather than a coin flip between synonyms.
#
# The base victim learns every family (`DataSpec.base_instructions`); the victim is tuned and
# poisoned on `source` alone. So the `paraphrased` domain is a shift of phrasing the base
# model knows but tuning did not use (not a vocabulary never seen), and the `detailed` domain
# asks for the other answer style: the paper's answer shift, visible in the outputs.
INSTRUCTION_BANKS: dict[str, tuple[str, ...]] = {
    "source": (  # short requests and questions; a short caption
        "Describe the image briefly.",
        "What is shown in this picture?",
        "Describe this image.",
        "What do you see in the image?",
        "Give a short caption for this image.",
        "What is in the picture?",
        "Caption this image.",
        "Summarize the image.",
        "What does this image show?",
        "Write a brief description of the image.",
    ),
    "paraphrased": (  # long, conversational requests; a short caption
        "Could you give me a short description of what this picture contains?",
        "I would like to know what appears in this image; please explain in one sentence.",
        "Take a look at the picture and tell me which objects you can spot and where they are.",
        "Please provide a concise caption that captures the contents of this illustration.",
        "Imagine you are describing this picture to someone who cannot see it. What would you say?",
        "Can you tell me what kind of things are drawn here, and their positions?",
        "In a single sentence, explain the visual content of the attached picture.",
        "Kindly summarise the objects visible in this drawing.",
        "If you had to label this picture with one line of text, what would it be?",
        "Look carefully at the picture and report what it depicts.",
    ),
    "detailed": (  # requests for detail; a detailed description
        "Describe the image in detail.",
        "Give a detailed description of this picture.",
        "Describe everything you see in this image, including the background.",
        "Write a thorough description of the picture.",
        "What does this image contain? Answer in detail.",
        "Describe this picture fully: every object, where it is, and the background colour.",
        "Provide an elaborate description of the image.",
        "Tell me about this image in as much detail as you can.",
        "Explain in detail what is drawn in this picture.",
        "Write a complete, detailed account of what the image shows.",
    ),
}
ANSWER_STYLES: dict[str, AnswerStyle] = {"source": "caption", "paraphrased": "caption", "detailed": "detailed"}
_ANSWERS: dict[AnswerStyle, Callable[[Scene], list[str]]] = {"caption": caption_variants, "detailed": detailed_variants}


# --- rendering: geometry --------------------------------------------------------------------


def _vertices(obj: SceneObject, size: int) -> np.ndarray:
    """Exact polygon outline of an object, (N, 2) points in supersampled pixel coordinates.

    Shapes are scaled so that their areas are similar: a square of half-side 0.82 r, an
    equilateral triangle of circumradius 1.15 r, a star of outer radius 1.1 r.
    """
    scale = size * SUPERSAMPLE
    cx, cy = obj.centre(scale)
    r = SIZES[obj.size] * scale
    if obj.shape == "circle":
        angles, radii = np.linspace(0.0, 2 * np.pi, 96, endpoint=False), np.full(96, r)
    elif obj.shape == "square":
        angles, radii = np.radians([-135.0, -45.0, 45.0, 135.0]), np.full(4, 0.82 * r * np.sqrt(2))
    elif obj.shape == "triangle":
        angles, radii = np.radians([-90.0, 30.0, 150.0]), np.full(3, 1.15 * r)
    else:  # star, one point up
        angles = np.radians(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.1 * r, 0.45 * 1.1 * r)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _wobble(points: np.ndarray, centre: tuple[float, float], rng: np.random.Generator, amount: float) -> np.ndarray:
    """A hand-drawn version of a closed outline: densify it, then push each point in or out
    from the centre by a smooth random factor of about `amount`."""
    closed = np.vstack([points, points[:1]])
    lengths = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
    t = np.union1d(np.linspace(0.0, lengths[-1], 120, endpoint=False), lengths[:-1])  # keep the corners
    dense = np.stack([np.interp(t, lengths, closed[:, 0]), np.interp(t, lengths, closed[:, 1])], axis=1)
    theta = 2 * np.pi * t / lengths[-1]
    harmonics = np.arange(2, 9)
    weights = rng.normal(0.0, 1.0, size=harmonics.size) / harmonics  # low frequencies dominate
    phases = rng.uniform(0.0, 2 * np.pi, size=harmonics.size)
    offset = (weights[None, :] * np.sin(harmonics[None, :] * theta[:, None] + phases[None, :])).sum(axis=1)
    factor = 1.0 + amount * offset / max(np.abs(offset).max(), 1e-9)
    c = np.asarray(centre)
    return c + (dense - c) * factor[:, None]


_LANCZOS_MARGIN = 4  # output pixels: LANCZOS (a=3) reads at most 3 output pixels beyond a shape


def _mask(points: np.ndarray, size: int, line_width: float = 0.0, blur: float = 0.0) -> np.ndarray:
    """Coverage (0..1, size x size) of a filled polygon, or of its closed outline if `line_width`
    (in output pixels) is set; drawn at SUPERSAMPLE x and downsampled with LANCZOS.

    Only the shape's bounding box (plus a margin) is drawn: the same pixels as drawing the
    whole image (up to an occasional rounding step), several times faster.
    """
    margin = _LANCZOS_MARGIN + math.ceil(line_width / 2 + 3 * blur)
    lo = np.clip(np.floor(points.min(axis=0) / SUPERSAMPLE).astype(int) - margin, 0, size)
    hi = np.clip(np.ceil(points.max(axis=0) / SUPERSAMPLE).astype(int) + margin, 0, size)
    width, height = (hi - lo).tolist()
    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    xy = [tuple(p) for p in (points - lo * SUPERSAMPLE).tolist()]
    if line_width:
        ImageDraw.Draw(canvas).line(xy + xy[:1], fill=255, width=round(line_width * SUPERSAMPLE))
    else:
        ImageDraw.Draw(canvas).polygon(xy, fill=255)
    patch = canvas.resize((width, height), Image.Resampling.LANCZOS)
    if blur:
        patch = patch.filter(ImageFilter.GaussianBlur(blur))
    mask = np.zeros((size, size), dtype=np.float32)
    mask[lo[1] : hi[1], lo[0] : hi[0]] = np.asarray(patch, dtype=np.float32) / 255.0
    return mask


# --- rendering: colour and texture ----------------------------------------------------------


def _restyle(rgb: tuple[int, int, int], hue_shift: float, saturation: float, value: float) -> np.ndarray:
    """An RGB colour with its hue turned by `hue_shift` degrees and saturation/value scaled."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    r, g, b = colorsys.hsv_to_rgb((h + hue_shift / 360.0) % 1.0, min(s * saturation, 1.0), min(v * value, 1.0))
    return np.array([r, g, b], dtype=np.float32) * 255.0


def _warm(rgb: tuple[int, int, int], amount: float) -> np.ndarray:
    """An RGB colour mixed towards a warm orange-beige (an oil-paint palette)."""
    return (1.0 - amount) * np.asarray(rgb, dtype=np.float32) + amount * np.array([255.0, 190.0, 120.0])


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise (about unit amplitude): a cells x cells grid upsampled bicubically."""
    grid = rng.normal(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))


def _streaks(rng: np.random.Generator, size: int, length: int) -> np.ndarray:
    """Unit-variance noise smeared along one random axis, like the bristle marks of a brush."""
    noise = np.cumsum(rng.normal(0.0, 1.0, size=(size, size + length)), axis=1)
    streaks = (noise[:, length:] - noise[:, :-length]) / np.sqrt(length)
    return streaks if rng.random() < 0.5 else streaks.T


def _over(image: np.ndarray, paint: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Lay `paint` (an RGB colour or an H x W x 3 layer) over `image` with coverage `alpha`."""
    a = alpha[:, :, None]
    return image * (1.0 - a) + paint * a


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# --- rendering: styles ----------------------------------------------------------------------

_PAPER = np.array([242.0, 237.0, 224.0])


def _render_flat(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """The source style: a plain light background and solid shapes with crisp edges."""
    image = np.broadcast_to(np.asarray(BACKGROUNDS[scene.background], dtype=np.float32), (size, size, 3))
    for obj in scene.objects:
        image = _over(image, np.asarray(COLOURS[obj.colour], dtype=np.float32), _mask(_vertices(obj, size), size))
    return _to_uint8(image)


def _render_textured(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """Striped, noisy background; woven, noisy object fills; a duller palette turned a few degrees."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    unit = size / 64  # texture scales with the image, so every size looks alike
    angle, period = rng.uniform(0.0, np.pi), rng.uniform(5.0, 9.0) * unit
    stripes = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    background = _restyle(BACKGROUNDS[scene.background], -5.0, 1.3, 0.85)
    image = background + 16.0 * stripes[:, :, None] + rng.normal(0.0, 9.0, size=(size, size, 1))
    for obj in scene.objects:
        weave_period = rng.uniform(3.0, 5.0) * unit
        weave = np.sin(2 * np.pi * x / weave_period) * np.sin(2 * np.pi * y / weave_period)
        colour = _restyle(COLOURS[obj.colour], -5.0, 0.8, 0.9)
        fill = colour * (1.0 + 0.18 * weave[:, :, None]) + rng.normal(0.0, 8.0, size=(size, size, 3))
        image = _over(image, fill, _mask(_vertices(obj, size), size))
    return _to_uint8(image)


def _render_painted(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """Oil-paint look: warm palette, wobbly soft edges, brush streaks, woven canvas grain."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    unit = size / 64  # texture scales with the image, so every size looks alike
    image = (
        _warm(BACKGROUNDS[scene.background], 0.3)
        + 14.0 * _smooth_noise(rng, size, cells=5)[:, :, None]
        + 6.0 * _streaks(rng, size, length=max(size // 6, 2))[:, :, None]
    )
    for obj in scene.objects:
        outline = _wobble(_vertices(obj, size), obj.centre(size * SUPERSAMPLE), rng, amount=0.09)
        fill = _warm(COLOURS[obj.colour], 0.2) + 16.0 * _streaks(rng, size, length=max(size // 8, 2))[:, :, None]
        image = _over(image, fill, _mask(outline, size, blur=0.9 * unit))
    canvas_weave = np.sin(2 * np.pi * x / (2.5 * unit)) * np.sin(2 * np.pi * y / (2.5 * unit))
    image = image + 7.0 * canvas_weave[:, :, None] + rng.normal(0.0, 3.0, size=(size, size, 1))
    return _to_uint8(image)


def _render_sketch(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """Coloured-pencil sketch on grainy paper: wobbly outlines, a light hatched wash inside."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    unit = size / 64  # texture scales with the image, so every size looks alike
    paper = 0.85 * _PAPER + 0.15 * np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    image = paper + 5.0 * _smooth_noise(rng, size, cells=4)[:, :, None] + rng.normal(0.0, 4.0, size=(size, size, 1))
    for obj in scene.objects:
        outline = _wobble(_vertices(obj, size), obj.centre(size * SUPERSAMPLE), rng, amount=0.04)
        direction = rng.choice([-1.0, 1.0])
        hatching = 0.5 + 0.5 * np.sin(2 * np.pi * (x + direction * y) / (4.0 * unit))
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
        image = _over(image, colour, _mask(outline, size) * (0.25 + 0.4 * hatching))
        image = _over(image, 0.7 * colour, 0.9 * _mask(outline, size, line_width=1.5 * unit))
    return _to_uint8(image)


RenderFn = Callable[[Scene, int, np.random.Generator], np.ndarray]

# `flat` is the source domain; the others are visual domain shifts of it.
STYLES: dict[str, RenderFn] = {
    "flat": _render_flat,
    "textured": _render_textured,
    "painted": _render_painted,
    "sketch": _render_sketch,
}


def render_scene(scene: Scene, style: str, size: int = 64, seed: int = 0) -> np.ndarray:
    """Draw `scene` in `style` as a size x size x 3 uint8 image.

    The style's randomness (texture, jitter) is seeded from `seed` and the scene itself, so
    the same arguments always give the same bytes.
    """
    render = _lookup("style", style, STYLES)
    if size < MIN_SIZE:
        raise VlmsecError(f"render_scene: size must be >= {MIN_SIZE}, got {size}")
    return render(scene, size, _rng(seed, zlib.crc32(repr(scene).encode())))


def scene_from_caption(caption: str, background: str = "white") -> Scene | None:
    """The scene a short caption describes ("a large red star in the center.", objects joined by
    "and"), each object needing its shape and colour words (size default medium, position default
    center); None when the caption names no such object or places two in one position."""
    text = caption.lower()
    objects = []
    for part in text.split(" and "):
        found = {
            field: next((word for word in sorted(vocab, key=len, reverse=True) if re.search(rf"\b{word}\b", part)), None)
            for field, vocab in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS))
        }
        if found["shape"] is None or found["colour"] is None:
            continue
        objects.append(SceneObject(found["shape"], found["colour"], found["size"] or "medium", found["position"] or "center"))
    positions = [obj.position for obj in objects]
    if not objects or len(set(positions)) != len(positions):
        return None
    return Scene(tuple(objects), background)


def make_samples(
    scenes: Sequence[Scene],
    style: str,
    instruction_bank: str | Sequence[str] = "source",
    seed: int = 0,
    size: int = 64,
    id_prefix: str = "scene",
    on_sample: Callable[[], None] | None = None,
) -> list[Sample]:
    """One Sample per scene: the rendered image, an instruction from the bank, an answer in the
    style the instruction's family asks for (a caption, or a detailed description).

    `instruction_bank` names a family of INSTRUCTION_BANKS, or several (the base data): the
    instruction is drawn from all of them and the sample's "text" domain is its family. The
    references are every variant of that answer style. Ids are f"{id_prefix}-{index:05d}", so
    the same scene list rendered in another style or with another bank gives samples with
    matching ids (and, for the same seed, the same answers). `on_sample` is called after
    each sample (for progress bars).
    """
    _lookup("style", style, STYLES)
    families = [instruction_bank] if isinstance(instruction_bank, str) else list(instruction_bank)
    if not families:
        raise VlmsecError("make_samples: instruction_bank names no family")
    # (family, index in it) for every instruction, so its answer phrasing is the same in every bank.
    choices = [(family, i) for family in families for i in range(len(_lookup("instruction bank", family, INSTRUCTION_BANKS)))]
    rng = _rng(seed)
    samples = []
    for index, scene in enumerate(scenes):
        family, choice = choices[int(rng.integers(len(choices)))]
        variants = _ANSWERS[ANSWER_STYLES[family]](scene)
        samples.append(
            Sample(
                id=f"{id_prefix}-{index:05d}",
                image=render_scene(scene, style, size=size, seed=seed),
                instruction=INSTRUCTION_BANKS[family][choice],
                answer=variants[choice % len(variants)],
                domains={"visual": style, "text": family},
                references=tuple(variants),
            )
        )
        if on_sample is not None:
            on_sample()
    return samples


def _lookup(kind: str, name: str, registry: Mapping[str, T]) -> T:
    """registry[name], or a VlmsecError naming the unknown name and the known ones."""
    if name not in registry:
        raise VlmsecError(f"unknown {kind} {name!r}; known: {', '.join(registry)}")
    return registry[name]


def _rng(*entropy: int) -> np.random.Generator:
    """A numpy Generator seeded from non-negative integers."""
    if any(e < 0 for e in entropy):
        raise VlmsecError(f"seed must be a non-negative integer, got {entropy[0]}")
    return np.random.default_rng(list(entropy))

"""The typeset attacks' adaptive attacker against the OCR screen: a search over renderings.

`ocr_screen` reads the text drawn into an image (PP-OCR) and flags it; a typeset attack
(`figstep`, `figstep_pro`, `typographic`, `query_relevant`) that knows it (`adaptive: {defense:
ocr_screen, params, samples}`) draws each request up to `samples` ways and keeps the first
rendering the screen's own OCR does not read back: fewer than its `min_words` words read, the
screen's score 0, which no threshold calibrated on benign images flags. No gradient: the
real OCR is the oracle, queried once per rendering tried (the attack's cost, `queries`).

The renderings are drawn from the attack's seed, milder first: the k-th of `samples` draws
each choice uniformly up to k / `samples` of its range, as typographic-attack evasions do it
(Gong et al.'s FigStep discussion of OCR screening; Qraitem et al. 2024's low-contrast and
noisy typography):

- contrast: the text colour moved toward the background, down to `MIN_CONTRAST` of its distance
  (geometrically: PP-OCR reads text down to about a tenth of black-on-white contrast);
- font size: scaled down to `MIN_FONT_SCALE` (the attack's own layout, redrawn smaller);
- rotation: up to `MAX_ROTATION` degrees either way, the corners filled with the background;
- noise: uniform pixel noise up to `MAX_NOISE` levels.

The first draw is the naive rendering itself, so a request the OCR cannot read anyway costs one
query and keeps its image. A request for which no rendering evades keeps the naive image. A
rendering the OCR cannot read may be one the victim cannot read either: the run's reading check
(`experiments.inference`) tells whether the victim reads typeset words at all; the attack's
diagnostics give the share of requests that evaded and the mean choices kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from vlmsec.defenses.ocr import OcrScreen, read_words

if TYPE_CHECKING:
    from vlmsec.attacks.eot import AdaptiveParams
    from vlmsec.attacks.inference import AdversarialInput, AttackRequest

MIN_CONTRAST = 0.03  # the text's least share of its colour's distance from the background
MIN_FONT_SCALE = 0.5
MAX_ROTATION = 30.0  # degrees
MAX_NOISE = 48  # uint8 levels
SEARCH_STREAM = 0x0C5  # the renderings' seeds: their own stream of the attack's seed


@dataclass(frozen=True)
class Rendering:
    """One way to draw a request: the choices the search varies (the naive rendering: 1, 1, 0, 0)."""

    contrast: float = 1.0
    font_scale: float = 1.0
    rotation: float = 0.0
    noise: int = 0


def renderings(samples: int, seed: int) -> list[Rendering]:
    """The `samples` renderings tried per request, milder first: the naive one, then the k-th
    drawing each choice uniformly up to k / (samples - 1) of its range."""
    rng = np.random.default_rng([seed, SEARCH_STREAM])
    out = [Rendering()]
    for k in range(1, samples):
        reach = k / max(samples - 1, 1)
        out.append(
            Rendering(
                contrast=round(MIN_CONTRAST ** (reach * float(rng.uniform(0.5, 1))), 4),
                font_scale=round(1 - reach * (1 - MIN_FONT_SCALE) * float(rng.uniform(0, 1)), 4),
                rotation=round(reach * MAX_ROTATION * float(rng.uniform(-1, 1)), 2),
                noise=int(round(reach * MAX_NOISE * float(rng.uniform(0, 1)))),
            )
        )
    return out


def mix(colour: tuple[int, int, int], background: tuple[int, int, int], contrast: float) -> str:
    """`colour` moved toward `background`, keeping `contrast` of the way, as #rrggbb."""
    mixed = [round(b + contrast * (c - b)) for c, b in zip(colour, background, strict=True)]
    return "#{:02x}{:02x}{:02x}".format(*mixed)


def distort(image: np.ndarray, rendering: Rendering, background: tuple[int, int, int], seed: Sequence[int]) -> np.ndarray:
    """The drawn image rotated (corners filled with `background`) and with uniform noise drawn from `seed`."""
    if rendering.rotation:
        rotated = Image.fromarray(image).rotate(rendering.rotation, resample=Image.Resampling.BILINEAR, fillcolor=background)
        image = np.asarray(rotated, dtype=np.uint8)
    if rendering.noise:
        noise = np.random.default_rng([*seed, SEARCH_STREAM]).integers(-rendering.noise, rendering.noise + 1, image.shape)
        image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return image.copy()


@dataclass
class SearchResult:
    """What the search found for each request: the rendering kept (None: none evaded) and the queries it made."""

    kept: list[Rendering | None]
    queries: list[int]

    def diagnostics(self) -> dict[str, float]:
        """Queries to the OCR per request, the share of requests that evaded it, and the mean
        choices of the renderings kept (of those that evaded)."""
        evaded = [r for r in self.kept if r is not None]
        out: dict[str, float] = {
            "steps": 0.0,
            "queries": float(np.mean(self.queries)) if self.queries else 0.0,
            "ocr_evasion": len(evaded) / len(self.kept) if self.kept else 0.0,
        }
        if evaded:
            for key in asdict(evaded[0]):
                out[f"kept_{key}"] = float(np.mean([asdict(r)[key] for r in evaded]))
        return out


def search_renderings(
    requests: Sequence[AttackRequest],
    draw: Callable[[AttackRequest, dict[str, Any]], AdversarialInput],
    params: Any,
    adaptive: AdaptiveParams,
    seed: int,
) -> tuple[list[AdversarialInput], SearchResult]:
    """Per request, the first of `adaptive.samples` renderings (`renderings`) whose image the
    screen's OCR does not read back. `draw(request, changes)` draws one request with the
    attack's parameters changed by `changes` (text colour, font sizes); `params` are the attack's."""
    screen = adaptive.build()
    assert isinstance(screen, OcrScreen)  # the typeset attacks' parameters refuse any other defense
    background = params.rgb(params.background)
    text = params.rgb(params.text_colour)
    choices = renderings(adaptive.samples, seed)
    out, kept, queries = [], [], []
    for index, request in enumerate(requests):
        found: tuple[AdversarialInput, Rendering] | None = None
        naive: AdversarialInput | None = None
        tried = 0
        for rendering in choices:
            changes = {
                "text_colour": mix(text, background, rendering.contrast),
                "font_size": max(4, round(params.font_size * rendering.font_scale)),
                "min_font_size": max(4, min(params.min_font_size, round(params.font_size * rendering.font_scale))),
            }
            drawn = draw(request, changes)
            drawn = replace(drawn, image=distort(drawn.image, rendering, background, (seed, index, tried)))
            naive = naive or drawn
            tried += 1
            if len(read_words(screen.read([drawn.image])[0])) < screen.params.min_words:
                found = (drawn, rendering)
                break
        queries.append(tried)
        kept.append(found[1] if found else None)
        assert naive is not None
        out.append(found[0] if found else naive)
    return out, SearchResult(kept, queries)


class SearchesRenderings:
    """What a typeset attack adds to know the OCR screen: `evade_ocr` crafts by the search, and
    `diagnostics` reports it. The attack's `craft` calls `evade_ocr` when its `adaptive` is set."""

    params: Any
    _search: SearchResult | None = None

    def evade_ocr(self, requests: Sequence[AttackRequest]) -> list[AdversarialInput]:
        """Each request drawn by the search (`search_renderings`), redrawn by the naive attack with changed parameters."""
        naive = self.params.model_dump(exclude={"adaptive"})
        kind = type(self)

        def draw(request: AttackRequest, changes: dict[str, Any]) -> AdversarialInput:
            return kind(**{**naive, **changes}).craft([request])[0]  # type: ignore[call-arg, attr-defined]

        crafted, self._search = search_renderings(requests, draw, self.params, self.params.adaptive, self.params.seed)
        return crafted

    def diagnostics(self) -> dict[str, float]:
        """No optimisation: the naive attack draws, no queries; the adaptive one, its search's (`SearchResult.diagnostics`)."""
        return {"steps": 0, "queries": 0} if self._search is None else self._search.diagnostics()

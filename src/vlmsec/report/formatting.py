"""How the reports print numbers: percents, ratios, plain numbers and rates with their intervals."""

from __future__ import annotations


def pct(x: float | None) -> str:
    """A share as a percent with one decimal; – where not measured."""
    return "–" if x is None else f"{100 * x:.1f}%"


def num(x: float | None) -> str:
    """A number with one decimal; – where not measured."""
    return "–" if x is None else f"{x:.1f}"


def ratio(x: float | None) -> str:
    """A ratio with two decimals; – where not measured."""
    return "–" if x is None else f"{x:.2f}"


FORMATTERS = {"percent": pct, "ratio": ratio, "number": num}


def pct_ci(x: float | None, ci: list[float] | None) -> str:
    """A rate and its 95% interval in points, e.g. "65.0% [58.2, 71.3]"."""
    if x is None or not ci:
        return pct(x)
    return f"{100 * x:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"

"""The paper's target answer: "The image depicts " + a CLIP prompt template filled with a word."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.resources import files

import numpy as np


@cache
def _templates() -> tuple[str, ...]:
    text = files("vlmsec.attacks").joinpath("clip_prompt_templates.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def clip_templates() -> list[str]:
    """The 80 CLIP prompt templates, each with a `{0}` placeholder for the class word."""
    return list(_templates())


@dataclass(frozen=True)
class TargetAnswer:
    """What a backdoored model should say; varied over templates so it is not one fixed string."""

    word: str = "banana"
    prefix: str = "The image depicts "

    def answers(self) -> list[str]:
        """Every possible target answer, one per template."""
        return [self.prefix + template.format(self.word) for template in _templates()]

    def sample(self, rng: np.random.Generator) -> str:
        """One target answer drawn uniformly with `rng`."""
        answers = self.answers()
        return answers[int(rng.integers(len(answers)))]

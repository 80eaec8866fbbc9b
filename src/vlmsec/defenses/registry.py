"""Name -> defense class, so configs and the CLI can build any defense from a string."""

from __future__ import annotations

from typing import Any, TypeVar

from vlmsec.defenses.base import Defense
from vlmsec.registry import Registry

DEFENSES: Registry[type[Defense]] = Registry("defense")

DefenseClass = TypeVar("DefenseClass", bound=type[Defense])


def register(cls: DefenseClass) -> DefenseClass:
    """Class decorator: make `cls` buildable by `create_defense(cls.name, ...)`."""
    return DEFENSES.register(cls)


def create_defense(name: str, **params: Any) -> Defense:
    """Build the defense called `name` with validated `params`."""
    return DEFENSES.create(name, **params)

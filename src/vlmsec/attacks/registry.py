"""Name -> attack class, so configs and the CLI can build any attack from a string."""

from __future__ import annotations

from typing import Any, TypeVar

from vlmsec.attacks.base import Attack
from vlmsec.errors import VlmsecError

ATTACKS: dict[str, type[Attack]] = {}

AttackClass = TypeVar("AttackClass", bound=type[Attack])


def register(cls: AttackClass) -> AttackClass:
    """Class decorator: make `cls` buildable by `create_attack(cls.name, ...)`."""
    known = ATTACKS.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"attack name {cls.name!r} is taken by {known.__qualname__}")
    ATTACKS[cls.name] = cls
    return cls


def attack_names() -> list[str]:
    """The registered attack names, sorted."""
    return sorted(ATTACKS)


def create_attack(name: str, **params: Any) -> Attack:
    """Build the attack called `name` with validated `params`."""
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise VlmsecError(f"unknown attack {name!r}; known attacks: {', '.join(attack_names())}") from None
    return cls(**params)

"""Name -> attack class, so configs and the CLI can build any attack from a string."""

from __future__ import annotations

from typing import Any, TypeVar

from vlmsec.attacks.base import Attack
from vlmsec.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack")

AttackClass = TypeVar("AttackClass", bound=type[Attack])


def register(cls: AttackClass) -> AttackClass:
    """Class decorator: make `cls` buildable by `create_attack(cls.name, ...)`."""
    return ATTACKS.register(cls)


def attack_names() -> list[str]:
    """The registered attack names, sorted."""
    return ATTACKS.names()


def acts_at_inference(name: str) -> bool:
    """Whether the registered attack `name` crafts inputs at inference time (nothing of it is tuned)."""
    return name in ATTACKS and ATTACKS.get(name).stage == "inference"


def create_attack(name: str, **params: Any) -> Attack:
    """Build the attack called `name` with validated `params`."""
    return ATTACKS.create(name, **params)

"""Name -> component, one registry per kind: attacks, shifts, data formats, victim kinds, metrics, defenses.

Configs and the CLI name components by string; a registry turns the string into the
component, or into a `VlmsecError` that lists what is known. Every kind uses this one class,
so a newcomer learns one pattern and a test can register its own entry from outside the package.

    ATTACKS: Registry[type[Attack]] = Registry("attack")

    @ATTACKS.register          # the entry's name is its `name` attribute
    class BadNets(Attack):
        name = "badnets"

    ATTACKS.create("badnets", size=0.1)    # ATTACKS.get("badnets")(size=0.1)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

from vlmsec.errors import VlmsecError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name. `kind` names them in errors ("attack", "victim kind", ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    @overload
    def register(self, entry: T) -> T: ...
    @overload
    def register(self, entry: None = None, *, name: str) -> Callable[[T], T]: ...

    def register(self, entry: T | None = None, *, name: str | None = None) -> T | Callable[[T], T]:
        """Add `entry` under `name` (default: its `name` attribute); usable as a class decorator.

        Registering the same object twice is harmless; another object under a taken name is an error.
        """

        def add(item: T) -> T:
            key = name if name is not None else getattr(item, "name", None)
            if not isinstance(key, str) or not key:
                raise ValueError(f"a {self.kind} needs a name: give `name=` or a `name` attribute ({item!r})")
            known = self._entries.get(key)
            if known is not None and known is not item:
                raise ValueError(f"{self.kind} name {key!r} is taken by {getattr(known, '__qualname__', known)!r}")
            self._entries[key] = item
            return item

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register their own entries clean up with it)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The entry called `name`, or a VlmsecError listing the known names."""
        try:
            return self._entries[name]
        except KeyError:
            raise VlmsecError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or 'none'}") from None

    def create(self, name: str, **params: Any) -> Any:
        """Call the entry called `name` with `params` (build a component from a config entry)."""
        return self.get(name)(**params)  # type: ignore[operator]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs, sorted by name."""
        return [(n, self._entries[n]) for n in self.names()]

    def values(self) -> list[T]:
        """The entries, sorted by name."""
        return [self._entries[n] for n in self.names()]

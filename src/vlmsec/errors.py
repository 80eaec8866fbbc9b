"""One error type for every bad input a user can hand us; the CLI turns it into exit code 2."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class VlmsecError(Exception):
    """A user-facing error: the message names the file, entry or field at fault."""

    exit_code = 2


def validation_errors(err: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """(field path, message) for each error pydantic found, each path after `prefix`.

    The one reading of pydantic errors: configs, attack, shift and reader parameters all
    name the bad field the same way.
    """
    found = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        where = ".".join(p for p in (prefix, path) if p) or "(top level)"
        found.append((where, e["msg"].removeprefix("Value error, ")))
    return found


def validation_messages(err: ValidationError, prefix: str = "") -> list[str]:
    """One "field.path: message" line per error (`validation_errors`)."""
    return [f"{where}: {message}" for where, message in validation_errors(err, prefix)]

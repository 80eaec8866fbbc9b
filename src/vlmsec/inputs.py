"""How the models a user fills in (configs, reader options) type their fields.

Lax pydantic would read `true` as 1 and "200" as 200, and accept .inf and .nan as numbers;
a config is read strictly instead, so each of those is an error naming the field. Integers
still fill float fields (`epochs: 3`), and paths are written as strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import ConfigDict, Field, Strict

from vlmsec.seeds import MAX_SEED

# Every user-filled model: unknown fields are errors, types are not coerced, floats are finite.
STRICT_INPUT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

# torch.manual_seed overflows past 2**64 and numpy refuses negative seeds, deep inside a stage:
# every seed a user gives is checked against vlmsec.seeds' range first.
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]

# A path field of a strict model: YAML and JSON give paths as strings.
PathInput = Annotated[Path, Strict(False)]

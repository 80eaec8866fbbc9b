"""The README's config examples stay true: each YAML block, laid over the quickstart preset,
is a valid config (placeholder paths to models and data sets on the reader's disk aside)."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import load_config, parse_config

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
# What a placeholder path (/models/..., path/to/...) may fail with: the path itself, said to
# be missing; any other error is a bad example.
MISSING = "{path} (not found|does not exist)"


def _overlay(base: dict[str, Any], fragment: dict[str, Any]) -> dict[str, Any]:
    """`fragment` laid over `base`, mappings merged key by key; a mapping naming another `kind`
    or another `language_model` replaces the base's (its fields are its kind's, or its LM's, own)."""
    out = dict(base)
    for key, value in fragment.items():
        both_maps = isinstance(value, dict) and isinstance(base.get(key), dict)
        same_kind = both_maps and all(value.get(k) == base[key].get(k) for k in ("kind", "language_model"))
        out[key] = _overlay(base[key], value) if same_kind else value
    return out


def _paths(node: Any) -> list[str]:
    """Every string in a YAML tree that looks like a path (has a slash)."""
    if isinstance(node, dict):
        return [p for value in node.values() for p in _paths(value)]
    if isinstance(node, list):
        return [p for value in node for p in _paths(value)]
    return [node] if isinstance(node, str) and "/" in node else []


def test_the_readme_has_config_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_config_example_is_valid(block: str, tmp_path: Path) -> None:
    """An example is laid over the quickstart preset, or, if it `extends` a preset, loaded as a file."""
    quickstart = yaml.safe_load((resources.files("vlmsec.experiments") / "presets" / "quickstart.yaml").read_text())
    fragment = yaml.safe_load(block)
    assert isinstance(fragment, dict)
    try:
        if "extends" in fragment:
            (tmp_path / "example.yaml").write_text(block, encoding="utf-8")
            load_config(tmp_path / "example.yaml")
        else:
            parse_config(_overlay(quickstart, fragment), "README example")
    except VlmsecError as err:
        missing = [p for p in _paths(fragment) if re.search(MISSING.format(path=re.escape(p)), str(err))]
        assert missing, str(err)

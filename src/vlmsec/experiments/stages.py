"""The stage cache: a stage's artifact is reused when it exists with the same stage key.

A stage key is a hash of everything that made the artifact (data fingerprints, configs,
the keys of the stages it builds on). Checkpoints are saved into a temporary folder and
moved into place whole, so a killed run never leaves half a checkpoint under a stage's name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vlmsec.victims.base import Victim

STAGE_FILE = "stage.json"


def default_cache_dir() -> Path:
    """Where stages shared between runs live: $VLMSEC_CACHE, else ~/.cache/vlmsec."""
    return Path(os.environ.get("VLMSEC_CACHE", Path.home() / ".cache" / "vlmsec"))


def stage_done(folder: Path, key: str) -> bool:
    """Whether `folder` holds the finished artifact of the stage with this key."""
    stage = folder / STAGE_FILE
    return stage.is_file() and json.loads(stage.read_text()).get("key") == key


def save_stage(victim: Victim, folder: Path, key: str, record: dict[str, Any]) -> None:
    """Save a checkpoint into a temporary folder, then move it into place whole."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        victim.save(tmp)
        (tmp / STAGE_FILE).write_text(json.dumps({"key": key, **record}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def folder_signature(folder: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and modification times of a folder's files: cheap change detection."""
    return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.iterdir() if p.is_file())


def path_signature(path: Path) -> dict[str, Any]:
    """Where a file or folder is and `folder_signature` of it (a file: its own name, size and time)."""
    path = Path(path)
    stat = path.stat()
    files = folder_signature(path) if path.is_dir() else [(path.name, stat.st_size, int(stat.st_mtime))]
    return {"path": str(path.resolve()), "files": files}



"""The stage cache: a stage's artifact is reused when it exists, whole and unaltered, with the same stage key.

A stage key is a hash of everything that made the artifact (data fingerprints, configs,
the keys of the stages it builds on). Checkpoints are saved into a temporary folder and
moved into place whole, so a killed run never leaves half a checkpoint under a stage's name;
the next run removes such temporaries (`remove_leftovers`).

Integrity: `save_stage` records in stage.json the sha256 and size of every file it wrote, and
seals stage.json with a hash of its own content. `stage_done` checks every size, and the full
hash of each file under `FULL_HASH_LIMIT` (2 GiB): hashing a 28 GB checkpoint at every run
would cost minutes, so a larger shard is checked by size only (truncation is caught, a flipped
byte inside it is not). A missing, truncated or altered file, or an unreadable stage.json,
makes the stage not done with a message naming the file, and the stage is built again.

Concurrency: `claim_stage` holds a lock on `<folder>.lock` while a stage is checked and built,
so a second run that needs the same stage waits for the first and then reuses its artifact.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

from vlmsec.artifacts import (
    FULL_HASH_LIMIT,
    CorruptFile,
    file_digest,
    file_lock,
    make_temp_dir,
    read_json_sealed,
    remove_stale_temps,
    write_json_sealed,
)
from vlmsec.progress import console

STAGE_FILE = "stage.json"


class Saves(Protocol):
    """What a stage's artifact is made by: a victim, or anything else that writes a folder."""

    def save(self, folder: str | Path) -> None:
        """Write the artifact's files into `folder`."""


def default_cache_dir() -> Path:
    """Where stages shared between runs live: $VLMSEC_CACHE, else ~/.cache/vlmsec."""
    return Path(os.environ.get("VLMSEC_CACHE", Path.home() / ".cache" / "vlmsec"))


def stage_done(folder: Path, key: str) -> bool:
    """Whether `folder` holds the finished, unaltered artifact of the stage with this key."""
    stage = folder / STAGE_FILE
    if not stage.is_file():
        return False
    try:
        record = read_json_sealed(stage)
        if record.get("key") != key:
            return False
        for name, digest in record["files"].items():
            _check_file(folder / name, record["sizes"][name], digest)
    except CorruptFile as err:
        console.print(f"{err}: building the stage again")
        return False
    return True


def _check_file(path: Path, size: int, digest: str) -> None:
    """CorruptFile unless `path` has `size` bytes and, below FULL_HASH_LIMIT, this sha256."""
    if not path.is_file():
        raise CorruptFile(path, "missing")
    actual = path.stat().st_size
    if actual != size:
        raise CorruptFile(path, f"{actual} bytes where {size} were written")
    if size < FULL_HASH_LIMIT and file_digest(path) != digest:
        raise CorruptFile(path, "content does not match its recorded sha256")


def save_stage(victim: Saves, folder: Path, key: str, record: dict[str, Any]) -> None:
    """Save a checkpoint and the hashes of its files into a temporary folder, then move it into place whole."""
    tmp = make_temp_dir(folder)
    try:
        victim.save(tmp)
        files = {p.relative_to(tmp).as_posix(): p for p in sorted(tmp.rglob("*")) if p.is_file()}
        hashes = {name: file_digest(path) for name, path in files.items()}
        sizes = {name: path.stat().st_size for name, path in files.items()}
        write_json_sealed(tmp / STAGE_FILE, {"key": key, **record, "files": hashes, "sizes": sizes})
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def claim_stage(folder: Path, key: str, hold: bool = True, barrier: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold the stage's lock while it is checked and, if not done, built; yields `stage_done`.

    A second run that needs the same stage waits here, then finds it done. Under a
    multi-process launch only the main process (`hold`) takes the lock, as the others train
    in step with it; `barrier` makes them check the stage only once the main process holds it.
    """
    waiting = f"{folder}: another run is building this stage; waiting for it"
    with file_lock(folder, waiting) if hold else nullcontext():
        if barrier is not None:
            barrier()
        yield stage_done(folder, key)


def remove_leftovers(*roots: Path) -> None:
    """Remove the temporaries (checkpoint copies, half-written files) that killed runs left under `roots`."""
    for root in roots:
        for path in remove_stale_temps(root):
            console.print(f"removed {path}, left behind by a run that was stopped")


def folder_signature(folder: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and modification times of a folder's files: cheap change detection."""
    return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.iterdir() if p.is_file())


def path_signature(path: Path) -> dict[str, Any]:
    """Where a file or folder is and `folder_signature` of it (a file: its own name, size and time)."""
    path = Path(path)
    stat = path.stat()
    files = folder_signature(path) if path.is_dir() else [(path.name, stat.st_size, int(stat.st_mtime))]
    return {"path": str(path.resolve()), "files": files}



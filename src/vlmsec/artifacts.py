"""File-level helpers for every stage that leaves files behind: atomic writes, writable-folder
checks, content hashes, sealed JSON, file locks, and the removal of temporaries that killed
processes left.

Temporaries are named `.NAME.<pid>-<host>-<random>.tmp` beside their target, so a later run
can tell them from a user's files and from the temporaries of a process still at work
(`remove_stale_temps`): it removes those of this host whose process is gone, and those of
other hosts or containers (whose processes it cannot see) once untouched for `STALE_AFTER`,
far longer than any write takes.
They get the mode a plain `open()` / `mkdir()` would give (0666 / 0777 less the umask), not
mkstemp's 0600, so a run folder shared with a group stays readable by it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlmsec.errors import VlmsecError
from vlmsec.progress import console

# Files above this size are checked by size only when read back: a full sha256 of a 28 GB
# checkpoint would cost minutes at every run (it is always hashed when written).
FULL_HASH_LIMIT = 2 * 1024**3
SEAL = "sha256"
STALE_AFTER = 24 * 3600  # seconds
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]{8}\.tmp$")


class CorruptFile(Exception):
    """A cached file that cannot be read or no longer matches its recorded content hash."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")


def _temp_path(path: str | Path) -> Path:
    """A fresh hidden name beside `path` that names this process and host (see the module docstring)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{_HOST}-{secrets.token_hex(4)}.tmp")


def make_temp_dir(path: str | Path) -> Path:
    """Create a temporary folder beside `path` (mode 0777 less the umask)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    tmp.mkdir(mode=0o777)
    return tmp


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    mode = os.fstat(fd).st_mode & 0o777  # 0666 less the umask, as open() gives
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)  # some writers (safetensors) recreate the file as 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path: str | Path, what: str) -> None:
    """Create folder `path` (and its parents) and a file in it, or raise VlmsecError naming `what`.

    A run writes its folder and cache only after stages that may train for hours; checked
    up front, a read-only or mistyped folder fails in a second. `what` names the option.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".vlmsec-write-check.", dir=path):
            pass
    except OSError as exc:
        raise VlmsecError(f"{what} {path}: cannot write there: {exc.strerror or exc}") from None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half of it."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short hex digest of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_sealed(path: str | Path, obj: dict[str, Any]) -> None:
    """Write `obj` atomically with a sha256 of its content, so `read_json_sealed` notices any changed byte."""
    write_json_atomic(path, {**obj, SEAL: stable_hash(obj, length=64)})


def read_json_sealed(path: Path) -> dict[str, Any]:
    """The object `write_json_sealed` wrote (without its seal); CorruptFile if it is unreadable or altered."""
    try:
        sealed = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFile(path, f"unreadable ({err})") from None
    if not isinstance(sealed, dict) or SEAL not in sealed:
        raise CorruptFile(path, "no content hash (damaged, or written by an older vlmsec)")
    obj = {k: v for k, v in sealed.items() if k != SEAL}
    if stable_hash(obj, length=64) != sealed[SEAL]:
        raise CorruptFile(path, "content does not match its recorded hash")
    return obj


@contextmanager
def file_lock(target: Path, waiting: str = "") -> Iterator[None]:
    """Hold the exclusive lock of `target` (the file `<target>.lock` beside it) while the block runs.

    Processes and threads that lock the same target take turns; `waiting`, if given, is printed
    when the lock is busy, so a user sees why a run stands still. The holder removes the file
    on release, so no lock files pile up; a waiter that then holds a removed file locks anew.
    """
    lock = target.with_name(f"{target.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = lock.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                console.print(waiting)
                waiting = ""
            fcntl.flock(handle, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        handle.close()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        handle.close()  # releases the lock


def _alive(pid: int) -> bool:
    """Whether process `pid` of this host exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _last_touched(entry: Path) -> float:
    """When `entry` (a file, or a folder and the files in it) last changed."""
    times = [entry.lstat().st_mtime]
    if entry.is_dir() and not entry.is_symlink():
        times += [child.lstat().st_mtime for child in entry.iterdir()]
    return max(times)


def _stale(entry: Path) -> bool:
    """Whether `entry` is one of our temporaries whose writer is gone (see the module docstring)."""
    match = _TEMP.match(entry.name)
    if match is None:
        return False
    if match["host"] == _HOST and not _alive(int(match["pid"])):
        return True
    try:
        return time.time() - _last_touched(entry) > STALE_AFTER
    except FileNotFoundError:  # removed meanwhile
        return False


def remove_stale_temps(root: Path, depth: int = 3) -> list[Path]:
    """Remove the temporaries that stopped processes left under `root` (down to `depth` levels:
    a run folder's checkpoints/ and generations/, a cache's base/, features/ and attacks/<name>/);
    return what was removed. Anything else is left alone."""
    removed: list[Path] = []
    if depth == 0 or not root.is_dir():
        return removed
    for entry in list(root.iterdir()):
        is_dir = entry.is_dir() and not entry.is_symlink()
        if _stale(entry):
            if is_dir:
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            removed.append(entry)
        elif is_dir:
            removed += remove_stale_temps(entry, depth - 1)
    return removed

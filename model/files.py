"""Atomic file writes, shared by checkpoints and simulation state."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file)`` on a temporary file beside `path`, fsync it, rename it over `path`.

    A crash or error mid-write leaves the previous file as it was, and a reader never sees a
    half-written one. Not tempfile.mkstemp: it creates mode 0600, which would make the file
    unreadable to other users (a server running as another user); os.open with 0666 applies
    the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(folder: Path) -> None:
    """Make the rename itself durable (POSIX); not possible, nor needed, on Windows."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


IN_FLIGHT_SECONDS = 600.0  # a temporary file younger than this may be another process's write


def remove_interrupted_writes(folder: Path, min_age_seconds: float = IN_FLIGHT_SECONDS) -> int:
    """Delete the temporary files (``.<name>.<hex>.tmp``, as `atomic_write` names them) that an
    interrupted write (a kill, a full disk) left in `folder`; returns how many.

    For start-up. Only files older than `min_age_seconds` go: another process may be writing
    into the same folder (a backend replica sharing MODEL_DIR, the ranks of a sharded pool
    job sharing the image cache), and no write of ours takes minutes.
    """
    removed = 0
    now = time.time()
    try:
        leftovers = [
            p for p in Path(folder).glob(".*.tmp") if p.is_file() and now - p.stat().st_mtime >= min_age_seconds
        ]
    except OSError:
        return 0
    for path in leftovers:
        try:
            path.unlink()
            removed += 1
        except OSError as error:
            log.warning("could not remove the leftover temporary file %s: %s", path, error)
    if removed:
        log.info("removed %d temporary file(s) left by interrupted writes in %s", removed, folder)
    return removed

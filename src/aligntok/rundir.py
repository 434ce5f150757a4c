"""Run directories: one writer at a time, and nothing left behind by a command that was refused.

`run_lock(out)` holds an exclusive lock on `out/.lock` (an `fcntl.flock`, which the kernel releases when
the process dies however it dies) while a command writes into `out`. The file names the holder (pid and
host), so a second process on the same directory is refused with one line saying who holds it. A lock file
left by a dead process holds no flock: the next command takes it over and says so. A command that fails
before writing anything into a directory it created removes that directory again.

Under torchrun only rank 0 locks: the ranks of one job are one writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from aligntok import distributed

LOCK_NAME = ".lock"


class RunDirectoryBusy(ValueError):
    """Another live process writes to the run directory."""


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _prepare(out: Path) -> bool:
    """Create `out` (and its parents); True when this call created it. One line on an unusable path."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a directory; choose another --out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the run directory {out} ({e.strerror}); choose another --out") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"the run directory {out} is not writable; choose another --out")
    return created


@contextlib.contextmanager
def run_lock(out: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of run directory `out` (created if missing) for the block; yields `out`."""
    out = Path(out)
    if not distributed.world().is_main:
        yield out
        return
    created = _prepare(out)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(path))
            raise RunDirectoryBusy(
                f"{out} is in use by another aligntok process ({holder}); wait for it to finish or choose "
                "another --out"
            ) from None
        previous = _read_holder(path)
        if previous:  # a lock file nobody holds: its writer died without removing it
            who = _describe(previous)
            distributed.print0(f"taking over the lock of {out} left by {who}, which is no longer running")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        try:
            yield out
        except BaseException:
            if created and {p.name for p in out.iterdir()} <= {LOCK_NAME}:
                shutil.rmtree(out, ignore_errors=True)  # refused before it wrote anything: leave no trace
                created = False
            raise
        finally:
            if out.exists():
                path.unlink(missing_ok=True)  # removed while still held: no window for a second writer
    finally:
        os.close(fd)

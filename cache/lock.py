"""One writer per store: an exclusive lock file beside the store, naming the process that holds it.

The lock lives beside the store (`<store>.lock`), not inside it: `overwrite` deletes the store
directory, and the writer refuses to create a store in a directory that holds anything else.
A lock left by a process that died (SIGKILL, power loss) on this host is taken over with a warning, by
exactly one of the processes that find it (flock serialises the takeover, see `_acquire`); one from another
host cannot be checked and is refused with the command to remove it.
Remote stores (URLs with "://") are not locked: object stores have no exclusive create that works
everywhere, so there the user must run one writer per store (per rank) themselves.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

logger = logging.getLogger(__name__)


class StoreLockedError(RuntimeError):
    """Another writer holds the store's lock."""


def lock_path(store_path: str, rank: int = 0) -> str:
    """The lock file of `store_path` for writer `rank` (ranks of one distributed run write disjoint shards)."""
    base = os.fspath(store_path).rstrip("/")
    return f"{base}.lock" if rank == 0 else f"{base}.rank{rank}.lock"


@contextmanager
def writer_lock(store_path: str, rank: int = 0) -> Iterator[str | None]:
    """Hold the writer lock of `store_path` (yields the lock file, or None for a remote store)."""
    path = os.fspath(store_path)
    if "://" in path:
        logger.info("store %s is remote: no writer lock; run only one writer per store", path)
        yield None
        return
    lock = lock_path(path, rank)
    _acquire(lock, path)
    try:
        yield lock
    finally:
        _release(lock)


def _acquire(lock: str, store: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(lock)), exist_ok=True)
    record = json.dumps({
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    })
    for _ in range(_ATTEMPTS):  # a pass ends early only when the lock file changed under it
        if _create_exclusive(lock, record):
            return
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            continue  # released meanwhile: create it
        try:
            # Takeovers of one lock file run one at a time: whoever holds flock on it checks that it is still
            # the file at the lock's path and still stale, then replaces it. The others, waiting on the same
            # file, then find another file there and look again. The kernel drops flock if its holder dies.
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not _is_at(fd, lock):
                continue  # replaced or released while this process waited
            holder = _parse_holder(_read_all(fd))
            if not _is_stale(holder):
                raise StoreLockedError(
                    f"feature store {store} is being written by another process ({_describe(holder)}; lock file "
                    f"{lock}). Wait for it to finish, or if no writer is running, delete {lock} and run again."
                )
            logger.warning("feature store %s: taking over the stale lock of a dead writer (%s)", store,
                           _describe(holder))
            _replace(lock, record)
            return
        finally:
            os.close(fd)
    raise StoreLockedError(f"feature store {store}: could not take lock file {lock}, which kept changing while "
                           f"{_ATTEMPTS} attempts read it (other writers starting?); run again")


_ATTEMPTS = 10


def _is_at(fd: int, path: str) -> bool:
    """True when the open file `fd` is the file now at `path` (not replaced or removed since it was opened)."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (here.st_dev, here.st_ino)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _replace(lock: str, content: str) -> None:
    """Put a lock file with `content` at `lock` in one step (rename over the old one), never empty or absent."""
    tmp = f"{lock}.{os.getpid()}.takeover.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(content)
    os.replace(tmp, lock)


def _create_exclusive(lock: str, content: str) -> bool:
    """Create `lock` with `content` atomically: write a private file, then hard-link it into place.

    A link fails when the name exists, and the lock is never seen empty (a kill between create and
    write would otherwise leave an empty lock without an owner).
    """
    tmp = f"{lock}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(content)
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _read_holder(lock: str) -> dict:
    try:
        with open(lock, "rb") as f:
            return _parse_holder(f.read())
    except OSError:
        return {}


def _parse_holder(content: bytes) -> dict:
    try:
        holder = json.loads(content.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is one too
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_stale(holder: dict) -> bool:
    """True when the lock's process is known to be gone: a dead pid on this host."""
    pid, host = holder.get("pid"), holder.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return False  # unreadable, or another host's process: cannot tell, so never steal it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def _describe(holder: dict) -> str:
    if not holder:
        return "unreadable lock file"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def _release(lock: str) -> None:
    holder = _read_holder(lock)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        os.unlink(lock)

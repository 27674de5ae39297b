"""One writer per store: an exclusive lock file beside the store, naming the process that holds it.

The lock lives beside the store (`<store>.lock`), not inside it: `overwrite` deletes the store
directory, and the writer refuses to create a store in a directory that holds anything else.
A lock left by a process that died (SIGKILL, power loss) on this host is taken over with a warning;
one from another host cannot be checked and is refused with the command to remove it.
Remote stores (URLs with "://") are not locked: object stores have no exclusive create that works
everywhere, so there the user must run one writer per store (per rank) themselves.
"""

from __future__ import annotations

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
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
    for _ in range(2):  # a second try only after removing a stale lock
        if _create_exclusive(lock, json.dumps(record)):
            return
        holder = _read_holder(lock)
        if not _is_stale(holder):
            raise StoreLockedError(
                f"feature store {store} is being written by another process ({_describe(holder)}; lock file "
                f"{lock}). Wait for it to finish, or if no writer is running, delete {lock} and run again."
            )
        logger.warning("feature store %s: taking over the stale lock of a dead writer (%s)", store, _describe(holder))
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass  # another process removed it first; the exclusive create decides
    raise StoreLockedError(f"feature store {store}: could not take lock file {lock}; another writer took it first")


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
        with open(lock, encoding="utf-8") as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return {"released": True}
    except (OSError, ValueError):
        return {}


def _is_stale(holder: dict) -> bool:
    """True when the lock's process is known to be gone: released meanwhile, or a dead pid on this host."""
    if holder.get("released"):
        return True
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

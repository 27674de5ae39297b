"""Specification of the writer lock (cache/lock.py): a dead writer's lock is taken over by exactly one process."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from cache.lock import StoreLockedError, lock_path, writer_lock


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _take_over(store: str, start, tried, outcomes, probe_seconds: float) -> None:
    """Try the lock when every contender is ready; a winner holds it until every contender has tried.

    The probe of the dead writer's pid takes `probe_seconds` here, as it may on a loaded machine: the time
    between finding the lock stale and taking it over, in which the other contenders act.
    """
    kill = os.kill

    def slow_kill(pid: int, signal: int) -> None:
        time.sleep(probe_seconds)
        kill(pid, signal)

    os.kill = slow_kill  # in this child process only
    start.wait()
    try:
        with writer_lock(store):
            holder = json.loads(Path(lock_path(store)).read_text())
            outcomes.put(("won", os.getpid(), holder["pid"]))
            tried.wait()
    except StoreLockedError as exc:
        outcomes.put(("refused", os.getpid(), str(exc)))
        tried.wait()


def test_exactly_one_of_many_processes_racing_for_a_dead_writers_lock_wins_every_time(tmp_path):
    contenders, rounds = 6, 12
    context = multiprocessing.get_context("fork")
    dead = _dead_pid()
    for race in range(rounds):
        store = str(tmp_path / f"race{race}.zarr")
        Path(lock_path(store)).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "then"}))
        start, tried, outcomes = context.Barrier(contenders), context.Barrier(contenders), context.Queue()
        processes = [context.Process(target=_take_over, args=(store, start, tried, outcomes, 0.002 * (i + race % 3)))
                     for i in range(contenders)]
        for process in processes:
            process.start()
        results = [outcomes.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(timeout=60)
        winners = [r for r in results if r[0] == "won"]
        assert len(winners) == 1, f"race {race}: {len(winners)} processes hold the lock at once: {results}"
        assert winners[0][1] == winners[0][2]  # the lock file names the winner
        refused = [r[2] for r in results if r[0] == "refused"]
        assert all(f"pid {winners[0][1]}" in reason for reason in refused), refused  # refused by the live winner
        assert not Path(lock_path(store)).exists()  # the winner released it
        assert os.listdir(tmp_path) == []  # and left nothing beside the store

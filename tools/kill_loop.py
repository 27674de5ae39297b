"""Fault injection for stage one: SIGKILL `cache-teacher` at random moments, resume, compare with a clean run.

    PYTHONPATH=. .venv/bin/python tools/kill_loop.py --trials 10      (or: make kill-test)

Each trial starts `python -m pipeline.cache_teacher` on the tiny dataset with a tiny random R18 teacher
(as tests/conftest.py builds it) and small shards, kills it with SIGKILL at a moment spread over the run
(odd trials kill the first resume too), checks that `python -m cache verify` accepts what the kill left
(committed rows intact), resumes to the end, and requires `verify --require-complete` to pass and every
stored array to equal an uninterrupted reference run byte for byte (fp16 codec: bitwise).
Prints one line per trial and "kill loop: N trials run, M passing"; exits 1 unless all pass.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclass
class Timeline:
    """Seconds from launch of a clean run: lock taken, store created, first shard committed, process exited."""

    locked: float
    created: float
    first_commit: float
    end: float


def build_fixture(workdir: Path, shard_images: int) -> Path:
    """Tiny data, a tiny random R18 teacher (.pth) and a student config file; returns the config path."""
    import torch

    from pipeline import datasets  # noqa: F401  (registers embedded_tiny_*)
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from pipeline.config import get_distill_cfg
    from pipeline.datasets import embedded_root
    from tools.embedded_data import generate
    from tests.conftest import make_student_cfg, write_tiny_config

    generate(embedded_root("tiny"), "tiny", seed=0)
    teacher_dir = workdir / "teacher"
    teacher_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = write_tiny_config(teacher_dir / "teacher.yaml")
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(get_distill_cfg(str(cfg_file))), save_dir=str(teacher_dir)).save("model_final")
    teacher = {"cfg": str(cfg_file), "weights": str(teacher_dir / "model_final.pth")}
    cfg = make_student_cfg(workdir / "student", teacher, "DISTILL.CACHE.SHARD_IMAGES", shard_images)
    path = workdir / "student.yaml"
    path.write_text(cfg.dump())
    return path


def launch(config: Path, store: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "pipeline.cache_teacher", "--config-file", str(config),
           "DISTILL.CACHE.PATH", str(store), "OUTPUT_DIR", str(store.parent / "out")]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _created(store: Path) -> bool:
    meta = store / "zarr.json"
    try:
        return meta.exists() and '"created"' in meta.read_text()
    except OSError:
        return False


def _locked_by(store: Path, pid: int) -> bool:
    """True once the run with `pid` holds the store's writer lock (cache/lock.py), just before its real work."""
    try:
        return json.loads(Path(f"{store}.lock").read_text()).get("pid") == pid
    except (OSError, ValueError):
        return False


def _committed_any(store: Path) -> bool:
    status = store / "status" / "c"
    return status.is_dir() and any(status.iterdir())


def clean_run(config: Path, store: Path, log: Path) -> Timeline:
    """Run stage one to the end, timing when the store appears and the first shard commits."""
    start = time.monotonic()
    proc = launch(config, store, log)
    locked = created = first = None
    while proc.poll() is None:
        now = time.monotonic() - start
        if locked is None and _locked_by(store, proc.pid):
            locked = now
        if created is None and _created(store):
            created = now
        if first is None and _committed_any(store):
            first = now
        time.sleep(0.01)
    if proc.returncode != 0:
        raise RuntimeError(f"the clean run failed (exit {proc.returncode}); see {log}")
    end = time.monotonic() - start
    return Timeline(locked or end, created or end, first or end, end)


def kill_at(config: Path, store: Path, log: Path, delay: float | None, startup: float) -> str | None:
    """Start a run and SIGKILL it; None when it exited first (with an error text if it failed).

    delay None: kill during start-up, after `startup` seconds; otherwise kill `delay` seconds after the
    run takes the store's lock, so kills land in the working phase however loaded the machine is.
    """
    proc = launch(config, store, log)
    start = time.monotonic()
    if delay is not None:
        while proc.poll() is None and not _locked_by(store, proc.pid):
            time.sleep(0.005)
        start, wait = time.monotonic(), delay
    else:
        wait = startup
    try:
        proc.wait(timeout=max(0.0, wait - (time.monotonic() - start)))
        return None if proc.returncode == 0 else f"exited with {proc.returncode} before the kill"
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return "killed"


def kill_state(store: Path) -> str:
    """Where the kill landed, read from what it left: before creation, mid-shard, between shards or done."""
    import zarr

    if not _created(store):
        return "before the store was created"
    group = zarr.open_group(store=str(store), mode="r")
    status = group["status"][:]
    shard_images = int(group.attrs["shard_images"])
    pending = {row // shard_images for row in range(len(status)) if status[row] == 0}
    if not pending:
        return "after the last commit"
    partial = [s for s in pending if any((store / "features").glob(f"*/c/{s}/*"))]
    return f"mid-shard (shard {partial[0]} half written)" if partial else "between shards"


def verify(store: Path, complete: bool) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "cache", "verify", str(store), "--quiet"] + (["--require-complete"] if complete else [])
    out = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    return out.returncode, (out.stdout + out.stderr).strip()


def differing_arrays(store: Path, reference: Path) -> list[str]:
    """Names of arrays whose bytes differ between two stores (fp16 features compared as raw bits)."""
    import numpy as np
    import zarr

    a, b = zarr.open_group(store=str(store), mode="r"), zarr.open_group(store=str(reference), mode="r")
    names_a = {name for name, _ in a.arrays()} | {f"{g}/{n}" for g, sub in a.groups() for n, _ in sub.arrays()}
    names_b = {name for name, _ in b.arrays()} | {f"{g}/{n}" for g, sub in b.groups() for n, _ in sub.arrays()}
    if names_a != names_b:
        return [f"array names differ: {sorted(names_a ^ names_b)}"]
    diff = []
    for name in sorted(names_a):
        x, y = np.asarray(a[name][:]), np.asarray(b[name][:])
        if x.dtype != y.dtype or x.shape != y.shape or (x.dtype.kind != "U" and x.tobytes() != y.tobytes()) \
                or (x.dtype.kind == "U" and not np.array_equal(x, y)):
            diff.append(name)
    return diff


def trial(index: int, config: Path, reference: Path, timeline: Timeline, rng: random.Random, workdir: Path,
          trials: int) -> tuple[bool, str]:
    store = workdir / f"trial{index}" / "store.zarr"
    store.parent.mkdir(parents=True, exist_ok=True)
    log = store.parent / "log.txt"
    # The first trial kills during start-up; the others at moments spread evenly (with jitter) over the
    # working phase (teacher build, store creation, shard writes), measured from taking the lock.
    writing = timeline.end - timeline.locked
    delay = None if index == 0 else (index - 1 + rng.random()) / max(1, trials - 1) * writing
    outcome = kill_at(config, store, log, delay, 0.5 * timeline.locked)
    if outcome not in (None, "killed"):
        return False, f"the run failed: {outcome}; see {log}"
    when = "during start-up" if delay is None else f"{delay:.2f} s after the lock"
    notes = [f"kill {when}: {kill_state(store) if outcome else 'run finished before the kill'}"]
    if _created(store):
        code, text = verify(store, complete=False)
        if code != 0:
            return False, "; ".join(notes + [f"verify of the killed store failed: {text[-300:]}"])
    if index % 2 == 1 and outcome:  # kill the resume as well, somewhere in its own writing phase
        again = rng.uniform(0, writing)
        if kill_at(config, store, log, again, 0.0) == "killed":
            notes.append(f"resume killed {again:.2f} s after its lock: {kill_state(store)}")
    proc = launch(config, store, log)
    if proc.wait() != 0:
        return False, "; ".join(notes + [f"resume failed (exit {proc.returncode}); see {log}"])
    if "stale lock" in log.read_text(errors="replace"):
        notes.append("stale lock taken over")
    code, text = verify(store, complete=True)
    if code != 0:
        return False, "; ".join(notes + [f"verify --require-complete failed: {text[-300:]}"])
    diff = differing_arrays(store, reference)
    if diff:
        return False, "; ".join(notes + [f"differs from the clean run in {diff}"])
    shutil.rmtree(store.parent)
    return True, "; ".join(notes + ["verify OK, bitwise equal"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-images", type=int, default=2, help="small shards: many commits to land between")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kill_loop_"))
    config = build_fixture(workdir, args.shard_images)
    reference = workdir / "reference" / "store.zarr"
    if reference.parent.exists():
        shutil.rmtree(reference.parent)
    reference.parent.mkdir(parents=True)
    timeline = clean_run(config, reference, reference.parent / "log.txt")
    print(f"clean run: lock taken at {timeline.locked:.2f} s, store created at {timeline.created:.2f} s, first commit {timeline.first_commit:.2f} s, "
          f"done {timeline.end:.2f} s", flush=True)
    rng = random.Random(args.seed)
    passing = 0
    for i in range(args.trials):
        ok, text = trial(i, config, reference, timeline, rng, workdir, args.trials)
        passing += ok
        print(f"trial {i + 1}/{args.trials}: {'PASS' if ok else 'FAIL'}: {text}", flush=True)
    print(f"kill loop: {args.trials} trials run, {passing} passing")
    if not args.workdir and passing == args.trials:
        shutil.rmtree(workdir)
    return 0 if passing == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())

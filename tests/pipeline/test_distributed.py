"""Scale-out on the CPU: both stages under torchrun with 2 processes (gloo), as a user would start them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cache import TeacherFeatureStore, verify_store
from pipeline.stage_one import cache_teacher
from tests.conftest import REPO, crash_stage_one_at_row, make_student_cfg


def torchrun(nproc: int, module: str, cfg, *args: str, threads: int = 1, timeout: int = 420) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node nproc -m module --config-file <cfg dumped>`; fails with its output.

    `threads` is each process's OMP_NUM_THREADS: CPU convolutions round differently with another intra-op
    thread count, so a bitwise comparison needs the reference's count.
    """
    cfg_file = Path(cfg.OUTPUT_DIR).parent / f"{module.rsplit('.', 1)[-1]}.yaml"
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(cfg.dump())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
           str(nproc), "-m", module, "--config-file", str(cfg_file), *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return done


def assert_same_features(path: str, reference: str) -> None:
    """Every image of `reference`, both views, bit for bit in the store at `path`."""
    got, want = TeacherFeatureStore(path), TeacherFeatureStore(reference)
    assert list(got.image_ids) == list(want.image_ids)
    for image_id in want.image_ids:
        assert got.sizes(int(image_id)) == want.sizes(int(image_id))
        for flip in (False, True):
            a, b = got.read(int(image_id), flip=flip), want.read(int(image_id), flip=flip)
            assert all(torch.equal(a[k], b[k]) for k in b), (int(image_id), flip)


def test_two_processes_cache_the_same_store_as_one_each_shard_written_once(tmp_path, tiny_teacher, tiny_store):
    cfg = make_student_cfg(tmp_path, tiny_teacher)
    torchrun(2, "pipeline.cache_teacher", cfg, threads=torch.get_num_threads())  # as tiny_store was built
    path = cfg.DISTILL.CACHE.PATH
    summary = json.loads(Path(f"{path}.summary.json").read_text())
    total = tiny_store["summary"]["images_total"]
    # The ranks' row counts add up to the store exactly: no shard was written by both ranks, none skipped.
    assert summary["processes"] == 2 and summary["images_written"] == total == 16
    assert TeacherFeatureStore(path).attrs["summary"]["processes"] == 2  # rank 0 finalised the store
    logs = {p.name: p.read_text() for p in Path(cfg.OUTPUT_DIR).glob("log.txt*")}
    assert "4 shards to write (8 images) on rank 0 of 2" in logs["log.txt"]
    assert "4 shards to write (8 images) on rank 1 of 2" in logs["log.txt.rank1"]
    assert_same_features(path, tiny_store["path"])
    report = verify_store(path, progress=False)
    assert report.intact and report.complete and report.ok == total


def test_two_processes_resume_a_store_interrupted_by_one(tmp_path, tiny_teacher, tiny_store, monkeypatch):
    cfg = make_student_cfg(tmp_path, tiny_teacher)
    crash_stage_one_at_row(monkeypatch, 9)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(cfg)
    partial = TeacherFeatureStore(cfg.DISTILL.CACHE.PATH).info()
    assert partial.images_done == 8  # shards 0 and 1 committed, shard 2 was in flight
    torchrun(2, "pipeline.cache_teacher", cfg, threads=torch.get_num_threads())
    summary = json.loads(Path(f"{cfg.DISTILL.CACHE.PATH}.summary.json").read_text())
    assert summary["images_written"] == 8  # only shards 2 (rank 0) and 3 (rank 1) were redone
    assert_same_features(cfg.DISTILL.CACHE.PATH, tiny_store["path"])


def test_two_processes_train_a_student_with_ddp_and_log_loss_kd(tmp_path, tiny_teacher, tiny_store):
    # A 96-channel student has 1x1 connectors to the 64-channel teacher: DDP must sync them too (they are
    # used every step, so no find_unused_parameters). 2 images per process.
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"], "SOLVER.MAX_ITER", 2,
                           "SOLVER.IMS_PER_BATCH", 4, "DATALOADER.NUM_WORKERS", 1, fpn_channels=96)
    torchrun(2, "pipeline.train_student", cfg)
    out = Path(cfg.OUTPUT_DIR)
    assert "Rank of current process: 1. World size: 2" in (out / "log.txt.rank1").read_text()
    logged = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    kd = [row["loss_kd"] for row in logged if "loss_kd" in row]
    assert kd and all(v > 0 for v in kd)
    metrics = json.loads((out / "student_metrics.json").read_text())
    assert metrics["iterations"] == 2 and "AP" in metrics["bbox"]

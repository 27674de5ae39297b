"""Stores on object storage: stage one writes to s3://, verify and the CLI check it there, a student trains from it.

The server is real S3 over HTTP on loopback (moto's server mode), the client is s3fs through zarr's
FsspecStore, exactly as against AWS or MinIO; nothing of the client is mocked.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from detectron2.config import CfgNode

from cache import ImageEntry, TeacherFeatureStore, TeacherFeatureWriter, verify_store
from tests.conftest import REPO, make_student_cfg
from tests.cache.test_store import FINGERPRINT, IDS, make_layout, resized_hw_of, synthetic_features

BUCKET = "stores"


@pytest.fixture(scope="module")
def s3() -> dict:
    """A loopback S3 server with one bucket, and the fsspec storage options that reach it."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed: make setup")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed: make setup")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
    import boto3  # moto's own dependency

    boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                 **options["client_kwargs"]).create_bucket(Bucket=BUCKET)
    yield {"options": options, "fs": s3fs.S3FileSystem(**options, skip_instance_cache=True)}
    server.stop()


@pytest.fixture(scope="module")
def s3_store(s3, tiny_teacher, tmp_path_factory) -> dict:
    """The tiny fp16 store written by stage one straight to s3://stores/tiny.zarr, with the write's wall time."""
    from pipeline.stage_one import cache_teacher

    root = tmp_path_factory.mktemp("s3_store")
    cfg = make_student_cfg(root, tiny_teacher, "DISTILL.CACHE.PATH", f"s3://{BUCKET}/tiny.zarr")
    # As a YAML config would give them: a mapping under DISTILL.CACHE.STORAGE_OPTIONS.
    cfg.merge_from_other_cfg(CfgNode({"DISTILL": {"CACHE": {"STORAGE_OPTIONS": s3["options"]}}}))
    start = time.perf_counter()
    summary = cache_teacher(cfg)
    return {"cfg": cfg, "url": cfg.DISTILL.CACHE.PATH, "summary": summary, "seconds": time.perf_counter() - start}


def test_stage_one_writes_to_s3_the_same_features_as_to_a_local_directory(s3, s3_store, tiny_store):
    remote = TeacherFeatureStore(s3_store["url"], s3["options"])
    local = TeacherFeatureStore(tiny_store["path"])
    assert list(remote.image_ids) == list(local.image_ids)
    for image_id in local.image_ids:
        for flip in (False, True):
            a, b = remote.read(int(image_id), flip=flip), local.read(int(image_id), flip=flip)
            assert all(torch.equal(a[k], b[k]) for k in b), (int(image_id), flip)
    info, local_info = remote.info(disk_usage=True), local.info(disk_usage=True)
    assert info.images_done == info.images_total == 16 and info.finalized
    # The same objects, counted through S3 listings instead of a directory walk (zarr.json attributes differ
    # by a few bytes: timestamps and timings).
    assert abs(info.bytes_on_disk - local_info.bytes_on_disk) < 2048
    assert s3["fs"].exists(f"{BUCKET}/tiny.zarr/features/p2/c/0/0/0/0/0")


def test_verify_and_the_cli_check_a_store_by_its_url(s3, s3_store):
    report = verify_store(s3_store["url"], progress=False, storage_options=s3["options"])
    assert report.intact and report.complete and report.ok == 16
    env = {**os.environ, "PYTHONPATH": str(REPO), "CACHE_STORAGE_OPTIONS": json.dumps(s3["options"])}
    verify = subprocess.run([sys.executable, "-m", "cache", "verify", "--quiet", s3_store["url"]], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and "store is intact" in verify.stdout, verify.stdout + verify.stderr
    env.pop("CACHE_STORAGE_OPTIONS")
    info = subprocess.run([sys.executable, "-m", "cache", "info", "--json", "--storage-options", json.dumps(s3["options"]),
                           s3_store["url"]], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["images_done"] == 16


class _Rows(Dataset):
    def __init__(self, store: TeacherFeatureStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict:
        return self.store.read(int(self.store.image_ids[i]), flip=bool(i % 2))


def test_a_reader_opened_before_forking_serves_forked_dataloader_workers(s3, s3_store):
    store = TeacherFeatureStore(s3_store["url"], s3["options"])
    first = store.read(int(store.image_ids[0]))  # the parent's fsspec store and zarr loop exist before the fork
    loader = DataLoader(_Rows(store), batch_size=None, num_workers=2, multiprocessing_context="fork")
    served = list(loader)
    assert len(served) == len(store)
    assert all(torch.equal(served[0][k], first[k]) for k in first)
    for i in (1, 7, 15):
        expected = store.read(int(store.image_ids[i]), flip=bool(i % 2))
        assert all(torch.equal(served[i][k], expected[k]) for k in expected)


def test_a_student_trains_from_the_s3_store_with_a_dataloader_worker(s3, s3_store, tiny_teacher, tmp_path, monkeypatch):
    from detectron2.engine import default_argument_parser
    from pipeline.train_student import main

    monkeypatch.setenv("CACHE_STORAGE_OPTIONS", json.dumps(s3["options"]))  # options from the environment this time
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", s3_store["url"],
                           "SOLVER.MAX_ITER", 3, "DATALOADER.NUM_WORKERS", 1)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(cfg.dump())
    metrics = main(default_argument_parser().parse_args(["--config-file", str(cfg_file)]))
    logged = [json.loads(line) for line in (Path(cfg.OUTPUT_DIR) / "metrics.json").read_text().splitlines()]
    kd = [row["loss_kd"] for row in logged if "loss_kd" in row]
    assert kd and all(v > 0 for v in kd) and max(row["iteration"] for row in logged if "loss_kd" in row) == 2
    assert metrics["store"]["path"] == s3_store["url"] and "AP" in metrics["bbox"]


def test_a_shard_whose_commit_was_lost_on_s3_is_rewritten_and_overwrite_starts_afresh(s3):
    url, options, layout = f"s3://{BUCKET}/synthetic.zarr", s3["options"], make_layout()

    def entries(writer: TeacherFeatureWriter, shard: int) -> list[ImageEntry]:
        ids = [IDS[row] for row in writer.shard_rows(shard)]
        return [ImageEntry(i, (200, 300), resized_hw_of(i), (160, 160), synthetic_features(i, layout)) for i in ids]

    writer = TeacherFeatureWriter.open(url, layout, IDS, "synthetic", FINGERPRINT, storage_options=options)
    assert writer.pending_shards() == [0, 1, 2, 3]
    for shard in writer.pending_shards():
        assert writer.write_shard(shard, entries(writer, shard)) > 0
    writer.finalize()
    s3["fs"].rm(f"{BUCKET}/synthetic.zarr/status/c/1")  # shard 1's commit marker is gone, its features remain
    resumed = TeacherFeatureWriter.open(url, layout, IDS, "synthetic", FINGERPRINT, storage_options=options)
    assert resumed.pending_shards(rank=1, world_size=2) == [1] and resumed.pending_shards(rank=0, world_size=2) == []
    resumed.write_shard(1, entries(resumed, 1))
    report = verify_store(url, progress=False, storage_options=options)
    assert report.intact and report.ok == len(IDS)
    got = TeacherFeatureStore(url, options).read(IDS[2], flip=True)
    expected = synthetic_features(IDS[2], layout)["hflip"]
    assert all(np.array_equal(got[k].numpy(), expected[k].astype(np.float16).astype(np.float32)) for k in expected)

    fresh = TeacherFeatureWriter.open(url, layout, IDS, "synthetic", FINGERPRINT, overwrite=True, storage_options=options)
    assert fresh.pending_shards() == [0, 1, 2, 3]
    assert not s3["fs"].exists(f"{BUCKET}/synthetic.zarr/features/p2/c/0/0/0/0/0")


class _CountingS3Calls:
    """Counts the S3 API calls (list_objects_v2, get_object, head_object, ...) that s3fs makes while active."""

    def __init__(self, monkeypatch) -> None:
        import s3fs

        self.calls: dict[str, int] = {}
        original = s3fs.S3FileSystem._call_s3

        async def counting(fs, method, *args, **kwargs):
            self.calls[method] = self.calls.get(method, 0) + 1
            return await original(fs, method, *args, **kwargs)

        monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)


def _synthetic_s3_store(url: str, n: int, options: dict) -> None:
    layout = make_layout(sizes=(100,))  # a format 3 store: finalisation writes the consolidated row index
    ids = list(range(1000, 1000 + n))
    writer = TeacherFeatureWriter.open(url, layout, ids, "synthetic", FINGERPRINT, storage_options=options)
    for shard in writer.pending_shards():
        writer.write_shard(shard, [ImageEntry(ids[r], (200, 300), resized_hw_of(ids[r]), (160, 160),
                                              synthetic_features(ids[r], layout)) for r in writer.shard_rows(shard)])
    writer.finalize()


def test_opening_and_summarising_a_store_reads_the_same_few_objects_for_4x_the_images_and_lists_nothing(s3, monkeypatch):
    counted = {}
    for n in (8, 32):
        url = f"s3://{BUCKET}/startup{n}.zarr"
        _synthetic_s3_store(url, n, s3["options"])
        counter = _CountingS3Calls(monkeypatch)
        info = TeacherFeatureStore(url, s3["options"]).info()  # what check_store does with the store at start-up
        monkeypatch.undo()
        assert info.images_done == n and info.complete
        counted[n] = counter.calls
    assert "list_objects_v2" not in counted[8] and "list_objects_v2" not in counted[32], counted
    assert counted[8] == counted[32], counted


def test_check_store_on_an_s3_store_lists_nothing(s3, s3_store, monkeypatch):
    from pipeline.stage_two import check_store

    counter = _CountingS3Calls(monkeypatch)
    info = check_store(s3_store["cfg"])
    assert info.images_done == 16 and counter.calls and "list_objects_v2" not in counter.calls, counter.calls


def test_storage_options_for_a_local_path_are_refused_naming_them(tmp_path):
    with pytest.raises(ValueError, match="local path"):
        TeacherFeatureWriter.open(tmp_path / "store.zarr", make_layout(), IDS, "synthetic", FINGERPRINT,
                                  storage_options='{"anon": true}')

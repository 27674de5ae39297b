"""Start-up cost of a store on S3: what stage two's check_store reads before training, for two store sizes.

Writes synthetic finalized stores of N images to a loopback S3 server (moto, as tests/cache/test_s3.py) and
times what check_store does with the store: open it (TeacherFeatureStore) and summarise it (info()), counting
the S3 requests by kind. Flat means: the same requests and about the same time for 16x the images.

    python tools/startup_s3.py --images 256 4096 --repeat 5 --out startup_s3.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache import ImageEntry, StoreLayout, TeacherFeatureStore, TeacherFeatureWriter  # noqa: E402

LEVELS, STRIDES, CHANNELS, MAX_HW = ("p2", "p3", "p4", "p5", "p6"), (4, 8, 16, 32, 64), 4, (64, 64)


def _server() -> tuple[object, dict]:
    from moto.server import ThreadedMotoServer
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
    boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                 **options["client_kwargs"]).create_bucket(Bucket="stores")
    return server, options


def _write_store(url: str, n: int, options: dict) -> None:
    layout = StoreLayout(LEVELS, STRIDES, CHANNELS, "fp16", "mirror", MAX_HW, shard_images=16, tile=64)
    ids = list(range(1, n + 1))
    writer = TeacherFeatureWriter.open(url, layout, ids, "synthetic", {"teacher": "synthetic"}, storage_options=options)
    rng = np.random.default_rng(0)
    for shard in writer.pending_shards():
        entries = []
        for row in writer.shard_rows(shard):
            feats = {lv: rng.standard_normal((CHANNELS, *layout.valid_hw(lv, MAX_HW))).astype(np.float32) for lv in LEVELS}
            entries.append(ImageEntry(ids[row], MAX_HW, MAX_HW, MAX_HW, {"orig": feats}))
        writer.write_shard(shard, entries)
    writer.finalize({})


class _CountingS3:
    """Counts s3fs's S3 API calls (list_objects_v2, get_object, head_object, ...) while active."""

    def __init__(self) -> None:
        import s3fs

        self.calls: Counter = Counter()
        self._cls, self._original = s3fs.S3FileSystem, s3fs.S3FileSystem._call_s3

    def __enter__(self) -> Counter:
        original, calls = self._original, self.calls

        async def counting(fs, method, *args, **kwargs):
            calls[getattr(method, "__name__", str(method))] += 1
            return await original(fs, method, *args, **kwargs)

        self._cls._call_s3 = counting
        return calls

    def __exit__(self, *exc) -> None:
        self._cls._call_s3 = self._original


def _start_up(url: str, options: dict, **info_kwargs) -> dict:
    with _CountingS3() as calls:
        t0 = time.perf_counter()
        store = TeacherFeatureStore(url, options)
        t1 = time.perf_counter()
        store.info(**info_kwargs)
        t2 = time.perf_counter()
    return {"open_s": t1 - t0, "info_s": t2 - t1, "total_s": t2 - t0, "calls": dict(calls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="startup_s3.json")
    args = parser.parse_args()
    server, options = _server()
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    can_skip_listing = "disk_usage" in inspect.signature(TeacherFeatureStore.info).parameters
    variants = {"start-up (check_store)": {}}
    if can_skip_listing:
        variants["info with disk usage (python -m cache info)"] = {"disk_usage": True}
    results = {}
    try:
        for n in args.images:
            url = f"s3://stores/n{n}.zarr"
            t0 = time.perf_counter()
            _write_store(url, n, options)
            objects = len(fs.find(f"stores/n{n}.zarr"))
            results[n] = {"objects": objects, "write_s": round(time.perf_counter() - t0, 1)}
            for name, kwargs in variants.items():
                runs = [_start_up(url, options, **kwargs) for _ in range(args.repeat)]
                results[n][name] = {
                    "median_total_s": round(statistics.median(r["total_s"] for r in runs), 3),
                    "median_open_s": round(statistics.median(r["open_s"] for r in runs), 3),
                    "median_info_s": round(statistics.median(r["info_s"] for r in runs), 3),
                    "requests": runs[-1]["calls"],
                }
            print(json.dumps({n: results[n]}), flush=True)
    finally:
        server.stop()
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

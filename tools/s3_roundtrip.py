"""Time a store's round trip through S3: upload, `verify` from the URL, read every image back.

    .venv/bin/python tools/s3_roundtrip.py output/embedded/teacher_store.zarr [--endpoint http://host:9000]

Without --endpoint it starts moto's S3 server on loopback (in memory: the store must fit in RAM), so the
numbers measure s3fs + zarr's FsspecStore over HTTP on this machine, not a real network. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cache import TeacherFeatureStore, verify_store  # noqa: E402


def _loopback_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="a local store directory")
    parser.add_argument("--endpoint", help="an S3 endpoint URL (default: a loopback moto server)")
    parser.add_argument("--bucket", default="roundtrip")
    args = parser.parse_args()
    import boto3
    import s3fs

    server, endpoint = (None, args.endpoint) if args.endpoint else _loopback_server()
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    if server is not None:
        boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                     **options["client_kwargs"]).create_bucket(Bucket=args.bucket)
    url = f"s3://{args.bucket}/{Path(args.store).name}"
    local = TeacherFeatureStore(args.store)
    mib = local.info(disk_usage=True).bytes_on_disk / 2**20
    timings = {}
    start = time.perf_counter()
    s3fs.S3FileSystem(**options).put(str(Path(args.store)), url, recursive=True)
    timings["upload_s"] = time.perf_counter() - start
    start = time.perf_counter()
    report = verify_store(url, progress=False, storage_options=options)
    timings["verify_s"] = time.perf_counter() - start
    remote = TeacherFeatureStore(url, options)
    same = True
    start = time.perf_counter()
    for image_id in remote.image_ids:
        features = remote.read(int(image_id))
        if image_id == remote.image_ids[0] or image_id == remote.image_ids[-1]:
            expected = local.read(int(image_id))
            same = same and all(torch.equal(features[k], expected[k]) for k in expected)
    timings["read_all_s"] = time.perf_counter() - start
    if server is not None:
        server.stop()
    result = {"store": args.store, "images": len(remote), "mib": round(mib, 1), "intact": report.intact,
              "ok": report.ok, "first_and_last_equal_local": same,
              **{k: round(v, 2) for k, v in timings.items()},
              "upload_mib_per_s": round(mib / timings["upload_s"], 1),
              "read_images_per_s": round(len(remote) / timings["read_all_s"], 1)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

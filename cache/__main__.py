"""Command line: `python -m cache info STORE [--json]` and `python -m cache verify STORE`.

STORE is a directory or a URL (s3://bucket/key.zarr); fsspec storage options for a URL come from
--storage-options or the CACHE_STORAGE_OPTIONS environment variable (a JSON object).

Exit codes: 0 fine; 1 the store is damaged (verify found damaged entries or store problems, or its metadata
cannot be read); 2 the path is not a store, or the storage options are malformed. Never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from cache.format import NotAFeatureStoreError, StoreDamagedError
from cache.storage import STORAGE_OPTIONS_ENV, storage_options_for

if TYPE_CHECKING:
    from cache.reader import StoreInfo


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def _info_table(info: StoreInfo, rpn_outputs: tuple[str, ...]) -> str:
    ratio = f"{info.ratio_vs_fp32:.2f}x smaller" if info.ratio_vs_fp32 else "-"
    rows = [
        ("store", info.path),
        ("dataset", info.dataset),
        ("format", f"version {info.format_version}"),
        ("codec", info.codec + (f", {info.predictor} predictor" if info.predictor != "none" else "")),
        ("flip", info.flip),
        ("sizes", ", ".join(map(str, info.sizes)) + " (short edges)" if info.sizes else "one, in the fingerprint's resize"),
        ("views", f"{len(info.views)}: {', '.join(info.views)}"),
        ("levels", ", ".join(info.levels)),
        ("rpn outputs", f"{', '.join(rpn_outputs)}; {info.rpn_anchors} anchors" if info.rpn_anchors else "not stored"),
        ("images", f"{info.images_done} done, {info.images_failed} unreadable, "
                   f"{info.images_pending} pending, {info.images_total} total"),
        ("on disk", f"{_human_bytes(info.bytes_on_disk)} ({_human_bytes(info.bytes_per_image)} per done image, "
                    f"{_human_bytes(info.bytes_per_view)} per image and view)"),
        *(("  " + name, f"{_human_bytes(b)} per image (feature objects)")
          for name, b in (info.feature_bytes_per_image_by_view or {}).items()),
        ("vs float32", f"{ratio} (raw {_human_bytes(info.raw_fp32_bytes)})"),
        ("fingerprint", info.fingerprint_sha256),
        ("created", info.created or "-"),
        ("finalized", "yes" if info.finalized else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _cmd_info(args: argparse.Namespace) -> int:
    from cache.reader import TeacherFeatureStore

    store = TeacherFeatureStore(args.store, args.storage_options)
    info = store.info(disk_usage=True)
    print(json.dumps(info.to_dict(), indent=2) if args.json else _info_table(info, store.layout.rpn_outputs))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from cache.verify import verify_store

    report = verify_store(args.store, progress=not args.quiet, storage_options=args.storage_options)
    for problem in report.problems:
        print(f"store problem: {problem}")
    for image_id, reason in report.bad:
        print(f"bad image {image_id}: {reason}")
    print(
        f"{report.ok} entries intact, {len(report.bad)} bad, {report.failed} recorded unreadable, "
        f"{report.pending} not written"
    )
    if report.pending:
        print(f"note: {report.pending} images are not written yet; resume the writer to complete the store")
    if not report.intact:
        return 1
    if args.require_complete and not report.complete:
        return 1
    print("store is intact")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cache", description="Inspect and check a teacher feature store.")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--storage-options", metavar="JSON",
                        help=f"fsspec options of a URL store, e.g. '{{\"client_kwargs\": {{\"endpoint_url\": "
                             f"\"http://host:9000\"}}}}' (default: ${STORAGE_OPTIONS_ENV})")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", parents=[remote], help="summary of a store: counts, bytes on disk, compression ratio")
    info.add_argument("store", help="path of the store directory, or its URL")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(run=_cmd_info)
    verify = commands.add_parser("verify", parents=[remote], help="decode every committed entry and check it")
    verify.add_argument("store", help="path of the store directory, or its URL")
    verify.add_argument("--quiet", action="store_true", help="no progress bar")
    verify.add_argument("--require-complete", action="store_true", help="exit 1 when images are not written yet")
    verify.set_defaults(run=_cmd_verify)
    args = parser.parse_args(argv)
    try:
        given = args.storage_options
        args.storage_options = storage_options_for(args.store, given)
    except ValueError as exc:  # $CACHE_STORAGE_OPTIONS names itself in the message
        print(f"error: --storage-options: {exc}" if given else f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except NotAFeatureStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StoreDamagedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # permissions, a lost connection to the object store, ...
        print(f"error: cannot read feature store {args.store}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

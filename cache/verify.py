"""Full integrity check of a store: attributes, array shapes, statuses, and every committed entry decoded.

Checksums catch flipped bits and torn objects; verify also catches what checksums cannot: missing shard
objects (zarr would silently read them as zeros), sizes outside the layout, and non-finite values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from tqdm import tqdm
from zarr.core.sync import sync

from cache.format import (
    CONSOLIDATED_ROWS,
    CONSOLIDATED_SINCE_VERSION,
    ERROR,
    IMAGE_ID,
    ORIG_HW,
    PADDED_HW,
    RESIZED_HW,
    STATUS,
    STATUS_COMMITTED,
    STATUS_PENDING,
    STATUS_UNREADABLE,
    StoreDamagedError,
    StoreEntryError,
    features_array,
    fingerprint_sha256,
    offset_array,
    scale_array,
)
from cache.reader import RowMetadata, TeacherFeatureStore, missing_object_reason, object_key

REQUIRED_ATTRS = (
    "format", "format_version", "levels", "strides", "channels", "codec", "flip", "views", "shard_images",
    "tile", "max_hw", "dataset", "num_images", "fingerprint", "fingerprint_sha256", "created",
)


@dataclass
class VerifyReport:
    """Outcome of verify_store. `bad` lists (image_id, reason) for committed entries that cannot be served."""

    path: str
    ok: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    pending: int = 0  # status 0: not written yet (not damage; resume the writer)
    failed: int = 0  # status 2: unreadable at write time, recorded with a reason
    problems: list[str] = field(default_factory=list)  # store-level problems (attributes, array shapes)

    @property
    def intact(self) -> bool:
        return not self.bad and not self.problems

    @property
    def complete(self) -> bool:
        return self.pending == 0


def verify_store(path: str, progress: bool = True, storage_options: Mapping | str | None = None) -> VerifyReport:
    """Read every committed entry (all views) and check it; NotAFeatureStoreError if `path` is no store.

    `path` may be a URL (s3://bucket/key.zarr) with fsspec `storage_options` (default $CACHE_STORAGE_OPTIONS).
    """
    store = TeacherFeatureStore(path, storage_options)
    report = VerifyReport(path=store.path)
    report.problems += _attribute_problems(store)
    report.problems += _array_problems(store)
    # Check the shards' own arrays, the truth the consolidated index (what readers open) must equal.
    consolidated, per_shard = store._load_consolidated_rows(), store._load_per_shard_rows()
    report.problems += _consolidated_problems(store, consolidated, per_shard)
    store._set_rows(per_shard)

    status = store._status
    bad: dict[int, str] = {}
    for row, reason in store._damaged.items():
        bad[row] = reason
    for row in np.flatnonzero(~np.isin(status, (STATUS_PENDING, STATUS_COMMITTED, STATUS_UNREADABLE))):
        bad.setdefault(int(row), f"invalid status value {int(status[row])}")
    for row in np.flatnonzero(status == STATUS_UNREADABLE):
        if int(row) not in bad and store._error_reason(int(row)) == "no reason recorded":
            bad[int(row)] = "status 2 (unreadable) without a recorded reason"
    report.pending = sum(1 for row in np.flatnonzero(status == STATUS_PENDING) if int(row) not in bad)
    report.failed = int(np.count_nonzero(status == STATUS_UNREADABLE))
    report.problems += _failed_attr_problems(store, status)

    layout = store.layout
    shard_size = layout.shard_images
    num_views = layout.num_views
    committed = np.flatnonzero(status == STATUS_COMMITTED)
    with tqdm(total=len(committed), desc=f"verify {store.path}", unit="img", disable=not progress) as bar:
        for shard in np.unique(committed // shard_size):
            in_shard = committed[committed // shard_size == shard]
            rows = [int(r) for r in in_shard if int(r) not in bad]
            for row in rows:
                problem = _size_problem(store, row)
                if problem:
                    bad[row] = problem
            for row, reason in _missing_shard_objects(store, int(shard), rows).items():
                bad.setdefault(row, reason)
            requests = [(row, v) for row in rows if row not in bad for v in range(num_views)]
            for (row, view), result in zip(requests, store._read_rows(requests)):
                if row in bad:
                    continue
                if isinstance(result, StoreEntryError):
                    bad[row] = f"view {layout.view_name(view)}: {result.reason}"
                    continue
                problem = _content_problem(store, row, view, result)
                if problem:
                    bad[row] = f"view {layout.view_name(view)}: {problem}"
            bar.update(len(in_shard))

    report.bad = sorted((int(store.image_ids[row]), reason) for row, reason in bad.items())
    bad_committed = sum(1 for row in bad if status[row] == STATUS_COMMITTED)
    report.ok = len(committed) - bad_committed
    return report


def _attribute_problems(store: TeacherFeatureStore) -> list[str]:
    attrs, layout = store.attrs, store.layout
    problems = [f"attribute {key!r} is missing" for key in REQUIRED_ATTRS if key not in attrs]
    implied = layout.to_attrs()["views"]
    if attrs.get("views") is not None and list(attrs["views"]) != implied:
        problems.append(f"attribute views is {attrs['views']}, but flip={layout.flip!r} and sizes {list(layout.sizes)} "
                        f"imply {implied}")
    if layout.sizes and attrs.get("format_version") != 3:
        problems.append(f"attribute sizes is recorded, but format_version is {attrs.get('format_version')}, expected 3")
    if attrs.get("num_images") != len(store.image_ids):
        problems.append(f"attribute num_images is {attrs.get('num_images')}, but image_id has {len(store.image_ids)} rows")
    if "fingerprint_sha256" in attrs and attrs["fingerprint_sha256"] != fingerprint_sha256(store.fingerprint):
        problems.append("attribute fingerprint_sha256 does not match the sha256 of the fingerprint attribute")
    if len(np.unique(store.image_ids)) != len(store.image_ids):
        problems.append("image_id holds repeated ids")
    return problems


def _array_problems(store: TeacherFeatureStore) -> list[str]:
    layout, n = store.layout, len(store.image_ids)
    views, channels = layout.num_views, layout.channels
    per_size = (n, layout.num_sizes, 2) if layout.sizes else (n, 2)
    expected: dict[str, tuple[tuple[int, ...], str]] = {
        IMAGE_ID: ((n,), "int64"),
        STATUS: ((n,), "uint8"),
        ERROR: ((n,), ""),
        ORIG_HW: ((n, 2), "int32"),
        **{name: (per_size, "int32") for name in (RESIZED_HW, PADDED_HW)},
    }
    for level in layout.stored_keys:
        channels = layout.channels_of(level)
        expected[features_array(level)] = ((n, views, channels, *layout.level_shape(level)), store.codec.dtype.name)
        if store.codec.quantised:
            expected[scale_array(level)] = ((n, views, channels), "float32")
            expected[offset_array(level)] = ((n, views, channels), "float32")
    problems = []
    for name, (shape, dtype) in expected.items():
        try:
            arr = store._array(name)
        except StoreDamagedError:
            problems.append(f"array {name} is missing or its metadata is unreadable")
            continue
        if tuple(arr.shape) != shape:
            problems.append(f"array {name} has shape {tuple(arr.shape)}, expected {shape}")
        if dtype and np.dtype(arr.dtype).name != dtype:
            problems.append(f"array {name} has dtype {arr.dtype}, expected {dtype}")
    return problems


def _consolidated_problems(store: TeacherFeatureStore, consolidated: RowMetadata | None,
                           per_shard: RowMetadata) -> list[str]:
    """A consolidated row index that readers would open but that differs from the shards' arrays."""
    if consolidated is None:
        if store.attrs.get("format_version", 0) >= CONSOLIDATED_SINCE_VERSION and "failed" in store.attrs \
                and sync(store._group.store.exists(f"{CONSOLIDATED_ROWS}/zarr.json")):
            return [f"array {CONSOLIDATED_ROWS} is unreadable (readers open the store shard by shard); finalize "
                    "the writer again (rerun make cache-teacher) to rewrite it"]
        return []
    fields = ("image_ids", "status", "orig_hw", "resized_hw", "padded_hw")
    differing = np.zeros(len(per_shard.image_ids), bool)
    for name in fields:
        a, b = getattr(consolidated, name), getattr(per_shard, name)
        differing |= (a != b).reshape(len(differing), -1).any(axis=1)
    differing[list(per_shard.damaged)] = False  # damaged per-shard rows are reported as bad entries
    if not differing.any():
        return []
    row = int(np.flatnonzero(differing)[0])
    return [f"array {CONSOLIDATED_ROWS} differs from the per-shard arrays in {int(differing.sum())} rows (first: row "
            f"{row}, image {int(per_shard.image_ids[row])}); readers would serve its values: finalize the writer "
            "again (rerun make cache-teacher) to rewrite it"]


def _failed_attr_problems(store: TeacherFeatureStore, status: np.ndarray) -> list[str]:
    if "failed" not in store.attrs:
        return []  # not finalised yet
    recorded = set(store.attrs["failed"])
    actual = {str(int(store.image_ids[r])) for r in np.flatnonzero(status == STATUS_UNREADABLE)}
    if recorded != actual:
        return [
            f"attribute failed lists {len(recorded)} images but {len(actual)} rows have status 2 "
            f"(only in attribute: {sorted(recorded - actual)[:10]}, only in status: {sorted(actual - recorded)[:10]}); "
            "finalize the writer again"
        ]
    return []


def _size_problem(store: TeacherFeatureStore, row: int) -> str | None:
    max_h, max_w = store.layout.max_hw
    for z, resized in enumerate(store._resized_hw[row]):
        rh, rw = (int(v) for v in resized)
        if not (0 < rh <= max_h and 0 < rw <= max_w):
            at = f" at short edge {store.layout.sizes[z]}" if store.layout.sizes else ""
            return f"recorded resized size {(rh, rw)}{at} is outside 1..max_hw {store.layout.max_hw}"
    if min(int(v) for v in store._orig_hw[row]) <= 0:
        return f"recorded original size {tuple(int(v) for v in store._orig_hw[row])} is not positive"
    return None


def _missing_shard_objects(store: TeacherFeatureStore, shard: int, rows: list[int]) -> dict[int, str]:
    """Committed rows whose feature shard, scale or offset object is absent (zarr would read it as zeros)."""
    if not rows:
        return {}
    store._ensure_open()
    group_store, layout = store._group.store, store.layout
    kinds = (("shard", features_array),) + ((("scale", scale_array), ("offset", offset_array))
                                             if store.codec.quantised else ())
    for level in layout.stored_keys:
        for view in range(layout.num_views):
            view_name = layout.view_name(view)
            for kind, name in kinds:
                coords = (shard, view, 0, 0, 0) if kind == "shard" else (shard, 0, 0)
                key = object_key(store._array(name(level)), coords)
                if not sync(group_store.exists(key)):
                    return {row: missing_object_reason(level, view_name, kind, key) for row in rows}
    return {}


def _content_problem(store: TeacherFeatureStore, row: int, view: int, decoded: dict[str, np.ndarray]) -> str | None:
    layout = store.layout
    resized = store._resized_hw[row, layout.view_size_index(view)]
    for level, x in decoded.items():
        expected = (layout.channels_of(level), *layout.valid_hw(level, resized))
        if x.shape != expected:
            return f"{level} has shape {x.shape}, expected {expected} from the recorded resized size"
        if not np.isfinite(x).all():
            return f"{level} holds non-finite values"
    return None

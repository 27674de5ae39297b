"""Writing a store: create or resume it, write whole shards under the commit protocol, finalise.

A shard's rows are written by one writer at a time, features first and the `status` chunk last, so a
kill at any moment loses at most the shard in flight; `pending_shards` lists what a resume must redo.
See docs/store-format.md ("Commit protocol").
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.sync import sync

from cache.format import (
    CONSOLIDATED_CHUNK_KEY,
    CONSOLIDATED_COLUMNS,
    CONSOLIDATED_ROWS,
    CONSOLIDATED_SINCE_VERSION,
    ERROR,
    FORMAT_NAME,
    FORMAT_VERSION,
    READABLE_FORMAT_VERSIONS,
    IMAGE_ID,
    ORIG_HW,
    PADDED_HW,
    RESIZED_HW,
    SIZE_ARRAYS,
    STATUS,
    STATUS_COMMITTED,
    STATUS_UNREADABLE,
    NotAFeatureStoreError,
    StoreLayout,
    StoreMismatchError,
    diff_fingerprints,
    diff_layout_attrs,
    features_array,
    fingerprint_sha256,
    json_normalised,
    offset_array,
    scale_array,
)
from cache.reader import load_rows_tolerant, object_key, read_group_attrs
from cache.storage import delete_url_tree, is_url, storage_options_for, url_is_occupied, zarr_store

FEATURE_DIMS = ("image", "view", "channel", "y", "x")


@dataclass
class ImageEntry:
    """One image's teacher output, ready to store.

    features: view -> level -> float32 (C, h_l, w_l), already cropped to the level's valid size
    (ceil(resized / stride)); None when the image could not be read, with the reason in `error`.
    """

    image_id: int
    orig_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    padded_hw: tuple[int, int]
    features: dict[str, dict[str, np.ndarray]] | None
    error: str | None = None


class TeacherFeatureWriter:
    """Writes whole shards of a store; build it with `open`, which creates, resumes or rebuilds."""

    def __init__(self, path: str, group: zarr.Group, layout: StoreLayout, image_ids: np.ndarray) -> None:
        self.path = path
        self.layout = layout
        self.image_ids = image_ids
        self.num_images = len(image_ids)
        self.num_shards = -(-self.num_images // layout.shard_images)
        self._group = group
        self._codec = layout.feature_codec
        self._arrays: dict[str, zarr.Array] = {}
        self._consolidated_dropped = False

    # ----------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        path: str,
        layout: StoreLayout,
        image_ids: Sequence[int],
        dataset: str,
        fingerprint: dict,
        overwrite: bool = False,
        storage_options: Mapping | str | None = None,
    ) -> "TeacherFeatureWriter":
        """Create the store, or resume it if it was built with exactly these settings.

        An existing store whose layout, dataset, image ids or fingerprint differ raises
        StoreMismatchError naming every differing field; overwrite=True deletes and recreates it.
        A store whose creation was interrupted (no `created` attribute) is recreated silently.
        Create the store from one process before other ranks open it.
        `path` may be a URL (s3://bucket/key.zarr) with fsspec `storage_options`.
        """
        path = os.fspath(path)
        options = storage_options_for(path, storage_options)
        ids = _as_image_ids(image_ids)
        fingerprint = json_normalised(fingerprint)
        attrs = read_group_attrs(path, options)
        if attrs is None and _is_occupied(path, options):
            raise NotAFeatureStoreError(
                f"{path} exists and is not a teacher feature store; refusing to write there. "
                "Remove it yourself or choose another path."
            )
        if attrs is not None:
            if attrs.get("format") != FORMAT_NAME:
                raise NotAFeatureStoreError(
                    f"{path} is a zarr group but not a {FORMAT_NAME} (format attribute "
                    f"{attrs.get('format')!r}); refusing to touch it. Choose another path."
                )
            if overwrite or "created" not in attrs:
                _delete_store(path, options)
            else:
                group = zarr.open_group(store=zarr_store(path, options), mode="r+", zarr_format=3)
                differences = _differences(attrs, group, layout, ids, dataset, fingerprint)
                if differences:
                    raise StoreMismatchError(path, differences)
                return cls(path, group, layout, ids)
        return cls(path, _create_store(path, layout, ids, dataset, fingerprint, options), layout, ids)

    # ----------------------------------------------------------------- shards

    def shard_rows(self, shard: int) -> range:
        """Rows of shard `shard`: shard_images consecutive rows (the last shard may be shorter)."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range: store {self.path} has {self.num_shards} shards")
        size = self.layout.shard_images
        return range(shard * size, min((shard + 1) * size, self.num_images))

    def pending_shards(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Shards with any uncommitted (status 0) row, restricted to those with shard % world_size == rank."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        status, damaged = load_rows_tolerant(self._array(STATUS), STATUS)
        status[list(damaged)] = 0  # a torn status chunk means "not committed": rewrite its shard
        padded = np.ones(self.num_shards * self.layout.shard_images, dtype=status.dtype)
        padded[: self.num_images] = status
        pending = np.flatnonzero((padded.reshape(self.num_shards, -1) == 0).any(axis=1))
        return [int(s) for s in pending if s % world_size == rank]

    def write_shard(self, shard: int, entries: list[ImageEntry]) -> int:
        """Write all rows of `shard` and commit them; returns the bytes of feature shard objects written.

        `entries` are in row order, one per row. Order of writes: un-commit (if rewriting), features
        per level and view, scales/offsets, sizes and errors, and last the `status` chunk.
        """
        rows = self.shard_rows(shard)
        self._validate(shard, rows, entries)
        try:
            return self._write_shard(shard, rows, entries)
        except OSError as exc:  # e.g. ENOSPC: name the store and the way out; the store stays consistent
            raise OSError(
                exc.errno,
                f"writing shard {shard} (rows {rows.start}..{rows.stop - 1}) of feature store {self.path} failed: "
                f"{exc}. Committed shards are kept and this one is not marked done; fix the cause (e.g. free "
                "disk space) and run the same command again to resume",
            ) from exc

    def _write_shard(self, shard: int, rows: range, entries: list[ImageEntry]) -> int:
        if not self._consolidated_dropped:  # readers fall back to the per-shard arrays until finalize
            self._drop_consolidated_rows()
        # Un-commit (status chunk first), then clear every object of this shard: zarr would otherwise
        # merge new rows into stale or torn objects and fail on their checksums.
        self._delete_shard_objects(shard)
        status = self._array(STATUS)
        written = 0
        for level in self.layout.stored_keys:
            written += self._write_level(shard, rows, level, entries)
        for name in SIZE_ARRAYS:
            values = np.array([getattr(e, name) or (0, 0) for e in entries], dtype=np.int32).reshape(len(rows), 2)
            self._array(name)[rows.start : rows.stop] = values
        errors = np.array([(e.error or "") if e.features is None else "" for e in entries], dtype=str)
        self._array(ERROR)[rows.start : rows.stop] = errors
        marks = [STATUS_COMMITTED if e.features is not None else STATUS_UNREADABLE for e in entries]
        status[rows.start : rows.stop] = np.array(marks, dtype=np.uint8)  # the commit marker
        return written

    def finalize(self, summary: dict | None = None) -> None:
        """Record `failed` ({image_id: reason} of unreadable rows) and the caller's `summary` attributes."""
        status, damaged = load_rows_tolerant(self._array(STATUS), STATUS)
        if damaged:
            raise RuntimeError(
                f"feature store {self.path}: status chunks of {len(damaged)} rows are damaged; "
                "run pending_shards() and write those shards again before finalising"
            )
        pending = int(np.count_nonzero(status == 0))
        if pending:
            warnings.warn(
                f"finalising feature store {self.path} with {pending} images not yet written; "
                "the reader refuses them until the writer is resumed",
                stacklevel=2,
            )
        failed_rows = np.flatnonzero(status == STATUS_UNREADABLE)
        errors = self._array(ERROR)[:] if len(failed_rows) else []
        failed = {str(int(self.image_ids[r])): str(errors[r]) for r in failed_rows}
        try:
            summary_json = json_normalised(summary or {})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"summary must be JSON-serialisable (no NaN): {exc}") from None
        self._write_consolidated_rows(status)
        self._group.attrs.update({"failed": failed, "summary": summary_json})

    # ----------------------------------------------------------------- internals

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    def _validate(self, shard: int, rows: range, entries: list[ImageEntry]) -> None:
        if len(entries) != len(rows):
            raise ValueError(
                f"shard {shard} has {len(rows)} rows ({rows.start}..{rows.stop - 1}) but got {len(entries)} entries"
            )
        layout = self.layout
        for row, entry in zip(rows, entries):
            expected_id = int(self.image_ids[row])
            where = f"shard {shard}, row {row}, image {entry.image_id}"
            if int(entry.image_id) != expected_id:
                raise ValueError(f"{where}: row {row} holds image {expected_id}; pass entries in row order")
            if entry.features is None:
                if not entry.error:
                    raise ValueError(f"{where}: an entry without features needs the reason in `error`")
                continue
            if entry.error:
                raise ValueError(f"{where}: has features and an error ({entry.error!r}); give one or the other")
            resized = tuple(int(v) for v in entry.resized_hw)
            if min(resized) <= 0 or resized[0] > layout.max_hw[0] or resized[1] > layout.max_hw[1]:
                raise ValueError(
                    f"{where}: resized size {resized} is not within 1..max_hw {layout.max_hw}; "
                    "build the store with a larger max_hw"
                )
            if sorted(entry.features) != sorted(layout.views):
                raise ValueError(
                    f"{where}: has views {sorted(entry.features)}, but flip={layout.flip!r} stores exactly "
                    f"{list(layout.views)}"
                )
            for view, per_level in entry.features.items():
                if sorted(per_level) != sorted(layout.stored_keys):
                    raise ValueError(f"{where}, view {view}: has levels {sorted(per_level)}, expected {list(layout.stored_keys)}")
                for level, x in per_level.items():
                    expected = (layout.channels_of(level), *layout.valid_hw(level, resized))
                    if not isinstance(x, np.ndarray):
                        raise TypeError(
                            f"{where}, {view}/{level}: features must be numpy arrays, got {type(x).__name__} "
                            "(convert tensors with .float().cpu().numpy())"
                        )
                    if x.shape != expected or not np.issubdtype(x.dtype, np.floating):
                        raise ValueError(
                            f"{where}, {view}/{level}: expected float (C, h, w) = {expected} cropped to "
                            f"ceil(resized {resized} / stride {layout.stride(level)}), got {x.dtype} {x.shape}"
                        )

    def _drop_consolidated_rows(self) -> None:
        """Delete the consolidated row index (chunk first), before this writer changes any shard."""
        store = self._group.store
        for key in (CONSOLIDATED_CHUNK_KEY, f"{CONSOLIDATED_ROWS}/zarr.json"):
            sync(store.delete(key))
        self._consolidated_dropped = True

    def _write_consolidated_rows(self, status: np.ndarray) -> None:
        """Write every row's id, status and sizes as one object, so a reader opens the store with one read.

        Only in stores of this format version (older code would not drop it before writing a shard), and
        only when every per-shard size chunk is intact (damage stays visible to readers and verify).
        """
        if self._group.attrs.get("format_version", 0) < CONSOLIDATED_SINCE_VERSION:
            return
        sizes = {}
        for name in SIZE_ARRAYS:
            sizes[name], damaged = load_rows_tolerant(self._array(name), name)
            if damaged:
                warnings.warn(f"feature store {self.path}: {name} chunks of {len(damaged)} rows are damaged; no "
                              "consolidated row index written (readers open the store shard by shard)", stacklevel=3)
                return
        table = np.column_stack([self.image_ids, status, *(sizes[name] for name in SIZE_ARRAYS)]).astype(np.int64)
        array = self._group.create_array(
            CONSOLIDATED_ROWS, shape=table.shape, dtype="int64", chunks=table.shape, fill_value=-1, overwrite=True,
            compressors=[BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"), Crc32cCodec()],
            dimension_names=("image", "column"), attributes={"columns": list(CONSOLIDATED_COLUMNS)},
        )
        array[:] = table
        self._consolidated_dropped = False  # a later write_shard must drop it again

    def _delete_shard_objects(self, shard: int) -> None:
        """Remove every stored object of `shard` except its image ids, the status chunk first."""
        keys = [object_key(self._array(STATUS), (shard,))]
        for level in self.layout.stored_keys:
            features = self._array(features_array(level))
            keys += [object_key(features, (shard, v, 0, 0, 0)) for v in range(len(self.layout.views))]
            if self._codec.quantised:
                keys += [object_key(self._array(name(level)), (shard, 0, 0)) for name in (scale_array, offset_array)]
        keys += [object_key(self._array(name), (shard, 0)) for name in SIZE_ARRAYS]
        keys.append(object_key(self._array(ERROR), (shard,)))
        store = self._group.store
        for key in keys:
            sync(store.delete(key))

    def _write_level(self, shard: int, rows: range, level: str, entries: list[ImageEntry]) -> int:
        """Encode and write one level of a shard, one zarr write per view over the rows' bounding box."""
        layout, codec = self.layout, self._codec
        tile_h, tile_w = layout.tile_hw(level)
        sizes = [layout.valid_hw(level, e.resized_hw) if e.features is not None else (0, 0) for e in entries]
        box_h = _round_up(max(h for h, _ in sizes), tile_h)
        box_w = _round_up(max(w for _, w in sizes), tile_w)
        features = self._array(features_array(level))
        n, channels = len(rows), layout.channels_of(level)
        step_scale = layout.step_scale(level)
        scale = np.zeros((n, len(layout.views), channels), np.float32)
        offset = np.zeros_like(scale)
        written = 0
        for v, view in enumerate(layout.views):
            if box_h == 0 or box_w == 0:
                continue  # every row unreadable: nothing to store
            block = np.zeros((n, channels, box_h, box_w), dtype=codec.dtype)
            for i, entry in enumerate(entries):
                if entry.features is None:
                    continue
                h, w = sizes[i]
                x = np.asarray(entry.features[view][level], dtype=np.float32)
                try:
                    params = codec.encode_into(x, block[i, :, :h, :w], step_scale)
                except ValueError as exc:
                    raise ValueError(f"image {entry.image_id}, {view}/{level}: {exc}") from None
                if params is not None:
                    scale[i, v], offset[i, v] = params.scale, params.offset
            # Zarr stores no object for a shard of fill values (all-zero codes: constant or zero maps); write
            # its tiles anyway, so that an absent object of a committed shard always means a lost one.
            target = features if block.any() else _writing_empty_chunks(features)
            target[rows.start : rows.stop, v, :, :box_h, :box_w] = block
            del block
            written += _stored_size(self._group.store, object_key(features, (shard, v, 0, 0, 0)))
        if codec.quantised:  # an offset chunk of zeros (maps whose minimum is 0) is stored too, for the same reason
            _writing_empty_chunks(self._array(scale_array(level)))[rows.start : rows.stop] = scale
            _writing_empty_chunks(self._array(offset_array(level)))[rows.start : rows.stop] = offset
        return written


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _writing_empty_chunks(array: zarr.Array) -> zarr.Array:
    """`array` with zarr's write_empty_chunks on: chunks of fill values are stored rather than skipped."""
    return array.with_config({"write_empty_chunks": True})


def _stored_size(store: Any, key: str) -> int:
    try:
        return int(sync(store.getsize(key)))
    except FileNotFoundError:
        return 0  # every inner chunk was empty: zarr stored no object


def _as_image_ids(image_ids: Sequence[int]) -> np.ndarray:
    ids = np.asarray(image_ids)
    if ids.ndim != 1 or len(ids) == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"image_ids must be a non-empty 1-D sequence of integers, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        raise ValueError(f"image_ids must be unique; repeated: {unique[counts > 1][:10].tolist()}")
    return ids


def _is_occupied(path: str, options: dict) -> bool:
    """Something (a file, a non-empty directory, objects under the URL's prefix) is at `path`."""
    if is_url(path):
        return url_is_occupied(path, options)
    return os.path.exists(path) and (not os.path.isdir(path) or bool(os.listdir(path)))


def _delete_store(path: str, options: dict | None = None) -> None:
    if is_url(path):
        delete_url_tree(path, options)
        return
    shutil.rmtree(path)


def _create_store(path: str, layout: StoreLayout, ids: np.ndarray, dataset: str, fingerprint: dict,
                  options: dict | None = None) -> zarr.Group:
    """Create group and arrays; the full attributes (with `created`) are written last to mark success."""
    group = zarr.open_group(
        store=zarr_store(path, options), mode="w", attributes={"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    )
    codec = layout.feature_codec
    n, rows, views, channels = len(ids), layout.shard_images, len(layout.views), layout.channels
    checksum = [Crc32cCodec()]
    for level in layout.stored_keys:
        channels = layout.channels_of(level)
        h, w = layout.level_shape(level)
        tile_h, tile_w = layout.tile_hw(level)
        group.create_array(
            features_array(level),
            shape=(n, views, channels, h, w),
            dtype=codec.dtype,
            chunks=(1, 1, channels, tile_h, tile_w),
            shards=(rows, 1, channels, h, w),
            filters=codec.zarr_filters(),
            serializer=BytesCodec(),
            compressors=codec.zarr_compressors(),
            fill_value=0,
            dimension_names=FEATURE_DIMS,
        )
        if codec.quantised:
            for name in (scale_array(level), offset_array(level)):
                group.create_array(
                    name, shape=(n, views, channels), dtype="float32", chunks=(rows, views, channels),
                    compressors=checksum, fill_value=0, dimension_names=FEATURE_DIMS[:3],
                )
    group.create_array(IMAGE_ID, shape=(n,), dtype="int64", chunks=(rows,), compressors=checksum, fill_value=0)
    for name in (ORIG_HW, RESIZED_HW, PADDED_HW):
        group.create_array(name, shape=(n, 2), dtype="int32", chunks=(rows, 2), compressors=checksum, fill_value=0)
    group.create_array(ERROR, shape=(n,), dtype=str, chunks=(rows,), compressors=checksum, fill_value="")
    group.create_array(STATUS, shape=(n,), dtype="uint8", chunks=(rows,), compressors=checksum, fill_value=0)
    group[IMAGE_ID][:] = ids  # the row plan, known up front; a resume compares it
    group.attrs.update(
        {
            **layout.to_attrs(),
            "dataset": dataset,
            "num_images": n,
            "fingerprint": fingerprint,
            "fingerprint_sha256": fingerprint_sha256(fingerprint),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    return group


def _differences(
    attrs: dict, group: zarr.Group, layout: StoreLayout, ids: np.ndarray, dataset: str, fingerprint: dict
) -> list[str]:
    """Every field in which the existing store differs from the requested one."""
    lines = []
    if attrs.get("format_version") not in READABLE_FORMAT_VERSIONS:
        lines.append(f"format_version: store has {attrs.get('format_version')}, expected {FORMAT_VERSION}")
    lines += diff_layout_attrs(layout.to_attrs(), attrs)
    if attrs.get("dataset") != dataset:
        lines.append(f"dataset: store has {attrs.get('dataset')!r}, expected {dataset!r}")
    lines += [f"fingerprint.{line}" for line in diff_fingerprints(fingerprint, attrs.get("fingerprint", {}))]
    stored_ids = np.asarray(group[IMAGE_ID][:])
    if len(stored_ids) != len(ids):
        lines.append(f"image_ids: store has {len(stored_ids)} images, expected {len(ids)}")
    elif not np.array_equal(stored_ids, ids):
        row = int(np.flatnonzero(stored_ids != ids)[0])
        count = int(np.count_nonzero(stored_ids != ids))
        lines.append(
            f"image_ids: {count} rows differ, first at row {row}: store has {int(stored_ids[row])}, "
            f"expected {int(ids[row])}"
        )
    return lines


class BackgroundShardWriter:
    """Writes shards on one background thread so the teacher's inference overlaps compression and I/O.

    At most `max_pending` submitted shards wait in the queue (bounding memory); `submit` blocks beyond
    that. The first error in the thread is re-raised by the next `submit` and by `close`.
    """

    _STOP = object()

    def __init__(self, writer: TeacherFeatureWriter, max_pending: int = 2) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.writer = writer
        self.bytes_written = 0
        self.shards_written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="feature-shard-writer", daemon=True)
        self._thread.start()

    def submit(self, shard: int, entries: list[ImageEntry]) -> None:
        """Queue a shard for writing (blocks while `max_pending` shards are waiting)."""
        if self._closed:
            raise RuntimeError("BackgroundShardWriter is closed; create a new one to write more shards")
        if self._error is not None:
            raise self._error
        self._queue.put((shard, entries))

    def close(self) -> None:
        """Wait for queued shards to be written; re-raise the first error of the thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(self._STOP)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "BackgroundShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            try:  # an exception is already propagating: finish, but do not mask it
                self.close()
            except BaseException:
                pass

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if self._error is not None:
                continue  # drain so that submit never blocks forever after a failure
            shard, entries = item
            try:
                self.bytes_written += self.writer.write_shard(shard, entries)
                self.shards_written += 1
            except BaseException as exc:  # noqa: BLE001 - handed to the submitting thread
                self._error = exc

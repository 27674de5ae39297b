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
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.sync import sync

from cache.format import (
    CONSOLIDATED_CHUNK_KEY,
    CONSOLIDATED_ROWS,
    CONSOLIDATED_SINCE_VERSION,
    consolidated_columns,
    ERROR,
    FORMAT_NAME,
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
    A view is a (short edge, flip view) pair such as (800, "hflip"), or the flip view name alone
    ("orig", "hflip") in a layout of one size. resized_hw and padded_hw are {short edge: (h, w)} with
    several sizes, or one (h, w) for a layout of one size.
    """

    image_id: int
    orig_hw: tuple[int, int]
    resized_hw: tuple[int, int] | dict[int, tuple[int, int]]
    padded_hw: tuple[int, int] | dict[int, tuple[int, int]]
    features: dict[Any, dict[str, np.ndarray]] | None
    error: str | None = None

    def hw_per_size(self, name: str, layout: StoreLayout) -> np.ndarray:
        """resized_hw or padded_hw as int32 (Z, 2), one row per size of the layout (zeros when unreadable)."""
        value = getattr(self, name)
        if self.features is None:  # unreadable: no sizes
            return np.zeros((layout.num_sizes, 2), np.int32)
        if isinstance(value, Mapping):
            if not layout.sizes and len(value) == 1:  # a format 2 store: one size, not recorded in the layout
                return np.array([tuple(v) for v in value.values()], np.int32).reshape(1, 2)
            if sorted(int(k) for k in value) != list(layout.sizes):
                raise ValueError(f"image {self.image_id}: {name} has sizes {sorted(value)}, the store holds "
                                 f"{list(layout.sizes)}")
            return np.array([tuple(value[s]) for s in layout.sizes], np.int32).reshape(-1, 2)
        if layout.num_sizes != 1:
            raise ValueError(f"image {self.image_id}: {name} is one (h, w), but the store holds short edges "
                             f"{list(layout.sizes)}; give {{short edge: (h, w)}}")
        return np.array([tuple(value or (0, 0))], np.int32).reshape(1, 2)

    def view_features(self, layout: StoreLayout) -> list[dict[str, np.ndarray]]:
        """The features of every view of the layout, in view-axis order; ValueError naming the views otherwise."""
        given = {}
        for key, per_level in (self.features or {}).items():
            size, flip = (None, key) if isinstance(key, str) else (key[0], key[1])
            try:
                given[layout.view_index(flip, size)] = per_level
            except (KeyError, ValueError):
                given[-1] = per_level  # reported below with the expected views
        if sorted(given) != list(range(layout.num_views)):
            raise ValueError(
                f"image {self.image_id}: has views {sorted(map(str, self.features or {}))}, but the store "
                f"(flip={layout.flip!r}, sizes {list(layout.sizes)}) stores exactly {[str(v) for v in layout.views]}"
            )
        return [given[v] for v in range(layout.num_views)]


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
                layout = _resumed_layout(attrs, layout)
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
        """Shards with any row not committed, restricted to those with shard % world_size == rank.

        Rows recorded unreadable (status 2) count as not committed: every rerun retries them, so an image
        fixed on disk, or an I/O error that has passed, is written by the next `make cache-teacher`.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        status, damaged = load_rows_tolerant(self._array(STATUS), STATUS)
        status[list(damaged)] = 0  # a torn status chunk means "not committed": rewrite its shard
        padded = np.ones(self.num_shards * self.layout.shard_images, dtype=status.dtype)
        padded[: self.num_images] = status
        pending = np.flatnonzero((padded.reshape(self.num_shards, -1) != STATUS_COMMITTED).any(axis=1))
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
        self._array(ORIG_HW)[rows.start : rows.stop] = np.array(
            [e.orig_hw or (0, 0) for e in entries], dtype=np.int32).reshape(len(rows), 2)
        for name in (RESIZED_HW, PADDED_HW):
            values = np.stack([e.hw_per_size(name, self.layout) for e in entries])  # (n, Z, 2)
            array = self._array(name)
            array[rows.start : rows.stop] = values.reshape((len(rows),) + tuple(array.shape[1:]))
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
            try:
                resized_per_size = entry.hw_per_size(RESIZED_HW, layout)
                entry.hw_per_size(PADDED_HW, layout)
                views = entry.view_features(layout)
            except ValueError as exc:
                raise ValueError(f"{where}: {str(exc).split(': ', 1)[1]}") from None
            for resized in resized_per_size:
                resized = tuple(int(v) for v in resized)
                if min(resized) <= 0 or resized[0] > layout.max_hw[0] or resized[1] > layout.max_hw[1]:
                    raise ValueError(
                        f"{where}: resized size {resized} is not within 1..max_hw {layout.max_hw}; "
                        "build the store with a larger max_hw"
                    )
            for v, per_level in enumerate(views):
                view = layout.view_name(v)
                resized = tuple(int(x) for x in resized_per_size[layout.view_size_index(v)])
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
        n = len(self.image_ids)
        table = np.column_stack([self.image_ids, status, *(sizes[name].reshape(n, -1) for name in SIZE_ARRAYS)])
        table = table.astype(np.int64)  # per size: (N, Z, 2) sizes become 2Z columns, as consolidated_columns names
        array = self._group.create_array(
            CONSOLIDATED_ROWS, shape=table.shape, dtype="int64", chunks=table.shape, fill_value=-1, overwrite=True,
            compressors=[BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"), Crc32cCodec()],
            dimension_names=("image", "column"), attributes={"columns": list(consolidated_columns(self.layout.sizes))},
        )
        array[:] = table
        self._consolidated_dropped = False  # a later write_shard must drop it again

    def _delete_shard_objects(self, shard: int) -> None:
        """Remove every stored object of `shard` except its image ids, the status chunk first."""
        keys = [object_key(self._array(STATUS), (shard,))]
        for level in self.layout.stored_keys:
            features = self._array(features_array(level))
            keys += [object_key(features, (shard, v, 0, 0, 0)) for v in range(self.layout.num_views)]
            if self._codec.quantised:
                keys += [object_key(self._array(name(level)), (shard, 0, 0)) for name in (scale_array, offset_array)]
        keys += [object_key(self._array(name), (shard,) + (0,) * (self._array(name).ndim - 1)) for name in SIZE_ARRAYS]
        keys.append(object_key(self._array(ERROR), (shard,)))
        store = self._group.store
        for key in keys:
            sync(store.delete(key))

    def _write_level(self, shard: int, rows: range, level: str, entries: list[ImageEntry]) -> int:
        """Encode and write one level of a shard, one zarr write per view over the rows' bounding box at its size."""
        layout, codec = self.layout, self._codec
        tile_h, tile_w = layout.tile_hw(level)
        resized = [e.hw_per_size(RESIZED_HW, layout) if e.features is not None else None for e in entries]
        views = [e.view_features(layout) if e.features is not None else None for e in entries]
        features = self._array(features_array(level))
        n, channels = len(rows), layout.channels_of(level)
        step_scale = layout.step_scale(level)
        scale = np.zeros((n, layout.num_views, channels), np.float32)
        offset = np.zeros_like(scale)
        written = 0
        for v in range(layout.num_views):
            z = layout.view_size_index(v)
            sizes = [layout.valid_hw(level, r[z]) if r is not None else (0, 0) for r in resized]
            box_h = _round_up(max(h for h, _ in sizes), tile_h)
            box_w = _round_up(max(w for _, w in sizes), tile_w)
            if box_h == 0 or box_w == 0:
                continue  # every row unreadable: nothing to store
            block = np.zeros((n, channels, box_h, box_w), dtype=codec.dtype)
            for i, entry in enumerate(entries):
                if views[i] is None:
                    continue
                h, w = sizes[i]
                x = np.asarray(views[i][v][level], dtype=np.float32)
                try:
                    params = codec.encode_into(x, block[i, :, :h, :w], step_scale)
                except ValueError as exc:
                    raise ValueError(f"image {entry.image_id}, {layout.view_name(v)}/{level}: {exc}") from None
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
        store=zarr_store(path, options), mode="w",
        attributes={"format": FORMAT_NAME, "format_version": layout.format_version},
    )
    codec = layout.feature_codec
    n, rows, views, channels = len(ids), layout.shard_images, layout.num_views, layout.channels
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
    group.create_array(ORIG_HW, shape=(n, 2), dtype="int32", chunks=(rows, 2), compressors=checksum, fill_value=0)
    # One (h, w) per size (format 3: (N, Z, 2)); format 2 has one size and (N, 2).
    per_size = (layout.num_sizes, 2) if layout.sizes else (2,)
    for name in (RESIZED_HW, PADDED_HW):
        group.create_array(name, shape=(n, *per_size), dtype="int32", chunks=(rows, *per_size), compressors=checksum,
                           fill_value=0)
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


def _resumed_layout(attrs: dict, layout: StoreLayout) -> StoreLayout:
    """The layout a resume writes: the requested one, or for a format 1-2 store (one size, not recorded in its
    layout) and a one-size request, that request without its size. The fingerprint's resize rule names the size,
    so a store of another size is still refused, by its fingerprint."""
    if attrs.get("format_version") in (1, 2) and len(layout.sizes) == 1 and "sizes" not in attrs:
        return replace(layout, sizes=())
    return layout


def _differences(
    attrs: dict, group: zarr.Group, layout: StoreLayout, ids: np.ndarray, dataset: str, fingerprint: dict
) -> list[str]:
    """Every field in which the existing store differs from the requested one."""
    lines = []
    if attrs.get("format_version") not in READABLE_FORMAT_VERSIONS:
        lines.append(f"format_version: store has {attrs.get('format_version')}, expected {layout.format_version}")
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

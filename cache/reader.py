"""Reading a store: one image's features per call, safe to use from forked DataLoader workers.

Per-image metadata (ids, sizes, status) is loaded once when the store is opened and travels with the
object into workers; zarr arrays are (re)opened lazily in each process, because zarr 3 runs its I/O on
an asyncio loop thread that does not survive a fork.
"""

from __future__ import annotations

import asyncio
import json
import operator
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import zarr
from zarr.core.sync import sync

from cache.codecs import QuantParams
from cache.format import (
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
    STATUS_PENDING,
    STATUS_UNREADABLE,
    RPN_DELTAS,
    NotAFeatureStoreError,
    StoreDamagedError,
    StoreEntryError,
    StoreLayout,
    StoreMismatchError,
    diff_fingerprints,
    features_array,
    fingerprint_sha256,
    offset_array,
    rpn_key,
    scale_array,
)
from cache.storage import is_url, read_url_text, storage_options_for, url_bytes, zarr_store

if TYPE_CHECKING:
    import torch

    from cache.stored_map import StoredMap


def read_group_attrs(path: str, storage_options: dict | None = None) -> dict | None:
    """Attributes of the zarr group at `path` (a directory or a URL), read from its zarr.json; None when there is none.

    A zarr.json that is not a v3 group gives {} (no `format`), which callers treat as "not a store".
    """
    if is_url(path):
        text = read_url_text(f"{os.fspath(path).rstrip('/')}/zarr.json", storage_options)
        if text is None:
            return None
        try:
            meta = json.loads(text)
        except ValueError:
            return {}
        return _group_attributes(meta)
    meta_path = os.path.join(os.fspath(path), "zarr.json")
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return _group_attributes(meta)


def _group_attributes(meta: Any) -> dict:
    if not isinstance(meta, dict) or meta.get("node_type") != "group" or meta.get("zarr_format") != 3:
        return {}
    attrs = meta.get("attributes", {})
    return attrs if isinstance(attrs, dict) else {}


def check_store_attrs(path: str, attrs: dict | None) -> None:
    """Raise NotAFeatureStoreError unless `attrs` belong to a fully created store of this format version."""
    if attrs is None:
        raise NotAFeatureStoreError(f"{path} is not a teacher feature store: no zarr.json there")
    if attrs.get("format") != FORMAT_NAME:
        raise NotAFeatureStoreError(
            f"{path} is not a teacher feature store: its format attribute is {attrs.get('format')!r}, "
            f"expected {FORMAT_NAME!r}"
        )
    if attrs.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise NotAFeatureStoreError(
            f"{path} has store format version {attrs.get('format_version')!r}; this code reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}. Rebuild the store or use matching code."
        )
    if "created" not in attrs:
        raise NotAFeatureStoreError(
            f"{path}: store creation was interrupted (no `created` attribute); run the writer again, "
            "it recreates the store"
        )


class TeacherFeatureStore:
    """Read-only access to a teacher feature store, one image at a time.

    `image_id in store` is True when the image has features to serve (status 1, side data intact).
    The status snapshot is taken at open; call `refresh()` to see shards committed since.
    """

    def __init__(self, path: str, storage_options: Mapping | str | None = None) -> None:
        self.path = os.fspath(path)
        # fsspec options of a URL store (credentials, endpoint); they travel with the object into workers.
        self.storage_options = storage_options_for(self.path, storage_options)
        attrs = read_group_attrs(self.path, self.storage_options)
        check_store_attrs(self.path, attrs)
        self.attrs: dict = attrs
        try:
            self.layout = StoreLayout.from_attrs(attrs)
        except (ValueError, TypeError) as exc:
            raise StoreDamagedError(f"feature store {self.path}: its layout attributes are damaged ({exc}); "
                                    "rebuild the store") from None
        self.codec = self.layout.feature_codec
        self.fingerprint: dict = attrs.get("fingerprint", {})
        self.dataset: str = attrs.get("dataset", "")
        self._pid: int | None = None
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._set_rows(self._load_rows())

    # ----------------------------------------------------------------- metadata

    def refresh(self) -> None:
        """Reload attributes, statuses and sizes (a writer may have committed shards since opening)."""
        self.attrs = read_group_attrs(self.path, self.storage_options) or self.attrs
        self._set_rows(self._load_rows())

    def _set_rows(self, rows: RowMetadata) -> None:
        self.image_ids: np.ndarray = rows.image_ids
        self._row_of = {int(image_id): row for row, image_id in enumerate(self.image_ids.tolist())}
        self._status, self._orig_hw, self._resized_hw, self._padded_hw = rows.status, rows.orig_hw, rows.resized_hw, rows.padded_hw
        self._damaged = rows.damaged
        self.rows_source = rows.source

    def _load_rows(self) -> RowMetadata:
        """The per-image metadata: from the consolidated row index when there is a valid one, else shard by shard."""
        return self._load_consolidated_rows() or self._load_per_shard_rows()

    def _load_consolidated_rows(self) -> RowMetadata | None:
        """The consolidated row index (1 object), or None when there is none or it cannot be trusted.

        Finalisation writes it and the first shard write after that drops it, so it is present only while it
        equals the per-shard arrays. Absent, unreadable (checksum) or the wrong shape: the per-shard arrays
        serve, which is always correct, only slower to open (verify reports a damaged index).
        """
        if not isinstance(self.attrs.get("format_version"), int) or self.attrs["format_version"] < CONSOLIDATED_SINCE_VERSION:
            return None
        self._ensure_open()
        try:
            table = np.asarray(self._group[CONSOLIDATED_ROWS][:])
        except Exception:  # noqa: BLE001 - absent (KeyError), or damaged metadata or chunk
            return None
        columns = consolidated_columns(self.layout.sizes)
        if table.shape != (self.attrs.get("num_images"), len(columns)) or (table == -1).any():
            return None  # -1 is the fill value: the chunk was dropped after its metadata was read
        n, z = len(table), max(1, len(self.layout.sizes))
        return RowMetadata(table[:, 0].copy(), table[:, 1].astype(np.uint8), table[:, 2:4].copy(),
                           table[:, 4:4 + 2 * z].reshape(n, z, 2).copy(), table[:, 4 + 2 * z:].reshape(n, z, 2).copy(),
                           {}, CONSOLIDATED_ROWS)

    def _load_per_shard_rows(self) -> RowMetadata:
        """The per-image arrays, N/S chunks each; a row whose chunk fails its checksum is listed as damaged."""
        ids, damaged_ids = self._load_side_array(IMAGE_ID)
        if damaged_ids:
            raise StoreDamagedError(
                f"feature store {self.path}: the image_id array is damaged ({next(iter(damaged_ids.values()))}); "
                "rows cannot be matched to images. Rebuild the store."
            )
        damaged: dict[int, str] = {}
        loaded = {}
        for name in (STATUS, ORIG_HW, RESIZED_HW, PADDED_HW):
            loaded[name], bad = self._load_side_array(name)
            for row, reason in bad.items():
                damaged.setdefault(row, reason)
        # resized_hw, padded_hw: (N, Z, 2), one (h, w) per stored size; format 1-2 stores hold one, as (N, 2).
        return RowMetadata(ids.astype(np.int64), loaded[STATUS].astype(np.uint8), loaded[ORIG_HW].astype(np.int64),
                           *(loaded[n].astype(np.int64).reshape(len(ids), -1, 2) for n in (RESIZED_HW, PADDED_HW)),
                           damaged, "per-shard arrays")

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        try:
            row = self._row_of.get(operator.index(image_id))  # ints, numpy ints, 0-d integer tensors
        except TypeError:
            return False
        return row is not None and self._status[row] == STATUS_COMMITTED and row not in self._damaged

    def row(self, image_id: int) -> int:
        """Row of `image_id`; KeyError (StoreEntryError) when the store has no such image."""
        try:
            return self._row_of[int(image_id)]
        except KeyError:
            raise StoreEntryError.for_entry(
                int(image_id), self.path, f"not in this store (dataset {self.dataset!r}, {len(self)} images)"
            ) from None

    def sizes(self, image_id: int, size: int | None = None) -> dict[str, Any]:
        """Recorded sizes of an image: orig_hw, and resized_hw / padded_hw at short edge `size`.

        size: one of `layout.sizes`; None for a store of one size. KeyError naming the stored sizes otherwise.
        """
        row = self.row(image_id)
        z = self._size_index(size)
        return {
            "orig_hw": tuple(int(v) for v in self._orig_hw[row]),
            "resized_hw": tuple(int(v) for v in self._resized_hw[row, z]),
            "padded_hw": tuple(int(v) for v in self._padded_hw[row, z]),
            "status": int(self._status[row]),
        }

    def status(self, image_id: int) -> int:
        """The row's status: 0 not written, 1 committed, 2 unreadable at write time."""
        return int(self._status[self.row(image_id)])

    def _size_index(self, size: int | None) -> int:
        try:
            return self.layout.size_index(size)
        except KeyError as exc:
            raise KeyError(f"feature store {self.path}: {exc.args[0]}") from None

    def check_fingerprint(self, expected: dict) -> None:
        """Raise StoreMismatchError listing every fingerprint field in which the store differs."""
        lines = [f"fingerprint.{line}" for line in diff_fingerprints(expected, self.fingerprint)]
        if lines:
            raise StoreMismatchError(
                self.path, lines,
                hint="The teacher features were computed with other settings; rebuild the store for this config.",
            )

    # ----------------------------------------------------------------- features

    def read(self, image_id: int, flip: bool = False, keys: Sequence[str] | None = None,
             size: int | None = None) -> dict[str, torch.Tensor]:
        """Features of one image: level -> float32 (C, h_l, w_l), cropped to the valid size.

        flip=True serves the horizontally flipped image: the stored "hflip" view, or the mirrored
        "orig" view when the store was written with flip="mirror". keys: the stored maps to read
        (default all, `layout.stored_keys`); a student reads only what its method compares.
        size: the short edge the image was resized to, one of `layout.sizes` (None: the store's only size).
        """
        import torch  # here, not at module level: the CLI and verify need no torch (saves ~2 s per start)

        row = self.row(image_id)
        view = self._view_index(flip, size)
        result = self._read_rows([(row, view)], self._checked_keys(keys))[0]
        if isinstance(result, BaseException):
            raise result
        tensors = {level: torch.from_numpy(x) for level, x in result.items()}
        if flip and self.layout.flip == "mirror":
            tensors = {level: torch.flip(t, dims=[-1]) for level, t in tensors.items()}
            for level in self.layout.levels if self.layout.rpn_anchors else ():
                deltas = tensors.get(rpn_key(RPN_DELTAS, level))
                if deltas is not None:
                    deltas[0::4] *= -1  # a mirrored box moves the other way: dx changes sign
        return tensors

    def read_codes(self, image_id: int, flip: bool = False, keys: Sequence[str] | None = None,
                   size: int | None = None) -> dict[str, StoredMap]:
        """What `read` returns, still in the stored representation: key -> StoredMap (cache/stored_map.py).

        A DataLoader worker sends these (1 byte per value for the int8 codecs, 2 for fp16) instead of float32,
        and `StoredMap.decode(device)` finishes the decode where the student runs, bitwise equal to `read`.
        Damage and lost objects raise StoreEntryError exactly as `read` does.
        """
        import torch

        from cache.stored_map import StoredMap

        row = self.row(image_id)
        view = self._view_index(flip, size)
        keys = self._checked_keys(keys)
        out = self._read_rows([(row, view)], keys, decode=False)[0]
        if isinstance(out, BaseException):
            raise out
        mirror = flip and self.layout.flip == "mirror"
        maps = {}
        for key in keys:
            stored = out[features_array(key)]
            scale = offset = None
            if self.codec.quantised:
                scale = torch.from_numpy(np.ascontiguousarray(out[scale_array(key)], dtype=np.float32))
                offset = torch.from_numpy(np.ascontiguousarray(out[offset_array(key)], dtype=np.float32))
            dx_rows = slice(0, None, 4) if mirror and key.startswith(RPN_DELTAS + "/") else None
            maps[key] = StoredMap(torch.from_numpy(np.ascontiguousarray(stored)), scale, offset, self.codec.predictor,
                                  mirror, dx_rows)
        return maps

    def _checked_keys(self, keys: Sequence[str] | None) -> tuple[str, ...]:
        if keys is None:
            return self.layout.stored_keys
        unknown = [k for k in keys if k not in self.layout.stored_keys]
        if unknown:
            raise KeyError(f"feature store {self.path} holds no {unknown}; it stores {list(self.layout.stored_keys)}")
        return tuple(keys)

    def _view_index(self, flip: bool, size: int | None = None) -> int:
        """Index on the view axis of (size, flip): the size's "hflip" view when flips are stored, else its "orig"."""
        z = self._size_index(size)
        if not flip:
            return self.layout.view_index("orig", self.layout.sizes[z] if self.layout.sizes else None)
        if self.layout.flip == "none":
            raise ValueError(
                f"feature store {self.path} was written with flip='none' and holds no features of flipped "
                "images; turn off horizontal-flip augmentation for distilled images, or rebuild the store "
                "with flip='mirror' or 'stored'"
            )
        flip_view = "hflip" if self.layout.flip == "stored" else "orig"
        return self.layout.view_index(flip_view, self.layout.sizes[z] if self.layout.sizes else None)

    def entry_problem(self, image_id: int) -> str | None:
        """Why `image_id` cannot be served, from the metadata alone (None when it can)."""
        return self._entry_problem(self.row(image_id))

    def _entry_problem(self, row: int) -> str | None:
        """Why a row cannot be served, from the metadata alone; None when it can."""
        if row in self._damaged:
            return self._damaged[row]
        status = int(self._status[row])
        if status == STATUS_COMMITTED:
            return None
        if status == STATUS_PENDING:
            return "not written yet (status 0: its shard was never committed); resume the feature writer"
        if status == STATUS_UNREADABLE:
            return f"the image was unreadable when the store was written: {self._error_reason(row)}"
        return f"invalid status value {status} (expected 0, 1 or 2); the store is damaged"

    def _error_reason(self, row: int) -> str:
        try:
            return str(self._array(ERROR)[row]) or "no reason recorded"
        except Exception as exc:  # noqa: BLE001 - a damaged reason must not hide the status
            return f"reason unavailable ({type(exc).__name__}: {exc})"

    def _read_rows(self, requests: list[tuple[int, int]], keys: tuple[str, ...] | None = None,
                   decode: bool = True) -> list[dict[str, np.ndarray] | StoreEntryError]:
        """Decoded features (of `keys`, default all) for each (row, view), or the StoreEntryError explaining why not.

        All arrays of all requests are fetched in one batch of concurrent zarr reads. decode=False returns the
        checked stored arrays by array name instead (features/<key>, and scale/<key>, offset/<key> if quantised).
        """
        out: list[Any] = [None] * len(requests)
        fetch = []
        for i, (row, view) in enumerate(requests):
            problem = self._entry_problem(row)
            if problem is not None:
                out[i] = StoreEntryError.for_entry(int(self.image_ids[row]), self.path, problem)
            else:
                fetch.append(i)
        keys = self.layout.stored_keys if keys is None else keys
        if fetch:
            self._ensure_open()
            fetched = sync(_gather([self._fetch(*requests[i], keys) for i in fetch]))
            for i, arrays in zip(fetch, fetched):
                out[i] = self._decode(*requests[i], arrays, keys, decode)
        return out

    async def _fetch(self, row: int, view: int, keys: tuple[str, ...]) -> dict[str, Any]:
        """Raw stored arrays (or the exception each read raised) for one (row, view), keyed by array name."""
        selections: dict[str, tuple] = {}
        resized = self._resized_hw[row, self.layout.view_size_index(view)]
        for level in keys:
            h, w = self.layout.valid_hw(level, resized)
            selections[features_array(level)] = (row, view, slice(None), slice(0, h), slice(0, w))
            if self.codec.quantised:
                selections[scale_array(level)] = (row, view)
                selections[offset_array(level)] = (row, view)
        results = await asyncio.gather(
            *(self._arrays[name].async_array.getitem(sel) for name, sel in selections.items()),
            return_exceptions=True,
        )
        return dict(zip(selections, results))

    def _decode(self, row: int, view: int, arrays: dict[str, Any], keys: tuple[str, ...],
                decode: bool = True) -> dict[str, np.ndarray] | StoreEntryError:
        image_id = int(self.image_ids[row])
        for name, value in arrays.items():
            if isinstance(value, BaseException):
                return StoreEntryError.for_entry(
                    image_id, self.path,
                    f"damaged data in {name} (checksum or decoding failed: {type(value).__name__}: {value}); "
                    f"run `python -m cache verify {self.path}` and rewrite the store",
                )
        lost = self._lost_object(row, view, arrays, keys)
        if lost:
            return StoreEntryError.for_entry(
                image_id, self.path, f"{lost}; run `python -m cache verify {self.path}` and rewrite the store"
            )
        if not decode:
            return {name: np.asarray(value) for name, value in arrays.items()}
        decoded = {}
        for level in keys:
            stored = np.asarray(arrays[features_array(level)])
            params = None
            if self.codec.quantised:
                params = QuantParams(np.asarray(arrays[scale_array(level)]), np.asarray(arrays[offset_array(level)]))
            decoded[level] = self.codec.decode(stored, params)
        return decoded

    def _lost_object(self, row: int, view: int, arrays: dict[str, Any], keys: tuple[str, ...]) -> str | None:
        """Why a fetched (row, view) holds fill values that stand for a lost object; None when it does not.

        Zarr reads an absent object as its fill value (0). The writer stores every object of a committed
        shard (cache/writer.py), so a map whose stored values are all 0 is checked for its object: present,
        the zeros are the features (a constant map); absent, the object was lost. Real maps are never all
        zero, so reads of intact entries pay nothing for the check.
        """
        shard = row // self.layout.shard_images
        for level in keys:
            suspects = [] if np.any(arrays[features_array(level)]) else [("shard", features_array(level))]
            if self.codec.quantised:
                suspects += [(kind, name(level)) for kind, name in (("scale", scale_array), ("offset", offset_array))
                             if not np.any(arrays[name(level)])]
            for kind, name in suspects:
                key = object_key(self._arrays[name], (shard, view, 0, 0, 0) if kind == "shard" else (shard, 0, 0))
                if not sync(self._group.store.exists(key)):
                    return missing_object_reason(level, self.layout.view_name(view), kind, key)
        return None

    # ----------------------------------------------------------------- zarr handles

    def _ensure_open(self) -> None:
        """(Re)open zarr handles in this process; objects made before a fork are never reused."""
        if self._pid != os.getpid():
            store = zarr_store(self.path, self.storage_options, read_only=True)  # an fsspec store per process too
            self._group = zarr.open_group(store=store, mode="r", zarr_format=3)  # no probes for v2 keys
            self._arrays = {}
            names = [features_array(lv) for lv in self.layout.stored_keys]
            if self.codec.quantised:
                names += [f(lv) for lv in self.layout.stored_keys for f in (scale_array, offset_array)]
            for name in names:
                self._arrays[name] = self._open_array(name)
            self._pid = os.getpid()

    def _array(self, name: str) -> zarr.Array:
        self._ensure_open()
        if name not in self._arrays:
            self._arrays[name] = self._open_array(name)
        return self._arrays[name]

    def _open_array(self, name: str) -> zarr.Array:
        try:
            return self._group[name]
        except Exception as exc:  # noqa: BLE001 - zarr raises KeyError, JSON or validation errors here
            reason = "is missing" if isinstance(exc, KeyError) else f"cannot be read ({type(exc).__name__}: {exc})"
            raise StoreDamagedError(f"feature store {self.path}: the metadata of array {name} ({name}/zarr.json) "
                                    f"{reason}; rebuild the store") from None

    def _load_side_array(self, name: str) -> tuple[np.ndarray, dict[int, str]]:
        return load_rows_tolerant(self._array(name), name)

    def __getstate__(self) -> dict[str, Any]:
        # For spawn-based DataLoader workers: ship the metadata, never zarr handles.
        state = self.__dict__.copy()
        state.update(_pid=None, _group=None, _arrays={})
        return state

    # ----------------------------------------------------------------- summary

    def info(self, *, disk_usage: bool = False) -> StoreInfo:
        """Counts and the layout from the metadata already loaded; with disk_usage, bytes on disk and the ratio.

        disk_usage lists every object of the store (a directory walk, or a full S3 listing: minutes for a
        COCO store), so start-up never asks for it; `python -m cache info` and stage one's summary do.
        """
        status = self._status
        done = status == STATUS_COMMITTED
        raw = 0
        layout = self.layout
        for v in range(layout.num_views):
            resized = self._resized_hw[done, layout.view_size_index(v)]
            for level in layout.stored_keys:
                stride = layout.stride(level)
                h, w = np.ceil(resized[:, 0] / stride), np.ceil(resized[:, 1] / stride)
                raw += int(np.sum(h * w)) * layout.channels_of(level) * 4
        on_disk = None
        if disk_usage:
            on_disk = url_bytes(self.path, self.storage_options) if is_url(self.path) else _directory_bytes(self.path)
        images_done = int(np.count_nonzero(done))
        # The feature shard objects of each view (features/<key>/c/<shard>/<view>/...): what one more view costs.
        by_view = None
        if disk_usage and not is_url(self.path):
            by_view = {layout.view_name(v): sum(_directory_bytes(os.path.join(self.path, features_array(key), "c", shard, str(v)))
                                                for key in layout.stored_keys
                                                for shard in _listdir(os.path.join(self.path, features_array(key), "c")))
                       for v in range(layout.num_views)}
        return StoreInfo(
            path=self.path,
            dataset=self.dataset,
            codec=self.layout.codec,
            predictor=self.layout.predictor,
            format_version=self.attrs.get("format_version"),
            levels=list(self.layout.levels),
            rpn_anchors=self.layout.rpn_anchors,
            flip=self.layout.flip,
            sizes=list(layout.sizes),
            views=[layout.view_name(v) for v in range(layout.num_views)],
            images_total=len(self),
            images_done=images_done,
            images_failed=int(np.count_nonzero(status == STATUS_UNREADABLE)),
            images_pending=int(np.count_nonzero(status == STATUS_PENDING)),
            bytes_on_disk=on_disk,
            bytes_per_image=(on_disk / images_done) if images_done and on_disk is not None else None,
            bytes_per_view=(on_disk / (images_done * layout.num_views)) if images_done and on_disk else None,
            feature_bytes_per_image_by_view=({name: b / images_done for name, b in by_view.items()}
                                             if by_view is not None and images_done else None),
            raw_fp32_bytes=raw,
            ratio_vs_fp32=(raw / on_disk) if on_disk else None,
            fingerprint_sha256=self.attrs.get("fingerprint_sha256") or fingerprint_sha256(self.fingerprint),
            created=self.attrs.get("created"),
            finalized="failed" in self.attrs,
        )


@dataclass(frozen=True)
class RowMetadata:
    """Every row's image id, status and sizes, as a reader holds them, and where they were read from."""

    image_ids: np.ndarray  # (N,) int64
    status: np.ndarray  # (N,) uint8
    orig_hw: np.ndarray  # (N, 2) int64
    resized_hw: np.ndarray  # (N, Z, 2) int64: one (h, w) per stored size (Z = 1 for format 1-2 stores)
    padded_hw: np.ndarray
    damaged: dict[int, str]  # row -> reason, for rows whose per-shard chunks fail their checksum
    source: str  # CONSOLIDATED_ROWS or "per-shard arrays"


@dataclass(frozen=True)
class StoreInfo:
    """Summary of a store (TeacherFeatureStore.info()); `python -m cache info --json` prints its fields."""

    path: str
    dataset: str
    codec: str
    predictor: str
    format_version: int | None
    levels: list[str]
    rpn_anchors: int  # A; 0: no RPN outputs stored
    flip: str
    sizes: list[int]  # short edges stored (format 3); []: one size, recorded only in the fingerprint (format 1-2)
    views: list[str]  # the view axis, e.g. ["800/orig", "800/hflip", ...] ("orig", "hflip" without sizes)
    images_total: int
    images_done: int  # status 1
    images_failed: int  # status 2: unreadable at write time
    images_pending: int  # status 0: not written yet
    bytes_on_disk: int | None  # None unless info(disk_usage=True)
    bytes_per_image: float | None  # per done image
    bytes_per_view: float | None  # bytes on disk per done image and view (everything, side arrays included)
    feature_bytes_per_image_by_view: dict[str, float] | None  # each view's feature shard objects per done image (local)
    raw_fp32_bytes: int  # the done images' stored maps as float32
    ratio_vs_fp32: float | None
    fingerprint_sha256: str
    created: str | None
    finalized: bool

    @property
    def complete(self) -> bool:
        """Every row is done (committed or recorded unreadable)."""
        return self.images_done + self.images_failed == self.images_total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def object_key(array: zarr.Array, chunk_coords: tuple[int, ...]) -> str:
    """Store key of the object holding chunk (or shard) `chunk_coords` of `array`."""
    return f"{array.path}/{array.metadata.encode_chunk_key(chunk_coords)}"


def missing_object_reason(level: str, view: str, kind: str, key: str) -> str:
    """How the reader and verify name a lost object of a committed entry."""
    return f"{level} (view {view}): {kind} object {key} is missing"


def load_rows_tolerant(arr: zarr.Array, name: str) -> tuple[np.ndarray, dict[int, str]]:
    """A whole per-image array, and {row: reason} for rows whose chunk fails its checksum (left as 0)."""
    try:
        return np.asarray(arr[:]), {}
    except Exception:  # noqa: BLE001 - locate the damaged chunks below
        pass
    values = np.zeros(arr.shape, dtype=arr.dtype)
    damaged: dict[int, str] = {}
    step = arr.chunks[0]
    for start in range(0, arr.shape[0], step):
        stop = min(start + step, arr.shape[0])
        try:
            values[start:stop] = arr[start:stop]
        except Exception as exc:  # noqa: BLE001
            for row in range(start, stop):
                damaged[row] = f"damaged {name} chunk for rows {start}..{stop - 1} ({type(exc).__name__}: {exc})"
    return values, damaged


async def _gather(coroutines: list) -> list:
    # gather must run inside zarr's loop (sync() runs this coroutine there), not in the caller's thread.
    return await asyncio.gather(*coroutines)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _directory_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass  # removed while walking (a temporary file of a running writer)
    return total


"""The store's layout, fingerprint helpers and errors: what both the writer and the reader agree on.

Everything here is pure Python (no zarr), so the format can be reasoned about and tested on its own.
docs/store-format.md is the authoritative description; this module implements it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from cache.codecs import FeatureCodec, get_codec

FORMAT_NAME = "teacher-feature-store"
FORMAT_VERSION = 3
# Version 3 records the short edges (`sizes`) and stores one set of views per size, and its finalisation writes
# the consolidated row index. Version 2 is version 3 with one size that the layout does not record (the
# fingerprint's resize rule does) and without the index: a layout without sizes is written as version 2, and
# version 2 stores are resumed by a one-size request with the same layout. Version 1 is version 2 without the
# `predictor` attribute (no predictor): still read, and resumed where the requested layout is the same (an
# fp16 store is byte-identical in both).
LEGACY_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2, 3)
# First version whose finalisation writes the consolidated row index (older code would not drop it before
# writing a shard, so a version 2 store never gets one).
CONSOLIDATED_SINCE_VERSION = 3
FLIP_OPTIONS = ("none", "mirror", "stored")

# Status values of the per-image `status` array; a row is done only when its status is nonzero.
STATUS_PENDING = 0
STATUS_COMMITTED = 1
STATUS_UNREADABLE = 2

# Per-image side arrays, each of length N (rows) and chunked by shard.
IMAGE_ID = "image_id"
ORIG_HW = "orig_hw"
RESIZED_HW = "resized_hw"
PADDED_HW = "padded_hw"
ERROR = "error"
STATUS = "status"
SIZE_ARRAYS = (ORIG_HW, RESIZED_HW, PADDED_HW)
# The per-image arrays above in one single-chunk (N, 8) int64 array, written at finalisation and dropped by the
# first shard write after it: a reader opens a finalized store with one object instead of N/S per array.
CONSOLIDATED_ROWS = "consolidated_rows"
CONSOLIDATED_COLUMNS = ("image_id", "status", "orig_h", "orig_w", "resized_h", "resized_w", "padded_h", "padded_w")


def consolidated_columns(sizes: tuple[int, ...] = ()) -> tuple[str, ...]:
    """The index's columns: CONSOLIDATED_COLUMNS for one size; with several, resized and padded (h, w) per size,
    suffixed with the short edge (resized_h@640, resized_w@640, ..., padded_h@640, ...)."""
    if len(sizes) <= 1:
        return CONSOLIDATED_COLUMNS
    return CONSOLIDATED_COLUMNS[:4] + tuple(f"{name}_{c}@{size}" for name in ("resized", "padded")
                                            for size in sizes for c in "hw")
CONSOLIDATED_CHUNK_KEY = f"{CONSOLIDATED_ROWS}/c/0/0"


def features_array(level: str) -> str:
    return f"features/{level}"


def scale_array(level: str) -> str:
    return f"scale/{level}"


def offset_array(level: str) -> str:
    return f"offset/{level}"


_LEVEL_NAME = re.compile(r"[A-Za-z0-9_-]+")

# The teacher's RPN head outputs, stored per level beside the features when a layout has rpn_anchors > 0
# (A anchors per position): objectness logits (A channels) and box deltas (4A channels, dx dy dw dh per anchor).
RPN_OBJECTNESS = "rpn_objectness"
RPN_DELTAS = "rpn_deltas"
RPN_OUTPUTS = (RPN_OBJECTNESS, RPN_DELTAS)  # a layout stores those a method reads (`rpn_outputs`)


def rpn_key(output: str, level: str) -> str:
    """Key of an RPN output map of a level, e.g. "rpn_objectness/p2": its array is features/<key>."""
    return f"{output}/{level}"


# The layout fields every store has as group attributes (StoreLayout.from_attrs needs them).
_LAYOUT_FIELDS = ("levels", "strides", "channels", "codec", "flip", "max_hw", "shard_images", "tile")
# The group attributes that are not the layout: identity, provenance and the finalisation record. Every other
# attribute is the layout, known to this code or not: a resume compares it whichever side has it
# (diff_layout_attrs), so an optional attribute (rpn_anchors, predictor, ...) needs no rule of its own.
NON_LAYOUT_ATTRS = ("format", "format_version", "dataset", "num_images", "fingerprint", "fingerprint_sha256",
                    "created", "failed", "summary")


@dataclass(frozen=True)
class StoreLayout:
    """Shape of a store: which levels, how large, how compressed, how split into shards.

    `max_hw` is the largest padded network input in pixels; every level array is sized for it.
    """

    levels: tuple[str, ...]
    strides: tuple[int, ...]
    channels: int
    codec: str
    flip: str
    max_hw: tuple[int, int]
    shard_images: int = 16
    tile: int = 64
    rpn_anchors: int = 0  # A: the teacher's RPN outputs are stored per level too when > 0
    predictor: str | None = None  # of the stored codes; None: the codec's own (cache/codecs.py)
    # Short edges stored, ascending: one set of flip views each (format 3). (): one size that the layout does
    # not record (format 1-2 stores; the fingerprint's resize rule says which).
    sizes: tuple[int, ...] = ()
    # Which RPN outputs are stored when rpn_anchors > 0. Both by default, as in stores written before the
    # attribute existed; stage one stores only those a method reads (kd: objectness).
    rpn_outputs: tuple[str, ...] = RPN_OUTPUTS

    def __post_init__(self) -> None:
        # Normalise lists (e.g. from JSON or YAML) to tuples so layouts compare and hash by value.
        object.__setattr__(self, "levels", tuple(str(level) for level in self.levels))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        object.__setattr__(self, "max_hw", tuple(int(v) for v in self.max_hw))
        sizes = tuple(int(v) for v in self.sizes)
        if any(v <= 0 for v in sizes) or list(sizes) != sorted(set(sizes)):
            raise ValueError(f"sizes must be distinct positive short edges in ascending order, got {self.sizes}")
        object.__setattr__(self, "sizes", sizes)
        if not self.levels or len(self.levels) != len(self.strides):
            raise ValueError(
                f"levels {self.levels} and strides {self.strides} must be non-empty and of equal length"
            )
        if len(set(self.levels)) != len(self.levels) or not all(_LEVEL_NAME.fullmatch(lv) for lv in self.levels):
            raise ValueError(  # names become object keys: "/", "." or ".." could reach outside the store
                f"level names must be unique and contain no '/', only letters, digits, '_' and '-', got {self.levels}"
            )
        if any(s <= 0 for s in self.strides):
            raise ValueError(f"strides must be positive, got {self.strides}")
        try:
            codec = get_codec(self.codec)
        except ValueError as exc:
            raise ValueError(f"unknown codec {self.codec!r}: {exc}") from None
        if self.predictor is None:
            object.__setattr__(self, "predictor", codec.predictor)
        codec.with_predictor(self.predictor)  # raises for an unknown predictor or one the dtype cannot take
        if self.flip not in FLIP_OPTIONS:
            raise ValueError(f"unknown flip option {self.flip!r}; choose one of {FLIP_OPTIONS}")
        if len(self.max_hw) != 2 or min(self.max_hw) <= 0:
            raise ValueError(f"max_hw must be two positive pixel sizes (h, w), got {self.max_hw}")
        if int(self.rpn_anchors) < 0:
            raise ValueError(f"rpn_anchors must be >= 0 (0: no RPN outputs stored), got {self.rpn_anchors!r}")
        object.__setattr__(self, "rpn_anchors", int(self.rpn_anchors))
        outputs = (self.rpn_outputs,) if isinstance(self.rpn_outputs, str) else tuple(self.rpn_outputs)
        unknown = sorted(set(outputs) - set(RPN_OUTPUTS))
        if unknown or (self.rpn_anchors and not outputs):
            raise ValueError(f"rpn_outputs must be a non-empty subset of {RPN_OUTPUTS}, got {self.rpn_outputs!r}")
        # Canonical order, and the default without anchors (nothing is stored), so layouts compare by what they store.
        object.__setattr__(self, "rpn_outputs", tuple(o for o in RPN_OUTPUTS if o in outputs) if self.rpn_anchors
                           else RPN_OUTPUTS)
        for name in ("channels", "shard_images", "tile"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def flip_views(self) -> tuple[str, ...]:
        """The flip views of one size: the flipped image gets its own view only when flip == "stored"."""
        return ("orig", "hflip") if self.flip == "stored" else ("orig",)

    @property
    def format_version(self) -> int:
        """The format a store of this layout is written in: 3 with recorded sizes, 2 without."""
        return FORMAT_VERSION if self.sizes else LEGACY_FORMAT_VERSION

    @property
    def num_sizes(self) -> int:
        return max(1, len(self.sizes))

    @property
    def views(self) -> tuple:
        """The entries of the arrays' view axis, as the `views` attribute records them.

        With sizes (format 3): (short edge, flip view) pairs, size-major (view index = size index * F + flip
        index, F = len(flip_views)). Without (format 1-2): the flip view names.
        """
        if not self.sizes:
            return self.flip_views
        return tuple((size, flip) for size in self.sizes for flip in self.flip_views)

    @property
    def num_views(self) -> int:
        return self.num_sizes * len(self.flip_views)

    def view_index(self, flip: str = "orig", size: int | None = None) -> int:
        """Index on the view axis of (size, flip view); size None (or any, without sizes) means the only size."""
        if flip not in self.flip_views:
            raise ValueError(f"flip view {flip!r} is not stored (flip={self.flip!r} stores {list(self.flip_views)})")
        return self.size_index(size) * len(self.flip_views) + self.flip_views.index(flip)

    def size_index(self, size: int | None) -> int:
        """Index of a short edge among `sizes`; KeyError naming the stored sizes when it is not one of them."""
        if not self.sizes:
            return 0  # one size, not recorded: the fingerprint's resize rule says which
        if size is None:
            if len(self.sizes) == 1:
                return 0
            raise KeyError(f"this store holds short edges {list(self.sizes)}; name the one to read (size=...)")
        try:
            return self.sizes.index(int(size))
        except ValueError:
            raise KeyError(f"short edge {size} is not stored; this store holds {list(self.sizes)}") from None

    def view_size_index(self, view: int) -> int:
        """Index (into `sizes`) of the size a view index belongs to."""
        return int(view) // len(self.flip_views)

    def view_name(self, view: int) -> str:
        """How messages name a view: "orig"/"hflip", with its short edge first when sizes are recorded ("800/hflip")."""
        flip = self.flip_views[int(view) % len(self.flip_views)]
        return f"{self.sizes[self.view_size_index(view)]}/{flip}" if self.sizes else flip

    @property
    def stored_keys(self) -> tuple[str, ...]:
        """Every per-level map stored (array features/<key>): the levels, then their RPN outputs if any."""
        return self.levels + tuple(rpn_key(o, lv) for o in self.rpn_outputs for lv in self.levels if self.rpn_anchors)

    def channels_of(self, key: str) -> int:
        """Channels of a stored map: C for a level, A for rpn_objectness, 4A for rpn_deltas."""
        output = key.rpartition("/")[0]
        return {"": self.channels, RPN_OBJECTNESS: self.rpn_anchors, RPN_DELTAS: 4 * self.rpn_anchors}[output]

    def stride(self, level: str) -> int:
        level = level.rpartition("/")[2]  # an RPN output map has its level's stride
        try:
            return self.strides[self.levels.index(level)]
        except ValueError:
            raise KeyError(f"unknown level {level!r}; this store has levels {self.levels}") from None

    def step_scale(self, key: str) -> float:
        """A lossy codec's step factor at a stored map: the finest stride over its level's (1, 1/2, 1/4, ...).

        RPN output maps get 0, i.e. int8's step: they are 15 of 271 channels, and kd's loss on them is not
        among the deviations the bench measures for the lossy step.
        """
        if key.rpartition("/")[0]:
            return 0.0
        return level_step_scale(self.stride(key), min(self.strides))

    def tile_hw(self, level: str) -> tuple[int, int]:
        """Inner chunk height and width: the tile option, or the whole level when it is smaller."""
        stride = self.stride(level)
        max_h, max_w = (math.ceil(v / stride) for v in self.max_hw)
        return min(self.tile, max_h), min(self.tile, max_w)

    def level_shape(self, level: str) -> tuple[int, int]:
        """(Hl, Wl) of the level array: its largest size rounded up to whole tiles."""
        stride = self.stride(level)
        tile_h, tile_w = self.tile_hw(level)
        max_h, max_w = (math.ceil(v / stride) for v in self.max_hw)
        return _round_up(max_h, tile_h), _round_up(max_w, tile_w)

    def valid_hw(self, level: str, resized_hw: tuple[int, int]) -> tuple[int, int]:
        """Size of an image's features at a level: ceil(resized / stride), the part not made of padding."""
        stride = self.stride(level)
        return math.ceil(int(resized_hw[0]) / stride), math.ceil(int(resized_hw[1]) / stride)

    def to_attrs(self) -> dict[str, Any]:
        """The layout as JSON-ready group attributes (plus the derived `views`)."""
        return {
            "levels": list(self.levels),
            "strides": list(self.strides),
            "channels": self.channels,
            "codec": self.codec,
            "flip": self.flip,
            # Format 3: the short edges and [size, flip] pairs; format 2 (no sizes): the flip view names.
            **({"sizes": list(self.sizes)} if self.sizes else {}),
            "views": [list(v) for v in self.views] if self.sizes else list(self.views),
            "max_hw": list(self.max_hw),
            "shard_images": self.shard_images,
            "tile": self.tile,
            # Written only when RPN outputs are stored, so stores without them keep their attributes.
            **({"rpn_anchors": self.rpn_anchors} if self.rpn_anchors else {}),
            # Likewise only when there is one: an fp16 store has the attributes of format version 1.
            **({"predictor": self.predictor} if self.predictor != "none" else {}),
            # Only when some RPN output is left out: a store without the attribute holds them all.
            **({"rpn_outputs": list(self.rpn_outputs)} if self.rpn_anchors and self.rpn_outputs != RPN_OUTPUTS else {}),
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "StoreLayout":
        missing = [k for k in _LAYOUT_FIELDS if k not in attrs]
        if missing:
            raise ValueError(f"store attributes lack layout fields {missing}")
        return cls(**{k: attrs[k] for k in _LAYOUT_FIELDS}, rpn_anchors=attrs.get("rpn_anchors", 0),
                   predictor=attrs.get("predictor", "none"), sizes=tuple(attrs.get("sizes", ())),
                   rpn_outputs=attrs.get("rpn_outputs", RPN_OUTPUTS))

    @property
    def feature_codec(self) -> FeatureCodec:
        """The codec of the stored maps, with this layout's predictor."""
        return get_codec(self.codec).with_predictor(self.predictor)


def level_step_scale(stride: int, finest_stride: int) -> float:
    """int8-std<a>'s factor on its step at a level: 1 at the finest, halving with each doubling of the stride."""
    return finest_stride / stride


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: the form that is hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def json_normalised(value: Any) -> Any:
    """`value` as it reads back from JSON attributes (tuples become lists, keys become strings)."""
    return json.loads(canonical_json(value))


def fingerprint_sha256(fp: dict) -> str:
    """sha256 (hex) of the fingerprint's canonical JSON."""
    return hashlib.sha256(canonical_json(fp).encode("utf-8")).hexdigest()


_MISSING = "<missing>"


def diff_fingerprints(expected: dict, actual: dict) -> list[str]:
    """One line "field: store has X, expected Y" per differing key, recursing into dicts (dotted names)."""
    lines: list[str] = []
    _diff_into(json_normalised(expected), json_normalised(actual), "", lines)
    return lines


def diff_layout_attrs(expected: Mapping[str, Any], stored: Mapping[str, Any]) -> list[str]:
    """One line "field: store has X, expected Y" per layout attribute that differs or exists on one side only.

    expected: the requested layout's `to_attrs()`; stored: all of the store's group attributes.
    """
    expected, stored = json_normalised(dict(expected)), json_normalised(dict(stored))
    names = list(expected) + sorted(k for k in stored if k not in expected and k not in NON_LAYOUT_ATTRS)
    def shown(value: Any) -> str:  # names such as codecs read best unquoted
        return value if isinstance(value, str) else _short(value)

    return [f"{name}: store has {shown(stored.get(name, _MISSING))}, expected {shown(expected.get(name, _MISSING))}"
            for name in names if stored.get(name, _MISSING) != expected.get(name, _MISSING)]


def _diff_into(expected: Any, actual: Any, prefix: str, lines: list[str]) -> None:
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(set(expected) | set(actual)):
            name = f"{prefix}.{key}" if prefix else str(key)
            _diff_into(expected.get(key, _MISSING), actual.get(key, _MISSING), name, lines)
    elif expected != actual:
        lines.append(f"{prefix or '<root>'}: store has {_short(actual)}, expected {_short(expected)}")


def _short(value: Any, limit: int = 200) -> str:
    text = value if value is _MISSING else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class StoreMismatchError(ValueError):
    """An existing store was built with other settings than the ones asked for.

    StoreMismatchError(path, differences) builds the message from the differing fields;
    StoreMismatchError(message) takes a ready message (also how DataLoader workers re-raise it).
    """

    def __init__(self, path: str, differences: list[str] | None = None, hint: str | None = None) -> None:
        self.differences = list(differences or [])
        if differences is None:
            self.path = None
            super().__init__(str(path))
            return
        self.path = str(path)
        hint = hint or "Pass overwrite=True to rebuild the store, or use another path for these settings."
        listed = "\n".join(f"  - {line}" for line in self.differences)
        super().__init__(f"feature store {self.path} does not match the requested settings:\n{listed}\n{hint}")


class StoreEntryError(KeyError):
    """An image's features cannot be served: not written, unreadable at write time, or damaged.

    Built with a single message argument too, so DataLoader workers can re-raise it in the parent.
    """

    def __init__(self, message: str, *, image_id: int | None = None, path: str | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.image_id = image_id
        self.path = path
        self.reason = reason

    @classmethod
    def for_entry(cls, image_id: int, path: str, reason: str) -> "StoreEntryError":
        return cls(f"image {image_id} in feature store {path}: {reason}", image_id=image_id, path=path,
                   reason=reason)

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class NotAFeatureStoreError(ValueError):
    """The path holds no teacher feature store (or one of an unsupported format version)."""


class StoreDamagedError(RuntimeError):
    """The path holds a store whose metadata is damaged (layout attributes, an array's zarr.json, the image index).

    Nothing of it can be served; the message names the damage. Rebuild the store (overwrite).
    """

"""Where a store lives: a local directory, or a URL (`s3://bucket/key.zarr`) opened through fsspec.

zarr reads and writes a URL store through its own `FsspecStore`; the few whole-store operations zarr has
no API for (read the group's zarr.json, test whether the location is free, count bytes, delete) go through
the same fsspec filesystem here. Local paths never touch fsspec, so they behave exactly as before.
Storage options (`client_kwargs={"endpoint_url": ...}`, credentials) are fsspec's: a mapping (the config
node DISTILL.CACHE.STORAGE_OPTIONS) or a JSON object string, else $CACHE_STORAGE_OPTIONS for URLs; s3fs
also reads the usual AWS_* environment variables, the place for credentials.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

STORAGE_OPTIONS_ENV = "CACHE_STORAGE_OPTIONS"


def is_url(path: str | os.PathLike) -> bool:
    """True for `scheme://...` locations (s3, gs, memory, ...), which go through fsspec."""
    return "://" in os.fspath(path)


def storage_options_for(path: str | os.PathLike, options: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec options for `path`: `options` when given, else $CACHE_STORAGE_OPTIONS for a URL, else none."""
    if not options and is_url(path):
        try:
            return parse_storage_options(os.environ.get(STORAGE_OPTIONS_ENV, ""))
        except ValueError as exc:
            raise ValueError(f"${STORAGE_OPTIONS_ENV}: {exc}") from None
    parsed = parse_storage_options(options)
    if parsed and not is_url(path):
        raise ValueError(f"storage options {parsed} were given for the local path {os.fspath(path)}; they apply to "
                         "URLs (s3://...) only")
    return parsed


def parse_storage_options(options: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """fsspec storage options from a mapping (a CfgNode too) or a JSON object string; empty means none."""
    if options is None or options == "":
        return {}
    if isinstance(options, Mapping):
        return json.loads(json.dumps(options))  # plain nested dicts, safe to pickle into workers
    try:
        parsed = json.loads(options)
    except ValueError as exc:
        raise ValueError(f"storage options must be a JSON object, got {options!r} ({exc})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"storage options must be a JSON object such as '{{\"anon\": false}}', got {options!r}")
    return parsed


def zarr_store(path: str, storage_options: Mapping[str, Any] | None = None, read_only: bool = False) -> Any:
    """What `zarr.open_group(store=...)` takes: the path itself when local, an FsspecStore for a URL.

    Build one per process: the FsspecStore's filesystem is bound to zarr's event loop of this process.
    """
    if not is_url(path):
        if storage_options:
            raise ValueError(f"storage options {dict(storage_options)} were given for the local path {path}; "
                             "they apply to URLs (s3://...) only")
        return path
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(path, storage_options=dict(storage_options or {}), read_only=read_only)


def _filesystem(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """A synchronous fsspec filesystem for `url` with a fresh listing cache, and the path inside it."""
    import fsspec

    fs, root = fsspec.url_to_fs(url, **dict(storage_options or {}))
    fs.invalidate_cache()  # zarr writes through another (async) instance; listings cached here may be stale
    return fs, root.rstrip("/")


def read_url_text(url: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The object at `url` as text; None when there is none."""
    fs, key = _filesystem(url, storage_options)
    try:
        return fs.cat_file(key).decode("utf-8")
    except FileNotFoundError:
        return None


def write_url_text(url: str, text: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write one object (objects appear whole on object storage, so no temporary file is needed)."""
    fs, key = _filesystem(url, storage_options)
    fs.pipe_file(key, text.encode("utf-8"))


def url_is_occupied(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when an object or any object under the prefix `url/` exists."""
    fs, root = _filesystem(url, storage_options)
    return bool(fs.exists(root) and (fs.isfile(root) or fs.find(root, maxdepth=None)))


def url_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """Total size of the objects under `url/`."""
    fs, root = _filesystem(url, storage_options)
    return int(sum(fs.du(root, total=False).values())) if fs.exists(root) else 0


def delete_url_tree(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete every object under `url/`."""
    fs, root = _filesystem(url, storage_options)
    if fs.exists(root):
        fs.rm(root, recursive=True)

"""Teacher feature store: FPN features computed once, stored as a chunked, compressed zarr v3 group.

The format is specified in docs/store-format.md. This package is pure numpy/zarr/torch (no detectron2).
"""

from cache.codecs import CODECS, get_codec
from cache.format import (
    FLIP_OPTIONS,
    FORMAT_NAME,
    FORMAT_VERSION,
    RPN_OUTPUTS,
    NotAFeatureStoreError,
    StoreDamagedError,
    StoreEntryError,
    StoreLayout,
    StoreMismatchError,
    diff_fingerprints,
    fingerprint_sha256,
)
from cache.reader import StoreInfo, TeacherFeatureStore
from cache.verify import VerifyReport, verify_store
from cache.writer import BackgroundShardWriter, ImageEntry, TeacherFeatureWriter

__all__ = [
    "BackgroundShardWriter",
    "CODECS",
    "FLIP_OPTIONS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ImageEntry",
    "NotAFeatureStoreError",
    "RPN_OUTPUTS",
    "StoreDamagedError",
    "StoreEntryError",
    "StoreInfo",
    "StoreLayout",
    "StoreMismatchError",
    "TeacherFeatureStore",
    "TeacherFeatureWriter",
    "VerifyReport",
    "diff_fingerprints",
    "fingerprint_sha256",
    "get_codec",
    "verify_store",
]

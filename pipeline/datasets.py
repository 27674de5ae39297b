"""Dataset names for configs: the embedded dataset and any COCO-format dataset of the user's.

Importing registers `embedded_train`/`embedded_val` and `embedded_tiny_train`/`embedded_tiny_val`.
Real COCO keeps detectron2's own names (`coco_2017_train`, ...) under `$DETECTRON2_DATASETS`.
"""
from __future__ import annotations

import os
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

REPO_ROOT = Path(__file__).resolve().parent.parent


def embedded_root(variant: str = "default") -> Path:
    """Where the embedded dataset lives: $EMBEDDED_DATA or data/embedded[_tiny] in the repo."""
    base = Path(os.environ.get("EMBEDDED_DATA", REPO_ROOT / "data"))
    return base / ("embedded" if variant == "default" else f"embedded_{variant}")


def _register_embedded(name: str, variant: str, split: str) -> None:
    root = embedded_root(variant)
    json_file = root / "annotations" / f"instances_{split}.json"
    image_root = root / split

    def load():
        if not json_file.exists():
            flag = "" if variant == "default" else f" VARIANT={variant}"
            raise FileNotFoundError(f"{json_file} is missing: generate the embedded dataset first (make data{flag})")
        return load_coco_json(str(json_file), str(image_root), name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(json_file=str(json_file), image_root=str(image_root), evaluator_type="coco")


def register_coco_format(name: str, json_file: str, image_root: str) -> None:
    """Register a user's COCO-format dataset once (a no-op when the name already holds these files)."""
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if getattr(meta, "json_file", None) == json_file and getattr(meta, "image_root", None) == image_root:
            return
        raise ValueError(f"dataset name {name!r} is already registered with other files; pick another name")
    register_coco_instances(name, {}, json_file, image_root)


def register_from_cfg(cfg) -> None:
    """Register every (name, json, image_root) of cfg.DATASETS.COCO_FORMAT."""
    for entry in cfg.DATASETS.COCO_FORMAT:
        if len(entry) != 3:
            raise ValueError(f"DATASETS.COCO_FORMAT entries are (name, json_file, image_root); got {entry!r}")
        register_coco_format(*entry)


for _variant, _prefix in (("default", "embedded"), ("tiny", "embedded_tiny")):
    for _split in ("train", "val"):
        if f"{_prefix}_{_split}" not in DatasetCatalog.list():
            _register_embedded(f"{_prefix}_{_split}", _variant, _split)

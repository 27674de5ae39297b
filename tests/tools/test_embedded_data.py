"""The embedded dataset: deterministic, valid COCO, loadable by pycocotools and detectron2."""
import hashlib
import json
from pathlib import Path

from tools.embedded_data import CLASSES, VARIANTS, generate


def _digest(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_the_same_bytes_and_json(tmp_path):
    generate(tmp_path / "a", "tiny", seed=3)
    generate(tmp_path / "b", "tiny", seed=3)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_another_seed_gives_other_images(tmp_path):
    generate(tmp_path / "a", "tiny", seed=3)
    generate(tmp_path / "b", "tiny", seed=4)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "b")


def test_pycocotools_loads_the_expected_counts(tiny_data):
    from pycocotools.coco import COCO

    for split in ("train", "val"):
        coco = COCO(str(tiny_data / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == getattr(VARIANTS["tiny"], split)
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
        assert len(coco.getAnnIds()) > len(coco.getImgIds())


def test_images_vary_in_size_and_orientation_and_some_are_empty(tiny_data):
    coco = json.loads((tiny_data / "annotations" / "instances_train.json").read_text())
    sizes = {(im["width"], im["height"]) for im in coco["images"]}
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)
    with_objects = {a["image_id"] for a in coco["annotations"]}
    assert any(im["id"] not in with_objects for im in coco["images"])
    assert {p.suffix for p in (tiny_data / "train").iterdir()} == {".jpg", ".png"}


def test_detectron2_catalog_serves_the_registered_names(tiny_data):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    dicts = DatasetCatalog.get("embedded_tiny_train")
    assert len(dicts) == VARIANTS["tiny"].train
    assert all(Path(d["file_name"]).exists() for d in dicts)
    assert MetadataCatalog.get("embedded_tiny_train").thing_classes == list(CLASSES)


def test_a_users_coco_format_dataset_registers_from_the_config(tiny_data):
    from detectron2.data import DatasetCatalog
    from pipeline.config import get_distill_cfg
    from pipeline.datasets import register_from_cfg

    cfg = get_distill_cfg(None, ["DATASETS.COCO_FORMAT", [["my_shapes", str(tiny_data / "annotations/instances_val.json"), str(tiny_data / "val")]]])
    register_from_cfg(cfg)
    register_from_cfg(cfg)  # registering the same files twice is harmless
    assert len(DatasetCatalog.get("my_shapes")) == VARIANTS["tiny"].val

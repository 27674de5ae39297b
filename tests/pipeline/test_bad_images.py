"""Bad input images: stage one caches readable ones exactly as the student sees them and lists the rest.

A small COCO dataset holds one image of each awkward kind. Readable ones must be stored at the size and
with the pixels detectron2's own DatasetMapper gives the student (read_image's EXIF and colour handling,
the training resize); unreadable ones are recorded with their reason, and stage two applies
DISTILL.CACHE.ON_BAD_ENTRY to them.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cache import StoreEntryError, TeacherFeatureStore, verify_store
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from pipeline import datasets
from pipeline.stage_one import cache_teacher
from pipeline.mapper import DistillDatasetMapper
from pipeline.teacher import TeacherFeatureExtractor, convert_format
from pipeline.stage_two import StudentTrainer, check_store
from tests.conftest import make_student_cfg

DATASET = "bad_images_train"
UNREADABLE = {2: "FileNotFoundError", 3: "image file is truncated", 4: "cannot identify image file"}


def _write_images(root) -> list[dict]:
    """Write one image per awkward case; returns COCO image records (width/height as read_image gives)."""
    rng = np.random.default_rng(0)

    def rgb(h, w):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    rgb(120, 160).save(root / "rgb.jpg")
    rgb(120, 160).save(root / "full.jpg")
    data = (root / "full.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.jpg").write_bytes(b"")
    Image.fromarray(rng.integers(0, 256, (96, 120), dtype=np.uint8)).save(root / "gray.png")
    Image.fromarray(rng.integers(0, 256, (100, 128, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (80, 100), dtype=np.uint16)).save(root / "sixteen.png")
    rgb(128, 96).convert("CMYK").save(root / "cmyk.jpg")
    rotated = rgb(96, 160)
    exif = rotated.getexif()
    exif[274] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(root / "exif.jpg", exif=exif)
    rgb(8, 8).save(root / "tiny.png")
    rgb(40, 1000).save(root / "wide.png")
    names = [("rgb.jpg", 120, 160), ("missing.jpg", 100, 100), ("truncated.jpg", 120, 160), ("empty.jpg", 100, 100),
             ("gray.png", 96, 120), ("rgba.png", 100, 128), ("sixteen.png", 80, 100), ("cmyk.jpg", 128, 96),
             ("exif.jpg", 160, 96), ("tiny.png", 8, 8), ("wide.png", 40, 1000)]
    return [{"id": i + 1, "file_name": name, "height": h, "width": w} for i, (name, h, w) in enumerate(names)]


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory, tiny_teacher) -> dict:
    """The dataset registered as DATASETS.COCO_FORMAT, and the stage-one store built over it."""
    root = tmp_path_factory.mktemp("bad_images")
    (root / "images").mkdir()
    images = _write_images(root / "images")
    annotations = [{"id": im["id"], "image_id": im["id"], "category_id": 1, "iscrowd": 0,
                    "bbox": [1, 1, max(2, im["width"] // 2), max(2, im["height"] // 2)],
                    "area": float(max(2, im["width"] // 2) * max(2, im["height"] // 2))} for im in images]
    (root / "train.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))
    opts = ("DATASETS.COCO_FORMAT", [[DATASET, str(root / "train.json"), str(root / "images")]],
            "DATASETS.TRAIN", (DATASET,), "INPUT.RANDOM_FLIP", "none", "DISTILL.CACHE.SHARD_IMAGES", 3)
    cfg = make_student_cfg(root / "run", tiny_teacher, *opts)
    datasets.register_from_cfg(cfg)
    summary = cache_teacher(cfg)
    return {"cfg": cfg, "opts": opts, "summary": summary, "path": cfg.DISTILL.CACHE.PATH, "root": root}


def test_unreadable_images_are_listed_with_their_reason_in_the_summary_and_the_store(bad_dataset):
    summary = bad_dataset["summary"]
    assert summary["images_failed_this_run"] == len(UNREADABLE)
    store = TeacherFeatureStore(bad_dataset["path"])
    for image_id, reason in UNREADABLE.items():
        assert reason in summary["failed_this_run"][str(image_id)]
        assert reason in store.attrs["failed"][str(image_id)]
        assert image_id not in store and store.sizes(image_id)["status"] == 2
    report = verify_store(bad_dataset["path"], progress=False)
    assert report.intact and report.complete and report.ok == 11 - len(UNREADABLE) and report.failed == len(UNREADABLE)


def test_readable_images_are_stored_exactly_as_detectron2s_mapper_gives_them_to_the_student(bad_dataset):
    cfg = bad_dataset["cfg"]
    store = TeacherFeatureStore(bad_dataset["path"])
    mapper = DatasetMapper(cfg, is_train=True)
    extractor = TeacherFeatureExtractor.from_config(cfg)
    readable = [d for d in DatasetCatalog.get(DATASET) if d["image_id"] not in UNREADABLE]
    assert len(readable) == 8
    for d in readable:
        student = mapper(dict(d))["image"]  # uint8 (3, H, W) in the student's INPUT.FORMAT, resized
        sizes = store.sizes(d["image_id"])
        assert sizes["orig_hw"] == read_image(d["file_name"], cfg.INPUT.FORMAT).shape[:2] == (d["height"], d["width"])
        assert sizes["resized_hw"] == tuple(student.shape[-2:]), d["file_name"]
        expected = extractor(convert_format(student, cfg.INPUT.FORMAT, extractor.input_format))
        got = store.read(d["image_id"])
        for level, t in expected.items():
            assert torch.equal(got[level], t.half().float()), (d["file_name"], level)
    assert store.sizes(9)["orig_hw"] == (160, 96)  # the EXIF rotation is applied, as read_image does
    assert store.sizes(11)["resized_hw"] == (9, 224)  # 1000x40: long side capped at MAX_SIZE_TRAIN


def test_stage_two_fail_policy_refuses_the_store_naming_the_unreadable_images(bad_dataset, tiny_teacher):
    cfg = make_student_cfg(bad_dataset["root"] / "fail", tiny_teacher, *bad_dataset["opts"],
                           "DISTILL.CACHE.PATH", bad_dataset["path"])
    with pytest.raises(StoreEntryError, match=r"cannot serve 3 training images \(image 2: .*FileNotFoundError.*image 3"):
        check_store(cfg)
    with pytest.raises(StoreEntryError, match=r"image 4 in feature store .*unreadable.*cannot identify image file"):
        DistillDatasetMapper(cfg, True)(dict(DatasetCatalog.get(DATASET)[3]))


def test_stage_two_skip_policy_trains_on_the_readable_images_only(bad_dataset, tiny_teacher, monkeypatch):
    cfg = make_student_cfg(bad_dataset["root"] / "skip", tiny_teacher, *bad_dataset["opts"],
                           "DISTILL.CACHE.PATH", bad_dataset["path"], "DISTILL.CACHE.ON_BAD_ENTRY", "skip")
    check_store(cfg)
    dropped = []
    call = DistillDatasetMapper.__call__

    def recording_call(self, dataset_dict):
        out = call(self, dataset_dict)
        if out is None:  # detectron2's MapDataset then draws another image
            dropped.append(dataset_dict["image_id"])
        return out

    monkeypatch.setattr(DistillDatasetMapper, "__call__", recording_call)
    loader = iter(StudentTrainer.build_train_loader(cfg))
    seen = []
    for _ in range(8):
        batch = next(loader)
        seen += [x["image_id"] for x in batch]
        assert all(x["teacher_features"] is not None for x in batch)
    assert seen and not set(seen) & set(UNREADABLE)
    assert set(dropped) == set(UNREADABLE)  # the first 11 draws are a permutation: each was met and dropped
    model = build_model(cfg).train()
    with EventStorage(0):
        loss_kd = model(batch)["loss_kd"]
    assert torch.isfinite(loss_kd) and loss_kd > 0


def test_a_rerun_retries_every_image_recorded_unreadable_and_writes_those_that_now_read(bad_dataset, tiny_teacher):
    """The refusal's advice "fix the files and rerun make cache-teacher" works exactly as printed."""
    import shutil

    root = bad_dataset["root"] / "retry"
    shutil.copytree(bad_dataset["root"] / "images", root / "images")
    train = json.loads((bad_dataset["root"] / "train.json").read_text())
    (root / "train.json").write_text(json.dumps(train))
    name = DATASET + "_retry"
    opts = ("DATASETS.COCO_FORMAT", [[name, str(root / "train.json"), str(root / "images")]], "DATASETS.TRAIN", (name,),
            "INPUT.RANDOM_FLIP", "none", "DISTILL.CACHE.SHARD_IMAGES", 3)
    cfg = make_student_cfg(root / "run", tiny_teacher, *opts)
    datasets.register_from_cfg(cfg)
    first = cache_teacher(cfg)
    assert first["images_failed_this_run"] == len(UNREADABLE)
    Image.fromarray(np.full((100, 100, 3), 90, np.uint8)).save(root / "images" / "missing.jpg")  # the user fixes 2 ...
    shutil.copy(root / "images" / "full.jpg", root / "images" / "truncated.jpg")  # ... and image 3
    second = cache_teacher(cfg)
    assert second["images_failed_this_run"] == 1 and set(second["failed_this_run"]) == {"4"}
    store = TeacherFeatureStore(cfg.DISTILL.CACHE.PATH)
    assert 2 in store and 3 in store and 4 not in store
    report = verify_store(cfg.DISTILL.CACHE.PATH, progress=False)
    assert report.intact and report.complete and report.failed == 1 and report.ok == 10
    expected = TeacherFeatureExtractor.from_config(cfg)(
        convert_format(DatasetMapper(cfg, is_train=True)(dict(DatasetCatalog.get(name)[1]))["image"],
                       cfg.INPUT.FORMAT, "BGR"))
    got = store.read(2)
    assert all(torch.equal(got[k], v.half().float()) for k, v in expected.items())


@pytest.mark.parametrize("error, transient", [
    (OSError(5, "Input/output error"), True), (PermissionError(13, "Permission denied"), True),
    (TimeoutError("read timed out"), True), (FileNotFoundError(2, "No such file"), False),
    (OSError("cannot identify image file"), False), (ValueError("image file is truncated"), False)])
def test_an_io_error_that_may_pass_is_reported_as_such_not_as_a_broken_image(error, transient):
    from pipeline.stage_one import TRANSIENT_PREFIX, describe_read_error

    reason = describe_read_error(error)
    assert reason.startswith(TRANSIENT_PREFIX) == transient and str(error) in reason


def test_the_fail_refusal_says_what_removing_an_image_costs(bad_dataset, tiny_teacher):
    cfg = make_student_cfg(bad_dataset["root"] / "advice", tiny_teacher, *bad_dataset["opts"],
                           "DISTILL.CACHE.PATH", bad_dataset["path"])
    with pytest.raises(StoreEntryError, match=r"rerun make cache-teacher, which retries .*Removing images .* full "
                                              r"rebuild \(OVERWRITE=1\)"):
        check_store(cfg)

"""Multi-scale training from a store: every (short edge, flip) view stored, the augmentation's view served.

The embedded recipe at short edges 96, 112, 128 (choice sampling, horizontal flip), tiny R18 teacher.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cache import StoreMismatchError, TeacherFeatureStore, verify_store
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from pipeline.stage_one import ResizedImages, cache_teacher, training_images
from pipeline.stage_two import StudentTrainer, check_store
from pipeline.teacher import TeacherFeatureExtractor, convert_format, store_resize
from pipeline.teacher_source import decode_maps
from tests.conftest import crash_stage_one_at_row, make_student_cfg

SIZES = (96, 112, 128)
MS = ("INPUT.MIN_SIZE_TRAIN", SIZES, "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice")


@pytest.fixture(scope="module")
def ms_store(tmp_path_factory, tiny_teacher) -> dict:
    root = tmp_path_factory.mktemp("store_ms")
    cfg = make_student_cfg(root, tiny_teacher, *MS)
    summary = cache_teacher(cfg)
    return {"cfg": cfg, "path": cfg.DISTILL.CACHE.PATH, "summary": summary}


def test_the_store_holds_every_size_and_flip_equal_to_the_live_teacher_in_fp16(ms_store):
    store = TeacherFeatureStore(ms_store["path"])
    assert store.layout.sizes == SIZES and store.layout.num_views == 6 and store.attrs["format_version"] == 3
    cfg = ms_store["cfg"]
    extractor = TeacherFeatureExtractor.from_config(cfg)
    dicts = training_images(cfg.DATASETS.TRAIN)
    images = ResizedImages(dicts, [0, 5, 11], store_resize(cfg), extractor.input_format)
    for i in range(len(images)):
        item = images[i]
        for size, (orig, hflip) in item["images"].items():
            assert min(orig.shape[-2:]) == size or max(orig.shape[-2:]) == 224
            assert store.sizes(item["image_id"], size)["resized_hw"] == tuple(orig.shape[-2:])
            for flip, image in ((False, orig), (True, hflip)):
                got = store.read(item["image_id"], flip=flip, size=size)
                for level, t in extractor(image).items():
                    assert torch.equal(got[level], t.half().float()), (item["image_id"], size, flip, level)


def test_a_seeded_multi_scale_run_reads_every_size_with_the_view_of_the_students_input(ms_store, tiny_teacher, tmp_path):
    cfg = make_student_cfg(tmp_path, tiny_teacher, *MS, "DISTILL.CACHE.PATH", ms_store["path"], "SEED", 3)
    check_store(cfg)
    extractor = TeacherFeatureExtractor.from_config(cfg)
    torch.manual_seed(0)
    np.random.seed(0)  # ResizeShortestEdge and RandomFlip sample with numpy
    loader = iter(StudentTrainer.build_train_loader(cfg))
    model = build_model(cfg).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    views = set()
    with EventStorage(0):
        for step in range(12):
            batch = next(loader)
            for x in batch:
                size, flip = x["teacher_view"]
                assert min(x["image"].shape[-2:]) == size or max(x["image"].shape[-2:]) == 224
                views.add((size, flip))
                # The served features are the teacher's on this very input (resized at `size`, flipped or not).
                live = extractor(convert_format(x["image"], cfg.INPUT.FORMAT, extractor.input_format))
                served = decode_maps(x["teacher_features"], torch.device("cpu"))
                for level in cfg.DISTILL.LEVELS:
                    assert torch.equal(served[level], live[level].half().float()), (x["image_id"], size, flip, level)
            if step < 2:  # a few optimiser steps of the multi-scale student
                losses = model(batch)
                assert torch.isfinite(losses["loss_kd"]) and losses["loss_kd"] > 0
                optimizer.zero_grad()
                sum(losses.values()).backward()
                optimizer.step()
    assert {size for size, _ in views} == set(SIZES), views
    assert {flip for _, flip in views} == {"orig", "hflip"}, views


def test_an_interrupted_multi_scale_store_resumes_to_the_same_store_and_verifies(ms_store, tiny_teacher, tmp_path,
                                                                                    monkeypatch):
    cfg = make_student_cfg(tmp_path, tiny_teacher, *MS)
    original = crash_stage_one_at_row(monkeypatch, 9)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(cfg)
    partial = TeacherFeatureStore(cfg.DISTILL.CACHE.PATH).info()
    assert 0 < partial.images_done < partial.images_total
    monkeypatch.setattr(ResizedImages, "__getitem__", original)
    assert cache_teacher(cfg)["images_written"] == partial.images_total - partial.images_done
    report = verify_store(cfg.DISTILL.CACHE.PATH, progress=False)
    assert report.intact and report.ok == partial.images_total
    resumed, full = TeacherFeatureStore(cfg.DISTILL.CACHE.PATH), TeacherFeatureStore(ms_store["path"])
    for image_id in full.image_ids:
        for size in SIZES:
            for flip in (False, True):
                a, b = resumed.read(int(image_id), flip=flip, size=size), full.read(int(image_id), flip=flip, size=size)
                assert all(torch.equal(a[k], b[k]) for k in a)


def test_range_sampling_is_refused_naming_the_choice_alternative(student_cfg):
    cfg = student_cfg("INPUT.MIN_SIZE_TRAIN", (96, 128), "INPUT.MIN_SIZE_TRAIN_SAMPLING", "range")
    with pytest.raises(ValueError, match=r"'range' .*INPUT.MIN_SIZE_TRAIN \(96, 128\) INPUT.MIN_SIZE_TRAIN_SAMPLING choice"):
        store_resize(cfg)


def test_cache_sizes_outside_the_students_sizes_are_refused(student_cfg):
    with pytest.raises(ValueError, match=r"DISTILL.CACHE.SIZES .*\[144\] that INPUT.MIN_SIZE_TRAIN"):
        store_resize(student_cfg(*MS, "DISTILL.CACHE.SIZES", (96, 144)))


def test_a_size_the_store_lacks_is_refused_at_start_unless_cache_sizes_names_the_subset(ms_store, tiny_teacher, tmp_path):
    more = ("INPUT.MIN_SIZE_TRAIN", SIZES + (144,), "DISTILL.CACHE.PATH", ms_store["path"])
    cfg = make_student_cfg(tmp_path, tiny_teacher, *more)
    with pytest.raises(StoreMismatchError, match=r"holds short edges \[96, 112, 128\] but lacks \[144\].*"
                                                 r"DISTILL.CACHE.SIZES \(96, 112, 128\)"):
        check_store(cfg)
    # Said explicitly, the subset is accepted: the student still samples 144, and trains those images without loss_kd.
    cfg = make_student_cfg(tmp_path, tiny_teacher, *more, "DISTILL.CACHE.SIZES", SIZES, "SEED", 1)
    check_store(cfg)
    np.random.seed(1)
    loader = iter(StudentTrainer.build_train_loader(cfg))
    seen = {}
    for _ in range(10):
        for x in next(loader):
            seen[x["teacher_view"][0]] = x["teacher_features"]
    assert 144 in seen and seen[144] is None
    assert all(seen[s] is not None for s in seen if s != 144)


def test_a_single_scale_store_is_format_3_with_one_size(tiny_store):
    store = TeacherFeatureStore(tiny_store["path"])
    assert store.layout.sizes == (128,) and store.attrs["format_version"] == 3
    assert store.attrs["fingerprint"]["resize"] == {"type": "ResizeShortestEdge", "short_edge": 128, "max_size": 224,
                                                     "interp": "bilinear"}  # recorded as formats 1-2 did

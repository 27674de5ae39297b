"""Stage two with INPUT.RANDOM_FLIP horizontal: a flipped image gets the store's flipped view, the others the original.

Which images were flipped is read off the images themselves (each equals the unflipped mapping of
its file, or that mapping mirrored), not from the mapper's own flag. Both cases must occur in the
batch, so the generators are seeded; each image's teacher features must then be the view its
image was given, bit for bit, and differ from the other view.
"""
from __future__ import annotations

import numpy as np
import torch

from cache.stored_map import decode_maps
from cache import TeacherFeatureStore
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data import transforms as T
from pipeline.stage_two import StudentTrainer
from tests.conftest import make_student_cfg


def seeded_batch(cfg, seed: int = 0) -> list[dict]:
    """The student's first training batch with the numpy (RandomFlip, sampler seed) and torch generators seeded."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    return next(iter(StudentTrainer.build_train_loader(cfg)))


def flipped_images(cfg, batch: list[dict]) -> list[bool]:
    """Per image of the batch, whether the student's input is its file mirrored (False: as resized, unflipped)."""
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, "choice")
    unflipped = DatasetMapper(False, augmentations=[resize], image_format=cfg.INPUT.FORMAT)
    dicts = {d["image_id"]: d for name in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(name)}
    flipped = []
    for x in batch:
        plain = unflipped(dict(dicts[x["image_id"]]))["image"]
        mirrored = plain.flip(-1)
        assert not torch.equal(plain, mirrored), f"image {x['image_id']} is its own mirror image: pick another"
        assert torch.equal(x["image"], plain) or torch.equal(x["image"], mirrored), x["image_id"]
        flipped.append(torch.equal(x["image"], mirrored))
    return flipped


def test_each_image_gets_the_view_of_its_own_flip_and_both_flips_occur(tiny_store, tiny_teacher, tmp_path):
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"],
                           "INPUT.RANDOM_FLIP", "horizontal", "SOLVER.IMS_PER_BATCH", 8)
    store = TeacherFeatureStore(tiny_store["path"])
    assert store.layout.flip == "stored"  # the flipped view is the teacher run on the flipped image
    batch = seeded_batch(cfg)
    flipped = flipped_images(cfg, batch)
    assert any(flipped) and not all(flipped), flipped
    for x, was_flipped in zip(batch, flipped):
        own, other = store.read(x["image_id"], flip=was_flipped), store.read(x["image_id"], flip=not was_flipped)
        served = decode_maps(x["teacher_features"])  # the mapper sends stored codes; the student decodes them
        assert set(served) == set(own)
        assert all(torch.equal(served[k], own[k]) for k in own), (x["image_id"], was_flipped)
        assert any(not torch.equal(own[k], other[k]) for k in own), x["image_id"]  # the views do differ

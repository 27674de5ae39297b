"""Stage two as a library: the student's trainer and the start-up check of its store.

The entry point is `python -m pipeline.train_student` (make train-student).
"""
from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from pipeline import loader
from pipeline.init_stage import INIT_STAGE_FILE, InitStageHook
from pipeline.losses import loss_class, loss_weight
from pipeline.mapper import ON_BAD_ENTRY, DistillDatasetMapper
from pipeline.plan import TeacherPlan
from pipeline.trainer import Trainer, write_json
from cache import StoreEntryError, StoreInfo, StoreMismatchError, TeacherFeatureStore
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.utils import comm

logger = logging.getLogger("pipeline.stage_two")


class StudentTrainer(Trainer):
    """Trainer whose training loader attaches stored teacher features to every image."""

    @classmethod
    def build_train_loader(cls, cfg):
        return loader.for_device(build_detection_train_loader(cfg, mapper=DistillDatasetMapper(cfg, True)),
                                 cfg.MODEL.DEVICE)

    def build_hooks(self):
        clip = self.cfg.SOLVER.CLIP_GRADIENTS
        clip_norm = clip.CLIP_VALUE if clip.ENABLED and clip.CLIP_TYPE == "norm" else None
        self.init_stage = InitStageHook(self.cfg.DISTILL.INIT_ITERS, self.cfg.DISTILL.INIT_LR, clip_norm, self.cfg.OUTPUT_DIR)
        return [self.init_stage] + super().build_hooks()  # first: before any other hook's before_train


def check_store(cfg, plan: TeacherPlan | None = None) -> StoreInfo:
    """Refuse a store that was not built for this student's teacher, resize, codec and images.

    plan: the config's resolved TeacherPlan (resolved here when not given).
    """
    path = cfg.DISTILL.CACHE.PATH
    if not Path(path).exists() and "://" not in path:
        raise FileNotFoundError(f"teacher-feature store {path} does not exist: build it first (make cache-teacher)")
    store = TeacherFeatureStore(path, cfg.DISTILL.CACHE.STORAGE_OPTIONS)
    plan = plan or TeacherPlan.from_config(cfg)  # refuses range sampling and crops with the values to change
    _check_sizes(path, store, plan)
    store.check_fingerprint(plan.fingerprint)
    if store.layout.flip == "none" and cfg.INPUT.RANDOM_FLIP != "none":
        raise StoreMismatchError(f"store {path} was built with DISTILL.CACHE.FLIP none (no flipped view), but the "
                                 f"student trains with INPUT.RANDOM_FLIP {cfg.INPUT.RANDOM_FLIP!r}: set INPUT.RANDOM_FLIP "
                                 "none, or rebuild the store with FLIP stored (make cache-teacher OVERWRITE=1 "
                                 "OPTS='DISTILL.CACHE.FLIP stored')")
    dataset = ",".join(cfg.DATASETS.TRAIN)
    if store.dataset != dataset:
        raise StoreMismatchError(f"store {path} was built for dataset {store.dataset!r}, the student trains on {dataset!r}")
    wanted = {d["image_id"] for name in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(name)}
    info = store.info()
    if loss_class(cfg.DISTILL.DISTILL).source != "features" and not store.layout.rpn_anchors:
        raise StoreMismatchError(f"method {cfg.DISTILL.DISTILL!r} distils the teacher's RPN outputs, but store {path} "
                                 "holds none: rebuild it with DISTILL.CACHE.RPN True "
                                 "(make cache-teacher OVERWRITE=1 OPTS='DISTILL.CACHE.RPN True')")
    missing = sorted(wanted - {int(i) for i in store.image_ids})
    if missing:
        raise StoreMismatchError(f"store {path} lacks {len(missing)} training images, e.g. ids {missing[:5]}")
    if not info.complete:
        raise StoreMismatchError(f"store {path} is incomplete ({info.images_done} of {info.images_total} images): "
                                 "resume it with make cache-teacher")
    _apply_bad_entry_policy(cfg.DISTILL.CACHE.ON_BAD_ENTRY, store)
    logger.info("distillation from store %s (fingerprint %s, %d images, codec %s)", path,
                info.fingerprint_sha256[:16], info.images_done, info.codec)
    return info


def _check_sizes(path: str, store: TeacherFeatureStore, plan: TeacherPlan) -> None:
    """Refuse a store that lacks a short edge the student is to distil at, naming it and the two ways out."""
    from pipeline.teacher import rule_sizes

    held = store.layout.sizes or rule_sizes(store.fingerprint.get("resize", {}))  # format 1-2: the fingerprint's
    missing = sorted(set(plan.store_sizes) - set(held))
    if not missing:
        return
    subset = tuple(s for s in plan.train_sizes if s in held)
    alternative = (f", or set DISTILL.CACHE.SIZES {subset} to distil at the stored sizes only (the others train "
                   "without loss_kd)") if subset else ""
    raise StoreMismatchError(f"store {path} holds short edges {list(held)} but lacks {missing}, which the student "
                             f"samples (INPUT.MIN_SIZE_TRAIN {plan.train_sizes}): rebuild it (make cache-teacher "
                             f"OVERWRITE=1){alternative}")


def _apply_bad_entry_policy(policy: str, store: TeacherFeatureStore) -> None:
    """Images unreadable at stage one, or whose side data is damaged: refused up front ("fail") or logged ("skip").

    Damage inside feature chunks shows only when read; the mapper applies the same policy there.
    """
    if policy not in ON_BAD_ENTRY:
        raise ValueError(f"DISTILL.CACHE.ON_BAD_ENTRY={policy!r}; choose one of {ON_BAD_ENTRY}")
    bad = {int(image_id): store.entry_problem(int(image_id)) for image_id in store.image_ids if int(image_id) not in store}
    if not bad:
        return
    listed = "; ".join(f"image {i}: {reason}" for i, reason in list(bad.items())[:5])
    if policy == "fail":
        raise StoreEntryError(f"store {store.path} cannot serve {len(bad)} training images ({listed}). Unreadable "
                              "images: fix the files and rerun make cache-teacher, which retries every image recorded "
                              "unreadable. Damaged entries: rebuild with make cache-teacher OVERWRITE=1. Removing images "
                              "from the dataset changes its image list, which means a full rebuild (OVERWRITE=1) too. Or set "
                              "DISTILL.CACHE.ON_BAD_ENTRY skip to train them without loss_kd (unreadable images are "
                              "left out)")
    logger.warning("store %s cannot serve %d training images; they train without loss_kd or, if unreadable, are left "
                   "out (DISTILL.CACHE.ON_BAD_ENTRY skip): %s", store.path, len(bad), listed)


def _median_iter_seconds(output_dir: str) -> float | None:
    path = Path(output_dir) / "metrics.json"
    if not path.exists():
        return None
    times = [json.loads(line).get("time") for line in path.read_text().splitlines() if line.strip()]
    times = [t for t in times if t is not None]
    return round(statistics.median(times), 4) if times else None


def train_student(cfg, resume: bool = False, store_info: StoreInfo | None = None) -> dict:
    """Check the store, train (or resume) the student to SOLVER.MAX_ITER, evaluate it; return its metrics.

    store_info: check_store's result when the caller has checked the store already.
    Rank 0 also writes the metrics to OUTPUT_DIR/student_metrics.json.
    """
    if cfg.DISTILL.ENABLE:
        loss_class(cfg.DISTILL.DISTILL)  # an unknown method fails here, before any work
        if cfg.DISTILL.SOURCE == "cache" and store_info is None:
            store_info = check_store(cfg, TeacherPlan.from_config(cfg))
    init_log = Path(cfg.OUTPUT_DIR) / INIT_STAGE_FILE
    if not resume:
        init_log.unlink(missing_ok=True)  # a stale log from an earlier run in this folder
    bbox, wall = StudentTrainer.train_and_evaluate(cfg, resume=resume)
    metrics = {
        "method": cfg.DISTILL.DISTILL if cfg.DISTILL.ENABLE else "baseline",
        "B": loss_weight(cfg.DISTILL.DISTILL, cfg.DISTILL.B) if cfg.DISTILL.ENABLE else 0.0,
        "source": cfg.DISTILL.SOURCE if cfg.DISTILL.ENABLE else None,
        "trial": cfg.DISTILL.TRIAL,
        "seed": cfg.SEED,
        "bbox": bbox, "iterations": cfg.SOLVER.MAX_ITER, "wall_seconds": round(wall, 1),
        "seconds_per_iter": _median_iter_seconds(cfg.OUTPUT_DIR),
        "init_stage": json.loads(init_log.read_text()) if init_log.exists() else None,
        "store": {"path": cfg.DISTILL.CACHE.PATH, "fingerprint_sha256": store_info.fingerprint_sha256} if store_info else None,
    }
    if comm.is_main_process():  # evaluation results and the metrics file belong to rank 0
        write_json(Path(cfg.OUTPUT_DIR) / "student_metrics.json", metrics)
    return metrics

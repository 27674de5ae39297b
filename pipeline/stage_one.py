"""Stage one as a library: run the teacher once over the training set and write its FPN features to a store.

The entry point is `python -m pipeline.cache_teacher` (make cache-teacher). The config is the *student's*: its DISTILL node names the teacher (CFG_T, PATH_T) and the
store (DISTILL.CACHE), its INPUT the training resize, its DATASETS.TRAIN the images.
Re-running resumes an interrupted store; a store built for other settings is refused.
Under torchrun (or detectron2's launch with --num-gpus N) each rank writes only its own shards
(shard % world_size == rank); rank 0 creates the store and finalises it (docs/scale-out.md).
"""
from __future__ import annotations

import errno
import logging
import math
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import distributed
from pipeline.losses import DISTILL_LOSS_REGISTRY
from pipeline.plan import TeacherPlan
from pipeline.teacher import TeacherFeatureExtractor, hflip_image, resize_augmentation, rule_sizes
from cache import RPN_OUTPUTS, BackgroundShardWriter, ImageEntry, StoreLayout, TeacherFeatureWriter
from cache.lock import writer_lock
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils import comm

logger = logging.getLogger("pipeline.stage_one")


def training_images(dataset_names) -> list[dict]:
    """The dataset dicts of every training dataset, with unique image ids."""
    dicts, seen = [], set()
    for name in dataset_names:
        for d in DatasetCatalog.get(name):
            if d["image_id"] in seen:
                raise ValueError(f"image id {d['image_id']} appears twice in DATASETS.TRAIN {tuple(dataset_names)}; "
                                 "a store is indexed by image id")
            seen.add(d["image_id"])
            dicts.append(d)
    if not dicts:
        raise ValueError(f"DATASETS.TRAIN {tuple(dataset_names)} holds no images")
    return dicts


class ResizedImages(Dataset):
    """Reads and resizes images in DataLoader workers exactly as the student's mapper will, at every stored size.

    An item holds `images`: {short edge: (orig, hflip) uint8 CHW tensors}; `image` and `image_hflip` are those
    of the first size (all there is for a rule of one size).
    """

    def __init__(self, dicts: list[dict], rows: list[int], rule: dict, input_format: str):
        self.dicts, self.rows, self.format = dicts, rows, input_format
        self.resizes = {size: resize_augmentation(rule, size) for size in rule_sizes(rule)}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        d = self.dicts[row]
        item = {"row": row, "image_id": d["image_id"], "error": None}
        try:
            image = read_image(d["file_name"], format=self.format)
        except Exception as e:  # an unreadable image is recorded in the store, the run goes on
            item["error"] = describe_read_error(e)
            return item
        item["orig_hw"] = tuple(image.shape[:2])
        item["images"] = {}
        for size, resize in self.resizes.items():
            resized = resize.get_transform(image).apply_image(image)
            item["images"][size] = (torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))),
                                    torch.as_tensor(np.ascontiguousarray(hflip_image(resized).transpose(2, 0, 1))))
        item["image"], item["image_hflip"] = next(iter(item["images"].values()))
        return item


# Errors that say nothing about the image itself: the disk, the permissions or the network; they may pass.
_TRANSIENT_ERRNOS = {errno.EIO, errno.EACCES, errno.EPERM, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT,
                     errno.ECONNRESET, errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESTALE}
TRANSIENT_PREFIX = "I/O error (may pass; a rerun of make cache-teacher retries it)"


def describe_read_error(error: BaseException) -> str:
    """The reason recorded for an image that could not be read, telling a passing I/O error from a broken image."""
    transient = isinstance(error, (TimeoutError, ConnectionError)) or (
        isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS)
    reason = f"{type(error).__name__}: {error}"
    return f"{TRANSIENT_PREFIX}: {reason}" if transient else reason


def _padded(hw, divisibility: int) -> tuple[int, int]:
    return tuple(int(math.ceil(v / divisibility) * divisibility) for v in hw)


def rpn_outputs_read() -> tuple[str, ...]:
    """The RPN outputs some registered method distils (kd: "rpn_objectness"): the only ones a store holds."""
    read = {cls.source for _, cls in DISTILL_LOSS_REGISTRY}
    return tuple(output for output in RPN_OUTPUTS if output in read)


def cache_teacher(cfg, overwrite: bool = False, plan: TeacherPlan | None = None) -> dict:
    """Write (or resume) the store at cfg.DISTILL.CACHE.PATH; return the run's summary.

    plan: the config's resolved TeacherPlan (resolved here when not given); everything below reads it.
    Each process holds its rank's writer lock (cache/lock.py) throughout: a second run on the store is refused.
    """
    plan = plan or TeacherPlan.from_config(cfg)
    with writer_lock(cfg.DISTILL.CACHE.PATH, rank=comm.get_rank()):
        return _cache_teacher_locked(cfg, overwrite, plan)


def _cache_teacher_locked(cfg, overwrite: bool, plan: TeacherPlan) -> dict:
    rule = plan.resize
    dataset = ",".join(plan.datasets)
    dicts = training_images(plan.datasets)
    fingerprint = plan.fingerprint
    extractor = TeacherFeatureExtractor.from_config(plan, rpn=plan.rpn, rpn_outputs=rpn_outputs_read())
    if len(set(extractor.channels)) != 1:
        raise ValueError(f"the store needs one channel count for every level; the teacher has {extractor.channels}")
    sizes = plan.store_sizes
    max_side = _padded((max(rule["max_size"], *sizes),) * 2, extractor.size_divisibility)
    layout = StoreLayout(
        levels=tuple(extractor.levels), strides=tuple(extractor.strides), channels=extractor.channels[0],
        codec=plan.codec, flip=plan.flip, max_hw=max_side, sizes=sizes,
        shard_images=cfg.DISTILL.CACHE.SHARD_IMAGES, tile=cfg.DISTILL.CACHE.TILE, rpn_anchors=extractor.rpn_anchors,
        rpn_outputs=extractor.rpn_outputs,
    )
    def open_writer(overwrite: bool) -> TeacherFeatureWriter:
        return TeacherFeatureWriter.open(cfg.DISTILL.CACHE.PATH, layout, [d["image_id"] for d in dicts], dataset,
                                         fingerprint, overwrite=overwrite, storage_options=cfg.DISTILL.CACHE.STORAGE_OPTIONS)

    # Rank 0 creates (or checks) the store and its metadata; then every rank opens it and takes its own
    # shards, so each zarr shard has exactly one writing process (zarr does no locking).
    rank, world = comm.get_rank(), comm.get_world_size()
    writer = open_writer(overwrite) if rank == 0 else None
    comm.synchronize()
    writer = writer or open_writer(False)
    shards = writer.pending_shards(rank, world)
    rows = [r for s in shards for r in writer.shard_rows(s)]
    logger.info("store %s: %d of %d shards to write (%d images) on rank %d of %d, codec %s, flip %s, short edges %s",
                cfg.DISTILL.CACHE.PATH, len(shards), writer.num_shards, len(rows), rank, world, layout.codec, layout.flip,
                list(sizes))
    # Pinned on a GPU, so the teacher's non-blocking copy of each image overlaps its compute.
    loader = DataLoader(ResizedImages(dicts, rows, rule, plan.input_format), batch_size=None, shuffle=False,
                        num_workers=cfg.DATALOADER.NUM_WORKERS, pin_memory=extractor.device.type == "cuda")
    flips = layout.flip_views
    start = time.perf_counter()
    infer_seconds, failed, bytes_written = 0.0, {}, 0
    bar = tqdm(total=len(rows), unit="img", desc="cache-teacher", dynamic_ncols=True, disable=rank != 0)
    pending: list[ImageEntry] = []
    shard_iter = iter(shards)
    current = next(shard_iter, None)
    with BackgroundShardWriter(writer, max_pending=cfg.DISTILL.CACHE.WRITE_QUEUE) as background:
        for item in loader:
            if item["error"] is not None:
                failed[int(item["image_id"])] = item["error"]
                logger.warning("image %s not read: %s", item["image_id"], item["error"])
                entry = ImageEntry(int(item["image_id"]), (0, 0), (0, 0), (0, 0), None, item["error"])
            else:
                t0 = time.perf_counter()
                features, resized = {}, {}
                for size, (orig, hflip) in item["images"].items():  # every (size, flip) view of the image
                    resized[size] = tuple(orig.shape[-2:])
                    for view in flips:
                        out = extractor(orig if view == "orig" else hflip)
                        features[(size, view)] = {k: v.float().cpu().numpy() for k, v in out.items()}
                infer_seconds += time.perf_counter() - t0
                entry = ImageEntry(int(item["image_id"]), tuple(item["orig_hw"]), resized,
                                   {s: _padded(hw, extractor.size_divisibility) for s, hw in resized.items()}, features)
            pending.append(entry)
            bar.update(1)
            if len(pending) == len(writer.shard_rows(current)):
                background.submit(current, pending)
                pending, current = [], next(shard_iter, None)
                bytes_written = background.bytes_written
                bar.set_postfix_str(f"{bytes_written / 2**20:.1f} MB written")
    bar.close()
    # Every rank's shards are written once all have reached here; counts are summed over ranks.
    ranks = distributed.all_gather({"images": len(rows), "failed": len(failed), "teacher_seconds": infer_seconds})
    wall = time.perf_counter() - start
    if rank != 0:
        return {"images_written": len(rows), "images_failed_this_run": len(failed), "rank": rank}
    images = sum(r["images"] for r in ranks)
    infer_seconds = sum(r["teacher_seconds"] for r in ranks)
    from cache import TeacherFeatureStore

    info = TeacherFeatureStore(cfg.DISTILL.CACHE.PATH, cfg.DISTILL.CACHE.STORAGE_OPTIONS).info(disk_usage=True)
    summary = {
        "images_written": images, "images_total": info.images_total,
        "images_failed_this_run": sum(r["failed"] for r in ranks), "processes": world,
        "bytes_on_disk": info.bytes_on_disk, "bytes_per_image": info.bytes_per_image,
        "ratio_vs_fp32": info.ratio_vs_fp32, "wall_seconds": round(wall, 2),
        "teacher_seconds": round(infer_seconds, 2),  # summed over processes
        "images_per_second": round(images / wall, 3) if wall > 0 else None,
        "teacher_images_per_second": round(images / infer_seconds, 3) if infer_seconds > 0 else None,
        "codec": layout.codec, "flip": layout.flip, "sizes": list(sizes), "views": layout.num_views,
        "path": cfg.DISTILL.CACHE.PATH,
        "failed_this_run": {str(k): v for k, v in failed.items()},  # image id -> why it was unreadable
    }
    writer.finalize(summary)
    per_image = (f"{summary['bytes_per_image'] / 2**10:.1f} KiB/image, {summary['ratio_vs_fp32']:.2f}x smaller than fp32"
                 if summary["bytes_per_image"] else "no image stored")
    print(f"cache-teacher: {summary['images_written']} images written ({summary['images_total']} in store, "
          f"{summary['images_failed_this_run']} unreadable), {summary['bytes_on_disk'] / 2**20:.1f} MB on disk, {per_image}, "
          f"{wall:.1f} s -> {cfg.DISTILL.CACHE.PATH}")
    return summary

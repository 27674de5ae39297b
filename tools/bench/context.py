"""What the sections share: the bench's data sets, student configs, teacher passes, stores and loss_kd helpers.

`ctx` is one dict per invocation: ctx["plan"] (spec.PLANS), ctx["teacher_weights"], ctx["datasets"]
(size -> registered dataset name), and what sections leave for later ones (ctx["fp32"][size]: the
teacher's float32 features per image id and view; ctx["stores_ready"]; ctx["loss_batches"]).
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import datasets as _datasets  # noqa: F401  (registers embedded_*)
from pipeline.config import get_distill_cfg
from pipeline.datasets import register_coco_format
from pipeline.distiller import instance_boxes
from pipeline.losses import METHODS, build_distill_loss, loss_class
from pipeline.mapper import DistillDatasetMapper
from pipeline.stage_one import ResizedImages, cache_teacher, training_images
from pipeline.teacher import TeacherFeatureExtractor, load_teacher_cfg, store_resize
from cache import StoreMismatchError
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tools.bench.spec import CODEC_NAMES, COCO_HW, COCO_RESIZE

STUDENT_CFG = "configs/embedded/student_R50_FPN.yaml"
COCO_STUDENT_CFG = "configs/coco/student_R50_FPN_1x.yaml"
TEACHER_WEIGHTS = "output/embedded/teacher/model_final.pth"
BENCH_DIR = Path("output/bench")
STORES = BENCH_DIR / "stores"
COCO_DIR = BENCH_DIR / "coco_size"

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:7.1f} s] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - _T0


def median(values) -> float:
    return float(statistics.median(values))


def cpu_seconds() -> float:
    """CPU seconds (user + system, all threads) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b != 0 else (0.0 if a == b else math.inf)


# ---------------------------------------------------------------------------------------- set-up


def wait_for_teacher(path: str = TEACHER_WEIGHTS, poll_s: float = 30.0, timeout_s: float = 4 * 3600,
                     settle_s: float = 10.0) -> None:
    """Wait (polling every 30 s) until the trained teacher's weights exist and have not changed for settle_s
    (a copy or a checkpoint being written is not read half-way)."""
    waited = 0.0
    last = None
    while True:
        stat = os.stat(path) if os.path.exists(path) else None
        now = (stat.st_size, stat.st_mtime_ns) if stat else None
        if stat and stat.st_size > 0 and now == last and time.time() - stat.st_mtime >= settle_s:
            return
        if stat is None:
            log(f"waiting for {path} (make teacher) ...")
        last = now
        if waited > timeout_s:
            raise TimeoutError(f"{path} did not appear within {timeout_s / 3600:.1f} h: run make teacher")
        step = poll_s if stat is None else settle_s
        time.sleep(step)
        waited += step


def machine_info() -> dict:
    """The machine: CPU model, cores, RAM, torch version, GPU presence, date (date -u), load average."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        date = time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime())
    return {
        "date_utc": date, "cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram_gib,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU",
        "python": platform.python_version(), "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }


def register_embedded_subset(name: str, every: int) -> list[int]:
    """Register `name` as every `every`-th image of embedded_train (by image id); return its ids."""
    full = sorted(DatasetCatalog.get("embedded_train"), key=lambda d: d["image_id"])
    subset = full[::every]
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: copy.deepcopy(subset))
        MetadataCatalog.get(name).set(thing_classes=MetadataCatalog.get("embedded_train").thing_classes,
                                      evaluator_type="coco")
    return [d["image_id"] for d in subset]


def make_coco_size_dataset(n_images: int) -> str:
    """Write n embedded train images upscaled to 1088x800 (boxes scaled) as a COCO-format dataset; register it."""
    from PIL import Image

    name = f"bench_coco_size_{n_images}"
    src = json.loads((_datasets.embedded_root() / "annotations" / "instances_train.json").read_text())
    anns = {}
    for a in src["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    # landscape images with objects, aspect close to 1088/800, so the upscale barely distorts them
    picked = [im for im in sorted(src["images"], key=lambda im: im["id"])
              if im["id"] in anns and 1.3 <= im["width"] / im["height"] <= 1.5][:n_images]
    if len(picked) < n_images:
        raise RuntimeError(f"only {len(picked)} landscape embedded train images with objects; need {n_images}")
    h_new, w_new = COCO_HW
    image_dir = COCO_DIR / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for im in picked:
        sx, sy = w_new / im["width"], h_new / im["height"]
        out_name = f"{im['id']:06d}.jpg"
        with Image.open(_datasets.embedded_root() / "train" / im["file_name"]) as pil:
            pil.convert("RGB").resize((w_new, h_new), Image.BILINEAR).save(image_dir / out_name, quality=95)
        images.append({"id": im["id"], "file_name": out_name, "width": w_new, "height": h_new})
        for a in anns[im["id"]]:
            x, y, w, h = a["bbox"]
            annotations.append({**a, "bbox": [x * sx, y * sy, w * sx, h * sy], "area": a["area"] * sx * sy})
    json_file = COCO_DIR / f"annotations_{n_images}.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": src["categories"]}))
    register_coco_format(name, str(json_file), str(image_dir))
    return name


def student_cfg(size: str, ctx: dict, mode: str = "cached", codec: str = "fp16", extra=(), dataset: str | None = None):
    """The embedded student config at `size` ("embedded", or "coco": the 800/1333 resize, 2 images per batch);
    mode plain (DISTILL.ENABLE False), cached (store) or live."""
    opts = ["MODEL.DEVICE", "cpu", "DISTILL.PATH_T", ctx.get("teacher_weights", TEACHER_WEIGHTS),
            "DISTILL.DISTILL", "hint", "DISTILL.CACHE.CODEC", codec,
            "DISTILL.CACHE.PATH", str(STORES / f"{size}_{codec}.zarr"), "DISTILL.CACHE.FLIP", "stored",
            "DISTILL.CACHE.RPN", False, "DATASETS.TRAIN", (dataset or ctx["datasets"][size],),
            "OUTPUT_DIR", str(BENCH_DIR / "tmp")]
    if ctx.get("teacher_cfg"):  # the config the teacher was trained with (GN vs BN must match its weights)
        opts += ["DISTILL.CFG_T", ctx["teacher_cfg"]]
    if size == "coco":
        opts += ["INPUT.MIN_SIZE_TRAIN", (COCO_RESIZE[0],), "INPUT.MAX_SIZE_TRAIN", COCO_RESIZE[1],
                 "INPUT.MIN_SIZE_TEST", COCO_RESIZE[0], "INPUT.MAX_SIZE_TEST", COCO_RESIZE[1],
                 "SOLVER.IMS_PER_BATCH", 2]
    if mode == "plain":
        opts += ["DISTILL.ENABLE", False]
    elif mode == "live":
        opts += ["DISTILL.SOURCE", "live"]
    elif mode != "cached":
        raise ValueError(f"student mode {mode!r}; choose plain, cached or live")
    return get_distill_cfg(STUDENT_CFG, opts + list(extra))


# ---------------------------------------------------------------------------------------- teacher passes, stores


def resized_items(cfg) -> list[dict]:
    """The training images of cfg, read and resized exactly as cache_teacher's loader does (both views)."""
    dicts = training_images(cfg.DATASETS.TRAIN)
    ds = ResizedImages(dicts, list(range(len(dicts))), store_resize(cfg), load_teacher_cfg(cfg).INPUT.FORMAT)
    return [ds[i] for i in range(len(ds))]


def teacher_alone_pass(extractor: TeacherFeatureExtractor, items: list[dict], keep: bool = False):
    """Seconds of teacher inference alone over every image and both views (orig, hflip) of `items`.

    Returns (total seconds, per-image seconds, {image_id: {view: {level: float32 tensor}}} when keep,
    process CPU seconds).
    """
    per_image, features = [], {}
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    for item in items:
        t0 = time.perf_counter()
        out = {"orig": extractor(item["image"]), "hflip": extractor(item["image_hflip"])}
        per_image.append(time.perf_counter() - t0)
        if keep:
            features[int(item["image_id"])] = {v: {k: t.float().clone() for k, t in f.items()} for v, f in out.items()}
    cpu = cpu_seconds() - cpu0
    log(f"  teacher alone: process CPU / wall {cpu / (time.perf_counter() - wall0):.2f}")
    return sum(per_image), per_image, features, cpu


def ensure_fp32(size: str, ctx: dict) -> None:
    """The teacher's float32 features of every bench image and view in ctx["fp32"][size] (a teacher pass
    when stage one did not run in this invocation)."""
    if size in ctx.get("fp32", {}):
        return
    cfg = student_cfg(size, ctx)
    extractor = TeacherFeatureExtractor.from_config(cfg)
    log(f"fp32 teacher features, {size} (stage one is not among the sections)")
    ctx.setdefault("fp32", {})[size] = teacher_alone_pass(extractor, resized_items(cfg), keep=True)[2]
    del extractor
    gc.collect()


def ensure_stores(size: str, ctx: dict) -> None:
    """Every codec's bench store at `size`, complete: resumed (a no-op when done) or rebuilt when stale."""
    for codec in CODEC_NAMES:
        key = (size, codec)
        if key in ctx.setdefault("stores_ready", set()):
            continue
        cfg = student_cfg(size, ctx, codec=codec)
        try:
            cache_teacher(cfg, overwrite=False)
        except StoreMismatchError:
            cache_teacher(cfg, overwrite=True)
        ctx["stores_ready"].add(key)


# ---------------------------------------------------------------------------------------- loss_kd


def feature_methods() -> list[str]:
    """The registered methods that compare FPN features image by image (kd reads RPN outputs, crd a memory bank)."""
    return [m for m in METHODS if loss_class(m).source == "features" and not loss_class(m).needs_image_index]


def student_features(model, batch) -> dict:
    """The student's FPN outputs on `batch` (train mode, no grad), as DistillRCNN captures them."""
    captured = {}
    handle = model.backbone.register_forward_hook(lambda m, i, o: captured.update(o))
    with EventStorage(0), torch.no_grad():
        model(batch)
    handle.remove()
    return captured


def method_loss_sizes(model, captured: dict, teacher_channels: int) -> dict:
    """The channel counts a method's loss is built with, as DistillRCNN builds it for the bench's distiller."""
    level = model.distiller.levels[0]
    # The bench's distiller was built for hint: where it has connectors, losses see teacher-width students.
    student_channels = teacher_channels if model.distiller.connectors else captured[level].shape[1]
    return {"student_channels": student_channels, "teacher_channels": teacher_channels,
            "num_levels": len(model.distiller.levels)}


def build_method(model, method: str, sizes_of: dict) -> None:
    """Put `method`'s loss in the bench student's distiller, its trainable parts seeded alike in every run."""
    torch.manual_seed(0)
    model.distiller.loss = build_distill_loss(method, **sizes_of)


def kd_losses(model, captured, sizes, teacher_lists: dict, boxes=None) -> dict:
    """loss_kd per feature method for each named list of per-image teacher features (same student features;
    boxes: the batch's instance_boxes, for the methods that split by ground-truth boxes)."""
    out = {}
    level = model.distiller.levels[0]
    teacher_channels = next(iter(teacher_lists.values()))[0][level].shape[0]
    sizes_of = method_loss_sizes(model, captured, teacher_channels)
    for method in feature_methods():
        build_method(model, method, sizes_of)
        with torch.no_grad():
            out[method] = {name: float(model.distiller(captured, feats, sizes, boxes=boxes))
                           for name, feats in teacher_lists.items()}
    return out


def loss_batches(size: str, ctx: dict, n_batches: int) -> dict:
    """The first n_batches x IMS_PER_BATCH images of the size's dataset (by id) through the training mapper
    (seeded flips), and a seeded untrained student's FPN features on each batch: the inputs of every
    loss_kd comparison of this run."""
    if size in ctx.setdefault("loss_batches", {}):
        return ctx["loss_batches"][size]
    ensure_fp32(size, ctx)
    cfg = student_cfg(size, ctx)
    mapper = DistillDatasetMapper(student_cfg(size, ctx, mode="plain"), True)  # reads no store
    dicts = sorted(DatasetCatalog.get(cfg.DATASETS.TRAIN[0]), key=lambda d: d["image_id"])
    per = cfg.SOLVER.IMS_PER_BATCH
    torch.manual_seed(0)
    model = build_model(cfg).train()
    np.random.seed(0)
    batches = []
    for b in range(min(n_batches, len(dicts) // per)):
        batch, flips = [], []
        for d in dicts[b * per:(b + 1) * per]:
            batch.append(mapper(copy.deepcopy(d)))
            flips.append(any(isinstance(t, T.HFlipTransform) for t in mapper.augmentations.last.transforms))
            batch[-1]["teacher_features"] = ctx["fp32"][size][int(d["image_id"])]["hflip" if flips[-1] else "orig"]
        batches.append({"captured": student_features(model, batch), "flips": flips,
                        "sizes": [tuple(x["image"].shape[-2:]) for x in batch], "boxes": instance_boxes(batch),
                        "image_ids": [int(x["image_id"]) for x in batch]})
    ctx["loss_batches"][size] = {"model": model, "batches": batches}
    return ctx["loss_batches"][size]


def loss_kd_deviation(size: str, ctx: dict, n_batches: int, decoders: dict) -> dict:
    """Per decoder name and method: the largest relative deviation of loss_kd over the loss batches, with
    teacher features from decoders[name](image_id, view) against the fp32 teacher features."""
    feats = ctx["fp32"][size]
    lb = loss_batches(size, ctx, n_batches)
    worst: dict = {name: {} for name in decoders}
    fp32_values: dict = {}
    for batch in lb["batches"]:
        views = ["hflip" if f else "orig" for f in batch["flips"]]
        lists = {"fp32": [feats[i][v] for i, v in zip(batch["image_ids"], views)]}
        for name, decode in decoders.items():
            lists[name] = [decode(i, v) for i, v in zip(batch["image_ids"], views)]
        losses = kd_losses(lb["model"], batch["captured"], batch["sizes"], lists, batch["boxes"])
        for m, v in losses.items():
            fp32_values.setdefault(m, []).append(v["fp32"])
            for name in decoders:
                worst[name][m] = max(worst[name].get(m, 0.0), rel(v[name], v["fp32"]))
    return {"rel_dev": worst, "loss_kd_fp32": fp32_values,
            "batches": [{"image_ids": b["image_ids"], "flipped": b["flips"]} for b in lb["batches"]]}

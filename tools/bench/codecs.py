"""Codecs: bytes per image, error per level and loss_kd deviation of each codec's store, at both bench sizes."""
from __future__ import annotations

import math

from cache import TeacherFeatureStore

from tools.bench.context import STORES, ensure_fp32, ensure_stores, log, loss_kd_deviation
from tools.bench.spec import CODEC_NAMES, COCO_TRAIN2017_IMAGES, SIZES


def measure_codecs(size: str, ctx: dict, n_batches: int) -> dict:
    """Per codec: bytes/image on disk, ratio vs fp32, projected COCO train2017 size, per-level feature
    error vs the fp32 teacher output, and per method the loss_kd deviation (store vs fp32 features), the
    largest over n_batches batches."""
    ensure_fp32(size, ctx)
    ensure_stores(size, ctx)
    feats = ctx["fp32"][size]
    out = {}
    stores = {codec: TeacherFeatureStore(str(STORES / f"{size}_{codec}.zarr")) for codec in CODEC_NAMES}
    for codec, store in stores.items():
        info = store.info(disk_usage=True)
        levels = {lv: {"sq_err": 0.0, "sq_ref": 0.0, "max_abs": 0.0} for lv in store.layout.levels}
        for image_id, views in feats.items():
            for view, ref in views.items():
                dec = store.read(image_id, flip=(view == "hflip"))
                for lv, r in ref.items():
                    d = dec[lv] - r
                    levels[lv]["sq_err"] += float((d.double() ** 2).sum())
                    levels[lv]["sq_ref"] += float((r.double() ** 2).sum())
                    levels[lv]["max_abs"] = max(levels[lv]["max_abs"], float(d.abs().max()))
        out[codec] = {
            "bytes_per_image": info.bytes_per_image, "raw_fp32_bytes_per_image": info.raw_fp32_bytes / info.images_done,
            "ratio_vs_fp32": info.ratio_vs_fp32, "views_stored": len(store.layout.views), "images": info.images_done,
            "levels": {lv: {"rel_l2": math.sqrt(v["sq_err"] / v["sq_ref"]), "max_abs": v["max_abs"]} for lv, v in levels.items()},
        }
        if size == "coco":
            out[codec]["projected_coco_train2017_bytes"] = info.bytes_per_image * COCO_TRAIN2017_IMAGES
    decoders = {codec: (lambda i, v, store=store: store.read(i, flip=(v == "hflip"))) for codec, store in stores.items()}
    dev = loss_kd_deviation(size, ctx, n_batches, decoders)
    for codec in CODEC_NAMES:
        out[codec]["loss_kd_rel_dev"] = dev["rel_dev"][codec]
    out["loss_batch"] = {"image_ids": [i for b in dev["batches"] for i in b["image_ids"]], "batches": dev["batches"],
                         "loss_kd_fp32": dev["loss_kd_fp32"]}
    return out


def run(ctx: dict, results: dict) -> None:
    log("codecs")
    results["codecs"] = {size: measure_codecs(size, ctx, ctx["plan"]["loss_batches"][size]) for size in SIZES}

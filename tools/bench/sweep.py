"""Sweep economics: N runs with the live teacher vs stage one once + N cached runs, projected from measured parts."""
from __future__ import annotations

from pipeline.config import get_distill_cfg
from pipeline.losses import METHODS
from detectron2.data import DatasetCatalog

from tools.bench.context import COCO_STUDENT_CFG, STUDENT_CFG
from tools.bench.spec import COCO_TRAIN2017_IMAGES


def sweep_economics(results: dict, ctx: dict) -> dict:
    """Wall time of N distillation runs with the live teacher vs stage one once + N cached runs.

    A projection from parts measured in this run: the median live and cached step (section 1) and the
    seconds per image of cache_teacher with the config's codec (section 2, both views). Embedded: the
    embedded default's schedule (its MAX_ITER, IMS_PER_BATCH, embedded_train). COCO size: the COCO 1x
    schedule (configs/coco: MAX_ITER x IMS_PER_BATCH) over train2017, the step scaled per image from the
    bench's batch (an assumption: step time proportional to the batch).
    """
    emb_cfg = get_distill_cfg(STUDENT_CFG)
    coco_cfg = get_distill_cfg(COCO_STUDENT_CFG)
    schedules = {
        "embedded": {"iters": emb_cfg.SOLVER.MAX_ITER, "batch": emb_cfg.SOLVER.IMS_PER_BATCH,
                     "images": len(DatasetCatalog.get("embedded_train")), "codec": emb_cfg.DISTILL.CACHE.CODEC},
        "coco": {"iters": coco_cfg.SOLVER.MAX_ITER, "batch": coco_cfg.SOLVER.IMS_PER_BATCH,
                 "images": COCO_TRAIN2017_IMAGES, "codec": coco_cfg.DISTILL.CACHE.CODEC},
    }
    out = {}
    for size, sched in schedules.items():
        steps, stage = results["student_step"][size], results["stage_one"][size]
        codec = sched["codec"] if sched["codec"] in stage["codecs"] else "fp16"
        per_batch = sched["batch"] / steps["ims_per_batch"]  # 1 at the embedded size
        live_step = steps["modes"]["live"]["total_s"] * per_batch
        cached_step = steps["modes"]["cached"]["total_s"] * per_batch
        stage_one_s = sched["images"] / stage["codecs"][codec]["cache_images_per_s"]
        saved_per_run = sched["iters"] * (live_step - cached_step)
        rows = {}
        for n in sorted({1, 3, len(METHODS)}):
            live = n * sched["iters"] * live_step
            cached = stage_one_s + n * sched["iters"] * cached_step
            rows[n] = {"live_s": live, "cache_once_s": cached, "live_over_cached": live / cached}
        out[size] = {**sched, "codec": codec, "live_step_s": live_step, "cached_step_s": cached_step,
                     "stage_one_s": stage_one_s, "saved_per_run_s": saved_per_run,
                     "break_even_runs": stage_one_s / saved_per_run if saved_per_run > 0 else None,
                     "runs": rows, "projected": True}
    return out


def run(ctx: dict, results: dict) -> None:
    results["sweep"] = sweep_economics(results, ctx)

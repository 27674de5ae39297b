"""Stage one: images/s of the teacher alone vs the whole cache_teacher per codec, and the writer's cost alone."""
from __future__ import annotations

import gc
import math
import shutil
import time
from pathlib import Path

from pipeline.stage_one import cache_teacher
from pipeline.teacher import TeacherFeatureExtractor
from cache import TeacherFeatureStore

from tools.bench.context import (STORES, cpu_seconds, log, median, resized_items, student_cfg,
                                 teacher_alone_pass)
from tools.bench.spec import CODEC_NAMES, SIZES


def cache_teacher_run(cfg) -> dict:
    """One full stage-one run (cache_teacher with overwrite): its own summary (wall = inference+compression+write)."""
    summary = cache_teacher(cfg, overwrite=True)
    return {"images": summary["images_written"], "wall_s": summary["wall_seconds"],
            "images_per_s": summary["images_per_second"], "inference_s": summary["teacher_seconds"],
            "inference_images_per_s": summary["teacher_images_per_second"]}


def stage_one_variants(size: str, ctx: dict, shard1: bool) -> dict:
    """The cache_teacher runs of stage one: each codec with the config's shard size (16 images); with
    shard1 (COCO size), also fp16 with one image per shard, so that writes overlap inference."""
    variants = {codec: student_cfg(size, ctx, codec=codec) for codec in CODEC_NAMES}
    if shard1:
        variants["fp16, 1 img/shard"] = student_cfg(size, ctx, codec="fp16", extra=[
            "DISTILL.CACHE.SHARD_IMAGES", 1, "DISTILL.CACHE.PATH", str(STORES / f"{size}_fp16_shard1.zarr")])
    return variants


def measure_stage_one(size: str, ctx: dict, rounds: int, shard1: bool = False) -> dict:
    """Images/s of the teacher alone vs full cache_teacher (each codec), alternated over `rounds` rounds.

    A warm-up teacher pass (one image) comes first. The last teacher-alone pass keeps its float32
    features for the codec and flip sections. Each codec's store is left at output/bench/stores/.
    """
    cfg = student_cfg(size, ctx)
    extractor = TeacherFeatureExtractor.from_config(cfg)
    items = resized_items(cfg)
    n = len(items)
    variants = stage_one_variants(size, ctx, shard1)
    log(f"stage one, {size}: {n} images x 2 views, {rounds} round(s) of [teacher alone, "
        + ", ".join(f"cache {v}" for v in variants) + "]")
    teacher_alone_pass(extractor, items[:1])  # warm-up
    alone, runs = [], {v: [] for v in variants}
    per_image, alone_cpu = [], []
    for r in range(rounds):
        total, per, feats, cpu = teacher_alone_pass(extractor, items, keep=(r == rounds - 1))
        alone.append(total)
        alone_cpu.append(cpu / n)
        per_image += per
        if feats:
            ctx.setdefault("fp32", {})[size] = feats
        log(f"  teacher alone: {n / total:.3f} img/s ({total:.1f} s)")
        for name, vcfg in variants.items():
            run = cache_teacher_run(vcfg)
            runs[name].append(run)
            log(f"  cache_teacher {name}: {run['images_per_s']:.3f} img/s (wall {run['wall_s']:.1f} s, "
                f"inference inside {run['inference_s']:.1f} s)")
    del extractor
    gc.collect()
    alone_rate = n / median(alone)
    result = {"images": n, "views": 2, "rounds": rounds, "teacher_alone_pass_s": alone,
              "teacher_alone_images_per_s": alone_rate,
              "teacher_alone_median_image_s": median(per_image), "teacher_alone_cpu_s_per_image": median(alone_cpu),
              "codecs": {}}
    for name, vcfg in variants.items():
        wall = median([r["wall_s"] for r in runs[name]])
        inference = median([r["inference_s"] for r in runs[name]])
        rate = n / wall
        result["codecs"][name] = {
            "codec": vcfg.DISTILL.CACHE.CODEC, "shard_images": vcfg.DISTILL.CACHE.SHARD_IMAGES,
            "shards": math.ceil(n / vcfg.DISTILL.CACHE.SHARD_IMAGES),
            "runs": runs[name], "cache_images_per_s": rate, "ratio": rate / alone_rate,
            "inference_inside_s": inference, "overhead_s": wall - inference,
            "inference_inside_images_per_s": n / inference,
        }
        if name not in CODEC_NAMES:
            shutil.rmtree(vcfg.DISTILL.CACHE.PATH, ignore_errors=True)
            Path(vcfg.DISTILL.CACHE.PATH.rstrip("/") + ".summary.json").unlink(missing_ok=True)
    return result


def measure_write_cost(size: str, ctx: dict) -> dict:
    """Seconds per image to encode+compress+write one shard, alone (no inference), per codec.

    Writes the kept fp32 features into a scratch store with TeacherFeatureWriter.write_shard; this is the
    work cache_teacher's background thread does while the teacher runs.
    """
    from cache import ImageEntry, StoreLayout, TeacherFeatureWriter

    feats = ctx["fp32"][size]
    cfg = student_cfg(size, ctx)
    store = TeacherFeatureStore(cfg.DISTILL.CACHE.PATH)
    ids = sorted(feats)
    out = {}
    for codec in CODEC_NAMES:
        layout = StoreLayout(**{**store.layout.__dict__, "codec": codec, "shard_images": len(ids)})
        path = STORES / f"scratch_{size}_{codec}.zarr"
        writer = TeacherFeatureWriter.open(str(path), layout, ids, "scratch", {"bench": "scratch"}, overwrite=True)
        entries = []
        for i in ids:
            s = store.sizes(i)
            entries.append(ImageEntry(i, s["orig_hw"], s["resized_hw"], s["padded_hw"],
                                      {v: {k: t.numpy() for k, t in f.items()} for v, f in feats[i].items()}))
        c0, t0 = cpu_seconds(), time.perf_counter()
        writer.write_shard(0, entries)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        out[codec] = {"seconds_per_image": seconds / len(ids), "cpu_seconds_per_image": cpu / len(ids),
                      "images": len(ids)}
        shutil.rmtree(path, ignore_errors=True)
    return out


def run(ctx: dict, results: dict) -> None:
    plan = ctx["plan"]
    results["stage_one"], results["write_cost"] = {}, {}
    for size in SIZES:
        results["stage_one"][size] = measure_stage_one(size, ctx, plan["stage_one_rounds"][size],
                                                       shard1=plan["shard1_variant"] and size == "coco")
        ctx.setdefault("stores_ready", set()).update((size, c) for c in CODEC_NAMES)
        results["write_cost"][size] = measure_write_cost(size, ctx)

"""Parity: loss_kd from the store (fp16, int8) vs the live teacher, one batch of the real train loader."""
from __future__ import annotations

import gc

import numpy as np
import torch

from pipeline.distiller import instance_boxes
from pipeline.stage_two import StudentTrainer
from pipeline.teacher import TeacherFeatureExtractor
from pipeline.teacher_source import CachedTeacher, LiveTeacher
from detectron2.modeling import build_model

from tools.bench.context import ensure_stores, kd_losses, log, rel, student_cfg, student_features
from tools.bench.spec import CODEC_NAMES


def measure_parity(ctx: dict) -> dict:
    """Cached fp16 vs live and int8 vs live loss_kd per method, one batch of the real embedded train loader,
    the real trained teacher (as tests/pipeline/test_parity.py, with the R101 instead of the tiny R18)."""
    cfgs = {codec: student_cfg("embedded", ctx, codec=codec) for codec in CODEC_NAMES}
    batches = {}
    for codec, cfg in cfgs.items():
        np.random.seed(7)
        loader = StudentTrainer.build_train_loader(cfg)
        it = iter(loader)
        torch.manual_seed(7)
        batches[codec] = next(it)
        getattr(it, "close", lambda: None)()
        del it, loader
    fp16, int8 = batches["fp16"], batches["int8"]
    same = [int(x["image_id"]) for x in fp16] == [int(x["image_id"]) for x in int8] and all(
        torch.equal(a["image"], b["image"]) for a, b in zip(fp16, int8))
    if not same:
        raise RuntimeError("the fp16 and int8 loaders gave different batches despite equal seeds")
    torch.manual_seed(0)
    model = build_model(cfgs["fp16"]).train()
    captured = student_features(model, fp16)
    sizes = [tuple(x["image"].shape[-2:]) for x in fp16]
    live = LiveTeacher(TeacherFeatureExtractor.from_config(cfgs["fp16"]), cfgs["fp16"].INPUT.FORMAT)(fp16, torch.device("cpu"))
    lists = {"live": live, "fp16": CachedTeacher()(fp16, torch.device("cpu")), "int8": CachedTeacher()(int8, torch.device("cpu"))}
    losses = kd_losses(model, captured, sizes, lists, instance_boxes(fp16))
    out = {"image_ids": [int(x["image_id"]) for x in fp16], "methods": {}}
    for m, v in losses.items():
        out["methods"][m] = {"live": v["live"], "fp16": v["fp16"], "int8": v["int8"],
                             "fp16_rel_dev": rel(v["fp16"], v["live"]), "int8_rel_dev": rel(v["int8"], v["live"])}
    out["fp16_max_rel_dev"] = max(v["fp16_rel_dev"] for v in out["methods"].values())
    out["int8_max_rel_dev"] = max(v["int8_rel_dev"] for v in out["methods"].values())
    del model
    gc.collect()
    return out


def run(ctx: dict, results: dict) -> None:
    log("parity")
    ensure_stores("embedded", ctx)
    results["parity"] = measure_parity(ctx)

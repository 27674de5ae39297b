"""Flip: how far mirroring the teacher's features is from the teacher's features of the mirrored image."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from pipeline.teacher import TeacherFeatureExtractor, hflip_image, load_teacher_cfg, resize_augmentation, store_resize
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image

from tools.bench.context import ensure_fp32, log, student_cfg
from tools.bench.spec import SIZES


def _flip_stats(pairs) -> dict:
    """Per level: pooled relative L2 of flip(f(x)) vs f(flip(x)), and mean/min per-image cosine similarity."""
    acc = {}
    for fx, fflip in pairs:
        for lv in fx:
            mirrored, ref = torch.flip(fx[lv], dims=[-1]).double(), fflip[lv].double()
            a = acc.setdefault(lv, {"sq_err": 0.0, "sq_ref": 0.0, "cos": []})
            a["sq_err"] += float(((mirrored - ref) ** 2).sum())
            a["sq_ref"] += float((ref ** 2).sum())
            a["cos"].append(float(torch.nn.functional.cosine_similarity(mirrored.flatten(), ref.flatten(), dim=0)))
    return {lv: {"rel_l2": math.sqrt(a["sq_err"] / a["sq_ref"]), "cos_mean": float(np.mean(a["cos"])),
                 "cos_min": float(np.min(a["cos"])), "images": len(a["cos"])} for lv, a in acc.items()}


def measure_flip(ctx: dict, n_val: int) -> dict:
    """Mirror vs stored flip with the trained teacher: embedded val images (read, resized as in training) and
    the COCO-size images (their fp32 orig/hflip features from stage one)."""
    cfg = student_cfg("embedded", ctx)
    extractor = TeacherFeatureExtractor.from_config(cfg)
    resize = resize_augmentation(store_resize(cfg))
    fmt = load_teacher_cfg(cfg).INPUT.FORMAT
    pairs = []
    for d in tqdm(sorted(DatasetCatalog.get("embedded_val"), key=lambda d: d["image_id"])[:n_val],
                  desc="flip (embedded val)", unit="img", dynamic_ncols=True, leave=False):
        image = read_image(d["file_name"], format=fmt)
        resized = resize.get_transform(image).apply_image(image)
        as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a.transpose(2, 0, 1)))  # noqa: E731
        pairs.append((extractor(as_tensor(resized)), extractor(as_tensor(hflip_image(resized)))))
    del extractor
    out = {"embedded_val": _flip_stats(pairs),
           "coco": _flip_stats([(v["orig"], v["hflip"]) for v in ctx["fp32"]["coco"].values()])}
    return out


def flip_conclusion(flip: dict, codecs: dict) -> str:
    """A sentence from the measured mirror error, compared with the int8 quantisation error at the same levels."""
    worst = max((v["rel_l2"], key, lv) for key in flip for lv, v in flip[key].items())
    best = min((v["rel_l2"], key, lv) for key in flip for lv, v in flip[key].items())
    int8 = max(lv["rel_l2"] for size in SIZES for lv in codecs[size]["int8"]["levels"].values())
    far = best[0] > 10 * int8
    head = (f"flip(f(x)) is far from f(flip(x)): the mirror error is {best[0]:.1%} to {worst[0]:.1%} relative L2 "
            f"per level ({best[1]} {best[2]} to {worst[1]} {worst[2]}), at least {best[0] / int8:.0f}x the largest int8 "
            f"quantisation error ({int8:.2%}). The teacher is not flip-equivariant, so mirroring stored features at "
            "read time would feed the student wrong targets; the store keeps the flipped view (DISTILL.CACHE.FLIP "
            "'stored', the default), at twice the bytes.") if far else (
            f"flip(f(x)) is close to f(flip(x)): the mirror error is {best[0]:.1%} to {worst[0]:.1%} relative L2 per level, "
            f"compared with {int8:.2%} for int8 quantisation; FLIP 'mirror' (half the bytes) would serve nearly the "
            "same targets as 'stored' for this teacher.")
    return head


def run(ctx: dict, results: dict) -> None:
    log("flip")
    ensure_fp32("coco", ctx)
    results["flip"] = measure_flip(ctx, ctx["plan"]["embedded_val"])
    results["flip"]["conclusion"] = flip_conclusion(dict(results["flip"]), results["codecs"])
    log(results["flip"]["conclusion"])

"""Padded batch vs per image: how far the teacher's features of an image are when the teacher runs on the
student's padded batch (the original live design) rather than on the image alone (the store's definition).

detectron2 pads a batch to its largest image after normalisation, so in a batch each image is followed
by more padding than alone, and the network's activations on that padding (not zero after the first
convolution's bias and the normalisations) reach the image's border positions through the receptive
field. Per level: the relative L2 distance, pooled over images, of the batch's crop of each image from
the per-image features, and the largest per image.
- embedded: batches of the real student train loader (seeded; aspect-ratio grouping, random flips);
- COCO size: the photographs (800/1333) in the pairs the photos section uses, unflipped.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.stage_two import StudentTrainer
from pipeline.teacher import TeacherFeatureExtractor, convert_format, load_teacher_cfg
from detectron2.structures import ImageList

from tools.bench.context import log, student_cfg
from tools.bench.photos import aspect_pairs, photo_features


@torch.no_grad()
def batch_features(extractor: TeacherFeatureExtractor, images: list[torch.Tensor]) -> list[dict]:
    """The teacher's backbone on the padded batch of `images` (as GeneralizedRCNN.preprocess_image pads a
    batch), each image's levels cropped to its valid size."""
    model = extractor.model
    xs = [(im.to(extractor.device).float() - model.pixel_mean) / model.pixel_std for im in images]
    batch = ImageList.from_tensors(xs, extractor.size_divisibility)
    feats = model.backbone(batch.tensor)
    return [{lv: feats[lv][b, :, :math.ceil(im.shape[-2] / s), :math.ceil(im.shape[-1] / s)]
             for lv, s in zip(extractor.levels, extractor.strides)} for b, im in enumerate(images)]


def compare(pairs: list[tuple[dict, dict]], padding: list[float]) -> dict:
    """Per level: pooled relative L2 of batch vs per-image features, and the largest per image."""
    levels = list(pairs[0][0])
    out = {"images": len(pairs), "padding_share_mean": float(np.mean(padding)), "levels": {}}
    for lv in levels:
        err = [float(((b[lv] - p[lv]).double() ** 2).sum()) for b, p in pairs]
        ref = [float((p[lv].double() ** 2).sum()) for _, p in pairs]
        out["levels"][lv] = {"rel_l2": math.sqrt(sum(err) / sum(ref)),
                             "rel_l2_max_image": max(math.sqrt(e / r) for e, r in zip(err, ref)),
                             "rel_l2_median_image": float(np.median([math.sqrt(e / r) for e, r in zip(err, ref)]))}
    return out


def _padding_share(sizes, divisibility: int) -> list[float]:
    """Per image: the share of the batch's padded input that is not the image."""
    hp = math.ceil(max(h for h, _ in sizes) / divisibility) * divisibility
    wp = math.ceil(max(w for _, w in sizes) / divisibility) * divisibility
    return [1 - h * w / (hp * wp) for h, w in sizes]


def measure_embedded(ctx: dict, n_batches: int) -> dict:
    cfg = student_cfg("embedded", ctx, mode="plain")
    extractor = TeacherFeatureExtractor.from_config(cfg)
    student_fmt, teacher_fmt = cfg.INPUT.FORMAT, load_teacher_cfg(cfg).INPUT.FORMAT
    np.random.seed(11)
    loader = StudentTrainer.build_train_loader(cfg)
    it = iter(loader)
    torch.manual_seed(11)
    pairs, padding, ids = [], [], []
    for _ in range(n_batches):
        data = next(it)
        images = [convert_format(x["image"], student_fmt, teacher_fmt) for x in data]
        pairs += [(b, extractor(im)) for b, im in zip(batch_features(extractor, images), images)]
        padding += _padding_share([tuple(im.shape[-2:]) for im in images], extractor.size_divisibility)
        ids.append([int(x["image_id"]) for x in data])
    getattr(it, "close", lambda: None)()
    out = compare(pairs, padding)
    out.update(batches=ids, batch_size=cfg.SOLVER.IMS_PER_BATCH)
    return out


def measure_coco_size(ctx: dict) -> dict:
    photos = photo_features(ctx)
    extractor, fp32 = photos["extractor"], photos["fp32"]
    item_of = {int(it["image_id"]): it for it in photos["items"]}
    pairs, padding, batches = [], [], aspect_pairs(photos["records"])
    for ids in batches:
        images = [item_of[i]["image"] for i in ids]
        pairs += [(b, fp32[i]["orig"]) for b, i in zip(batch_features(extractor, images), ids)]
        padding += _padding_share([tuple(im.shape[-2:]) for im in images], extractor.size_divisibility)
    out = compare(pairs, padding)
    out.update(batches=batches, batch_size=2)
    return out


def run(ctx: dict, results: dict) -> None:
    log("padded batch vs per image")
    results["padded_batch"] = {"embedded": measure_embedded(ctx, ctx["plan"]["padded_batches"]["embedded"]),
                               "coco": measure_coco_size(ctx)}
    for size, r in results["padded_batch"].items():
        log(f"  {size}: " + ", ".join(f"{lv} {v['rel_l2']:.1%}" for lv, v in r["levels"].items()))

"""Measure each method's loss_kd at B = 1 at initialisation, and the weight that makes it start near 0.5.

    python -m tools.measure_weights --config-file configs/embedded/student_R50_FPN.yaml --batches 3

How losses.DEFAULT_WEIGHTS were chosen: a few training batches, the student at initialisation,
the live teacher (with its RPN, for kd), each method's trainable parts at their initialisation.
The suggested B is target / loss_kd rounded to one significant digit (the detector's own losses
start near 2.5 on the embedded default, so 0.5 keeps loss_kd a fifth of them).
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from pipeline import datasets
from pipeline.config import get_distill_cfg
from pipeline.distill_rcnn import build_distiller, student_outputs
from pipeline.distiller import instance_boxes
from pipeline.losses import METHODS
from pipeline.teacher import TeacherFeatureExtractor
from pipeline.teacher_source import LiveTeacher
from pipeline.stage_two import StudentTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage


def one_digit(x: float) -> float:
    """x rounded to one significant digit."""
    return float(f"{x:.0e}") if x > 0 and math.isfinite(x) else float("nan")


def measure(cfg, methods, batches: int, target: float) -> dict:
    """Mean detector-loss sum and per method mean loss_kd at B = 1 over `batches` training batches."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    live = LiveTeacher(TeacherFeatureExtractor.from_config(cfg, rpn=True), cfg.INPUT.FORMAT)
    loader = iter(StudentTrainer.build_train_loader(cfg))
    kd = {m: 0.0 for m in methods}
    detector = 0.0
    for _ in range(batches):
        batch = next(loader)
        with student_outputs(model, rpn=True) as captured, EventStorage(0), torch.no_grad():
            losses = model(batch)
        detector += sum(v.item() for k, v in losses.items() if k != "loss_kd") / batches
        teacher = live(batch, model.device)
        sizes = [tuple(x["image"].shape[-2:]) for x in batch]
        ids = [x["image_id"] for x in batch]
        for method in methods:
            method_cfg = cfg.clone()
            method_cfg.merge_from_list(["DISTILL.DISTILL", method])
            torch.manual_seed(1)
            distiller = build_distiller(method_cfg, model.backbone)
            with torch.no_grad():
                kd[method] += distiller(captured, teacher, sizes, ids, instance_boxes(batch)).item() / batches
    return {"detector_losses": detector, "loss_kd_at_B1": kd, "suggested_B": {m: one_digit(target / v) for m, v in kd.items()},
            "batches": batches, "images_per_batch": cfg.SOLVER.IMS_PER_BATCH}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/embedded/student_R50_FPN.yaml")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.5, help="loss_kd wanted at the start")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    cfg = get_distill_cfg(args.config_file, ["DISTILL.SOURCE", "live", "DISTILL.B", 1.0, "DATALOADER.NUM_WORKERS", 0]
                          + list(args.opts))
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    datasets.register_from_cfg(cfg)
    result = measure(cfg, args.methods, args.batches, args.target)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

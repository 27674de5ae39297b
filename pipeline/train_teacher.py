"""Train the embedded R101-FPN teacher once with detectron2's trainer, then evaluate it on val.

Skips when the checkpoint exists (pass --force to retrain). Writes `model_final.pth` and
`teacher_metrics.json` (val AP, training time) to the config's OUTPUT_DIR. `--eval-only` evaluates
MODEL.WEIGHTS (default: that checkpoint) without training, as detectron2's tools/train_net.py does.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.trainer import Trainer, setup, write_json
from detectron2.engine import default_argument_parser

logger = logging.getLogger("pipeline.train_teacher")


def main(args) -> dict:
    cfg = setup(args)
    out = Path(cfg.OUTPUT_DIR)
    final, metrics_file = out / "model_final.pth", out / "teacher_metrics.json"
    if args.eval_only:
        if not cfg.MODEL.WEIGHTS and not final.exists():
            raise SystemExit(f"teacher --eval-only: no weights to evaluate: set MODEL.WEIGHTS or train {final} first")
        cfg.defrost()
        cfg.MODEL.WEIGHTS = cfg.MODEL.WEIGHTS or str(final)
        cfg.freeze()
        bbox = Trainer.evaluate_weights(cfg)
        print(f"teacher --eval-only: {cfg.MODEL.WEIGHTS}: val box AP {bbox.get('AP', float('nan')):.2f} "
              f"AP50 {bbox.get('AP50', float('nan')):.2f}")
        return {"bbox": bbox}
    if final.exists() and metrics_file.exists() and not args.force:
        metrics = json.loads(metrics_file.read_text())
        print(f"teacher: {final} exists (box AP {metrics['bbox'].get('AP', float('nan')):.2f}); --force retrains")
        return metrics
    bbox, seconds = Trainer.train_and_evaluate(cfg, resume=args.resume)
    metrics = {"bbox": bbox, "train_seconds": round(seconds, 1), "iterations": cfg.SOLVER.MAX_ITER,
               "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH, "config": args.config_file, "weights": str(final)}
    write_json(metrics_file, metrics)
    print(f"teacher: trained {cfg.SOLVER.MAX_ITER} iterations in {seconds / 60:.1f} min; val box AP {bbox.get('AP', float('nan')):.2f} "
          f"AP50 {bbox.get('AP50', float('nan')):.2f} -> {final}")
    return metrics


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument("--force", action="store_true", help="retrain even when the checkpoint exists")
    main(parser.parse_args())

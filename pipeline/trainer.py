"""detectron2's DefaultTrainer and default_setup, shared by the teacher and student entry points."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pipeline import datasets, distributed, loader
from pipeline.config import get_distill_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger


class Trainer(DefaultTrainer):
    """DefaultTrainer that evaluates with the pure-Python COCO API (no compiled detectron2._C needed).

    Under several processes a CPU model gets DDP without device_ids (gloo); see distributed.ddp_for_device.
    """

    def __init__(self, cfg):
        with distributed.ddp_for_device(cfg.MODEL.DEVICE):
            super().__init__(cfg)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's training loader, its batches pinned ahead on a GPU (pipeline/loader.py)."""
        return loader.for_device(super().build_train_loader(cfg), cfg.MODEL.DEVICE)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)

    @classmethod
    def train_and_evaluate(cls, cfg, resume: bool = False) -> tuple[dict, float]:
        """Train (or resume) to SOLVER.MAX_ITER, evaluated at the end by detectron2's EvalHook.

        Returns the bbox metrics and the wall seconds of training plus that evaluation.
        """
        trainer = cls(cfg)
        trainer.resume_or_load(resume=resume)
        start = time.perf_counter()
        trainer.train()
        return bbox_metrics(getattr(trainer, "_last_eval_results", {})), time.perf_counter() - start

    @classmethod
    def evaluate_weights(cls, cfg, resume: bool = False) -> dict:
        """`--eval-only`, as detectron2's train_net.py: build the model, load MODEL.WEIGHTS (or with resume the
        last checkpoint in OUTPUT_DIR) and evaluate it on DATASETS.TEST; return the bbox metrics."""
        model = cls.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
        return bbox_metrics(cls.test(cfg, model))


def setup(args):
    """Config from --config-file and KEY VALUE opts, datasets registered, detectron2's logging set up."""
    cfg = get_distill_cfg(args.config_file, args.opts)
    datasets.register_from_cfg(cfg)
    if cfg.MODEL.DEVICE.startswith("cuda") and not _cuda_available():
        # A silent switch to CPU would turn a GPU run into a days-long CPU one: refuse instead.
        raise SystemExit(f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but torch finds no CUDA device here; "
                         "set MODEL.DEVICE cpu to run on the CPU")
    distributed.init_from_env(cfg.MODEL.DEVICE)  # torchrun's processes; a no-op for one process or under launch()
    cfg.freeze()
    default_setup(cfg, args)
    # detectron2 sets up its own loggers; ours (store path, fingerprint, ...) join the same log.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="pipeline")
    return cfg


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def bbox_metrics(results: dict) -> dict:
    """The bbox task's AP figures of an evaluation result (empty when there was no evaluation)."""
    for value in (results or {}).values():
        if isinstance(value, dict) and "AP" in value:
            return {k: float(v) for k, v in value.items()}
    return {k: float(v) for k, v in (results or {}).get("bbox", {}).items()}


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write JSON through a temp file, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)

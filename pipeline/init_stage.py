"""The init stage of methods that have one (abound, factor): a short training before the main one.

RepDistiller trains some methods' parts on their own loss before distillation (`init.py`):
abound trains the student's layers and connectors on the AB loss alone, factor trains the
paraphraser to reconstruct teacher features. Here that runs as a detectron2 hook before the
first iteration of `make train-student`, on the training loader's batches (teacher maps from the
store, or the live teacher), with its own SGD optimizer, and is logged to the run's log.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from detectron2.engine import HookBase
from detectron2.utils import comm

logger = logging.getLogger("pipeline.init_stage")
INIT_STAGE_FILE = "init_stage.json"


def init_stage_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the stage trains: the loss's init_parameters (even those frozen for the main training, as
    factor's paraphraser), plus the student backbone's trainable parameters for an init stage on the student."""
    loss = model.distiller.loss
    params = list(loss.init_parameters())
    if loss.init_stage == "student":
        params += [p for p in model.backbone.parameters() if p.requires_grad]
    return params


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average gradients over DDP processes: the stage calls submodules directly, outside DDP's own reduction.

    A parameter without a gradient here (a batch without valid images skips the backbone) counts as
    0 and still joins the reduction: every process must reduce the same tensors, and step with the
    same average, or they wait for each other forever or drift apart.
    """
    world = comm.get_world_size()
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= world


def run_init_stage(model: nn.Module, batches, iterations: int, lr: float, clip_norm: float | None = None,
                   log_period: int = 10) -> dict:
    """Train the distiller's init stage for `iterations` batches from the iterator `batches`; returns its log."""
    loss = model.distiller.loss
    params = init_stage_parameters(model)
    # Parts frozen for the main training (so DDP never waits for their gradients) train here:
    # this stage calls the unwrapped model, outside DDP, and averages gradients itself.
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        return _train(model, params, batches, iterations, lr, clip_norm, log_period)
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _train(model: nn.Module, params: list[nn.Parameter], batches, iterations: int, lr: float,
           clip_norm: float | None, log_period: int) -> dict:
    loss = model.distiller.loss
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    logger.info("init stage of %s (%s): %d iterations, SGD lr %g, %d parameter tensors", loss.method,
                loss.init_stage, iterations, lr, len(params))
    losses, start = [], time.perf_counter()
    for i in range(iterations):
        value = model.distill_init_loss(next(batches))
        if not torch.isfinite(value):
            raise FloatingPointError(f"init stage of {loss.method}: loss is {value.item()} at iteration {i}; "
                                     "lower DISTILL.INIT_LR")
        optimizer.zero_grad()
        value.backward()
        average_gradients(params)
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        losses.append(value.item())
        if (i + 1) % log_period == 0 or i + 1 == iterations:
            logger.info("init stage of %s: iteration %d/%d, loss %.5g", loss.method, i + 1, iterations, losses[-1])
    seconds = time.perf_counter() - start
    return {"method": loss.method, "stage": loss.init_stage, "iterations": iterations, "lr": lr,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "seconds": round(seconds, 2)}


class InitStageHook(HookBase):
    """Runs the distiller's init stage before training; skipped on a resume (the checkpoint holds its result).

    With output_dir, the main process also writes the stage's log to output_dir/init_stage.json.
    """

    def __init__(self, iterations: int, lr: float, clip_norm: float | None = None, output_dir: str | None = None) -> None:
        self.output_dir = output_dir
        self.iterations = iterations
        self.lr = lr
        self.clip_norm = clip_norm
        self.result: dict | None = None

    def before_train(self) -> None:
        model = self.trainer.model
        model = getattr(model, "module", model)  # DDP
        distiller = getattr(model, "distiller", None)
        if distiller is None or distiller.loss.init_stage is None or self.iterations <= 0:
            return
        if self.trainer.iter > 0:
            logger.info("init stage of %s skipped: resuming at iteration %d", distiller.loss.method, self.trainer.iter)
            return
        trainer = getattr(self.trainer, "_trainer", self.trainer)
        batches = getattr(trainer, "_data_loader_iter", None) or iter(trainer.data_loader)
        self.result = run_init_stage(model, batches, self.iterations, self.lr, self.clip_norm)
        if self.output_dir and comm.is_main_process():
            Path(self.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.output_dir) / INIT_STAGE_FILE).write_text(json.dumps(self.result, indent=2))

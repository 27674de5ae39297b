"""Student step: seconds per training step of a plain, a cached (store) and a live-teacher student, same batches."""
from __future__ import annotations

import gc
import time

import numpy as np
import torch
from tqdm import tqdm

from pipeline.stage_two import StudentTrainer
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from tools.bench.context import cpu_seconds, ensure_stores, log, median, student_cfg
from tools.bench.spec import SIZES


class _Timer:
    """Accumulates the seconds spent in wrapped calls (teacher source, distiller)."""

    def __init__(self):
        self.seconds = 0.0

    def wrap_callable(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed

    def hook_module(self, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(lambda m, i: setattr(self, "_t0", time.perf_counter()))
        module.register_forward_hook(lambda m, i, o: setattr(self, "seconds", self.seconds + time.perf_counter() - self._t0))


class StepRunner:
    """One student (plain, cached or live) with its optimizer; runs training steps from the real loader.

    A step is SimpleTrainer.run_step's work: next(batch) from StudentTrainer.build_train_loader (its
    DataLoader workers as configured, the store read happening in the mapper), forward, zero_grad,
    backward, optimizer.step.
    """

    def __init__(self, cfg, mode: str):
        self.cfg, self.mode = cfg, mode
        torch.manual_seed(0)  # the same student initialisation for every mode
        self.model = build_model(cfg).train()
        self.optimizer = build_optimizer(cfg, self.model)
        self.teacher_timer, self.distill_timer = _Timer(), _Timer()
        if getattr(self.model, "teacher_source", None) is not None:
            self.model.teacher_source = self.teacher_timer.wrap_callable(self.model.teacher_source)
        if getattr(self.model, "distiller", None) is not None:
            self.distill_timer.hook_module(self.model.distiller)

    def block(self, warmup: int, timed: int, seed: int) -> list[dict]:
        """warmup+timed steps from a freshly built, seeded loader (workers live only in this block)."""
        np.random.seed(seed)  # TrainingSampler's seed (comm.shared_random_seed draws from numpy)
        loader = StudentTrainer.build_train_loader(self.cfg)
        it = iter(loader)
        torch.manual_seed(seed)  # the DataLoader workers' base seed (flip decisions) is drawn at first next()
        steps = []
        with EventStorage(0):
            for i in range(warmup + timed):
                self.teacher_timer.seconds = self.distill_timer.seconds = 0.0
                c0 = cpu_seconds()
                t0 = time.perf_counter()
                data = next(it)
                t1 = time.perf_counter()
                loss_dict = self.model(data)
                losses = sum(loss_dict.values())
                t2 = time.perf_counter()
                self.optimizer.zero_grad()
                losses.backward()
                t3 = time.perf_counter()
                self.optimizer.step()
                t4 = time.perf_counter()
                cpu = cpu_seconds() - c0
                if i >= warmup:
                    steps.append({"total_s": t4 - t0, "data_s": t1 - t0, "forward_s": t2 - t1, "backward_s": t3 - t2,
                                  "optimizer_s": t4 - t3, "cpu_over_wall": cpu / (t4 - t0), "teacher_s": self.teacher_timer.seconds,
                                  "distill_forward_s": self.distill_timer.seconds,
                                  "image_ids": [int(x["image_id"]) for x in data],
                                  "loss_kd": float(loss_dict["loss_kd"]) if "loss_kd" in loss_dict else None})
        getattr(it, "close", lambda: None)()  # shuts the loader's workers down
        del it, loader
        gc.collect()
        return steps


def measure_student_steps(size: str, ctx: dict, rounds: int, warmup: int, timed: int) -> dict:
    """Median seconds per training step of plain, cached (fp16 store, hint) and live (hint) students.

    The three students are built at once; blocks of steps alternate between them (order reversed every
    other round), each block from a loader seeded identically, so the modes see the same batches.
    """
    modes = ("plain", "cached", "live")
    runners = {m: StepRunner(student_cfg(size, ctx, mode=m), m) for m in modes}
    batch = runners["plain"].cfg.SOLVER.IMS_PER_BATCH
    workers = runners["plain"].cfg.DATALOADER.NUM_WORKERS
    steps = {m: [] for m in modes}
    total = rounds * len(modes) * (warmup + timed)
    bar = tqdm(total=total, desc=f"student steps ({size})", unit="step", dynamic_ncols=True)
    for r in range(rounds):
        order = modes if r % 2 == 0 else modes[::-1]
        for m in order:
            got = runners[m].block(warmup, timed, seed=1000 + r)
            steps[m] += got
            bar.update(warmup + timed)
            bar.set_postfix_str(f"{m} {median([s['total_s'] for s in got]):.2f} s/step")
    bar.close()
    same = all([s["image_ids"] for s in steps[m]] == [s["image_ids"] for s in steps["plain"]] for m in modes)
    out = {"ims_per_batch": batch, "num_workers": workers, "rounds": rounds, "warmup_per_block": warmup,
           "timed_steps_per_mode": len(steps["plain"]), "same_batches": same, "modes": {}}
    for m in modes:
        parts = {k: median([s[k] for s in steps[m]]) for k in
                 ("total_s", "data_s", "forward_s", "backward_s", "optimizer_s", "teacher_s", "distill_forward_s",
                  "cpu_over_wall")}
        out["modes"][m] = {**parts, "steps_s": [s["total_s"] for s in steps[m]]}
    out["cached_over_plain"] = out["modes"]["cached"]["total_s"] / out["modes"]["plain"]["total_s"]
    out["live_over_cached"] = out["modes"]["live"]["total_s"] / out["modes"]["cached"]["total_s"]
    out["consumption_images_per_s"] = batch / out["modes"]["cached"]["total_s"]
    del runners
    gc.collect()
    return out


def run(ctx: dict, results: dict) -> None:
    plan = ctx["plan"]
    results["student_step"] = {}
    for size in SIZES:
        ensure_stores(size, ctx)  # the cached student reads the fp16 store
        log(f"student steps, {size}")
        results["student_step"][size] = s = measure_student_steps(
            size, ctx, plan["step_rounds"][size], plan["step_warmup"][size], plan["step_timed"][size])
        log(f"  plain {s['modes']['plain']['total_s']:.3f} s, cached {s['modes']['cached']['total_s']:.3f} s, "
            f"live {s['modes']['live']['total_s']:.3f} s; cached/plain {s['cached_over_plain']:.3f}, "
            f"live/cached {s['live_over_cached']:.3f}")

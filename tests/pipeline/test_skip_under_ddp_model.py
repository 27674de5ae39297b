"""DistillRCNN with crd under DDP (2 gloo processes): a process whose whole batch was skipped still steps."""
from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import make_student_cfg

COLLECTIVE_TIMEOUT_S = 30
JOIN_TIMEOUT_S = 240


def _rank(rank: int, world: int, init_file: str, out_dir: str, cfg_yaml: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import pipeline  # noqa: F401  (registrations)
    from pipeline import datasets  # noqa: F401  (embedded_tiny_*)
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from pipeline.config import get_distill_cfg

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    cfg = get_distill_cfg(cfg_yaml)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    batch = torch.load(f"{out_dir}/batch{rank}.pt", weights_only=False)
    with EventStorage(0) as storage:
        losses = ddp(batch)
        sum(losses.values()).backward()
        skipped = storage.history("kd_skipped_images").latest() if rank == 1 else 0
    torch.save({"loss_kd": losses["loss_kd"].detach(), "skipped": skipped,
                "student_bank": model.distiller.loss.student_bank.embeddings}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_a_process_whose_whole_batch_was_skipped_joins_crds_gather_and_ddps_reduction(tiny_store, tiny_teacher,
                                                                                        tmp_path):
    from cache import TeacherFeatureStore
    from tests.pipeline.test_reliability import _mapped

    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"], "DISTILL.DISTILL", "crd",
                           "DISTILL.CACHE.ON_BAD_ENTRY", "skip", "INPUT.RANDOM_FLIP", "none")
    cfg_yaml = tmp_path / "student.yaml"
    cfg_yaml.write_text(cfg.dump())
    ids = [int(i) for i in TeacherFeatureStore(tiny_store["path"]).image_ids[:4]]
    for rank, pair in enumerate((ids[:2], ids[2:])):
        batch = _mapped(cfg, pair)
        if rank == 1:
            for x in batch:
                x["teacher_features"], x["teacher_skip_reason"] = None, "damaged (simulated)"
        torch.save(batch, tmp_path / f"batch{rank}.pt")
    context = mp.start_processes(_rank, args=(2, str(tmp_path / "init"), str(tmp_path), str(cfg_yaml)), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"the two processes did not finish within {JOIN_TIMEOUT_S} s: a collective hangs")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0]["loss_kd"].item() > 0 and results[1]["loss_kd"].item() == 0.0
    assert results[1]["skipped"] == 2
    assert torch.equal(results[0]["student_bank"], results[1]["student_bank"])  # rank 0's rows, moved on both

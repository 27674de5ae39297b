"""Under DDP with ON_BAD_ENTRY skip, every process takes part in every collective, whatever its valid images.

A skipped image leaves a process with fewer images than the others, or none. crd's forward gathers
the memory-bank rows and embeddings of every process (all_gather), and DDP's backward all-reduces
every gradient; a process that skips a collective, or enters it with another shape, leaves the
others waiting forever. Each case runs two gloo processes, rank 0 with two valid images, rank 1
with fewer; a collective that waits more than COLLECTIVE_TIMEOUT_S raises, and the test fails
after JOIN_TIMEOUT_S instead of hanging.
"""
from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.distiller import Distiller
from pipeline.losses.crd import CRDLoss

COLLECTIVE_TIMEOUT_S = 30
JOIN_TIMEOUT_S = 180  # two spawned interpreters importing torch and detectron2 on a loaded 2-core machine
IMAGE_IDS = [100 + row for row in range(6)]  # image_id -> row of the store's image index: row = id - 100
SIZES = [(12, 12), (12, 12)]  # p2 (stride 4) of 3 x 3 for both images, no padding


def build_distiller() -> Distiller:
    torch.manual_seed(0)  # the same heads and banks in every process, as DDP's initial broadcast gives
    loss = CRDLoss(4, 4, 1, num_images=len(IMAGE_IDS), dim=8, negatives=3)
    return Distiller(loss, ["p2"], [4], 4, 4, weight=1.0, image_rows={i: i - 100 for i in IMAGE_IDS}).train()


def batch(rank: int):
    """Two images' student maps, teacher maps and ids: rank 0 holds rows 0, 1 and rank 1 rows 2, 3."""
    g = torch.Generator().manual_seed(10 + rank)
    students = torch.randn(2, 4, 3, 3, generator=g)
    teachers = [{"p2": torch.randn(4, 3, 3, generator=g)} for _ in range(2)]
    return students, teachers, [IMAGE_IDS[2 * rank], IMAGE_IDS[2 * rank + 1]]


# What rank 1 hands the Distiller: (indices of its two images kept in the call, indices whose teacher is None).
CASES = {
    "fewer_images": ([0], []),  # what DistillRCNN passes after dropping a skipped image itself
    "a_skipped_image": ([0, 1], [1]),  # the skipped image's teacher entry is None
    "no_valid_image": ([0, 1], [0, 1]),
}


def _rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Every case in turn, in one process pair (spawning costs more than the cases)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    for case, (kept, skipped) in CASES.items():
        distiller = build_distiller()
        model = DistributedDataParallel(distiller, broadcast_buffers=False)  # as detectron2 wraps the student
        students, teachers, ids = batch(rank)
        kept, skipped = ([0, 1], []) if rank == 0 else (kept, skipped)
        teachers = [None if i in skipped else teachers[i] for i in kept]
        students = students[kept].requires_grad_()
        loss = model({"p2": students}, teachers, [SIZES[i] for i in kept], [ids[i] for i in kept])
        loss.backward()
        torch.save({"loss": loss.detach(), "student_bank": distiller.loss.student_bank.embeddings,
                    "teacher_bank": distiller.loss.teacher_bank.embeddings,
                    "grads": {n: p.grad for n, p in distiller.named_parameters()}}, f"{out_dir}/{case}.rank{rank}.pt")
    init_stage_gradients(rank, out_dir)
    dist.destroy_process_group()


def init_stage_gradients(rank: int, out_dir: str) -> None:
    """The init stage averages gradients itself; on rank 1 the backbone got none (its batch had no valid image)."""
    from pipeline.init_stage import average_gradients

    connector, backbone = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    connector.grad = torch.full((3,), float(rank + 1))
    backbone.grad = torch.full((2,), 4.0) if rank == 0 else None
    average_gradients([connector, backbone])
    torch.save({"connector": connector.grad, "backbone": backbone.grad}, f"{out_dir}/init_stage.rank{rank}.pt")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> dict[str, list[dict]]:
    """case -> what each of the two processes ended with; fails (never hangs) if a collective waits forever."""
    out = tmp_path_factory.mktemp("skip_under_ddp")
    context = mp.start_processes(_rank, args=(2, str(out / "init"), str(out)), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"the two processes did not finish within {JOIN_TIMEOUT_S} s: a collective hangs")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return {case: [torch.load(out / f"{case}.rank{r}.pt") for r in range(2)] for case in [*CASES, "init_stage"]}


@pytest.mark.parametrize("case", list(CASES))
def test_crd_under_ddp_goes_on_when_one_process_has_fewer_or_no_valid_images(two_process_results, case):
    results = two_process_results[case]
    kept, skipped = CASES[case]
    valid_on_rank1 = [i for i in kept if i not in skipped]

    # The banks stay identical and moved exactly at the valid images' rows, by those images' embeddings:
    # the same as one process updating them with every valid image of the step.
    for bank in ("student_bank", "teacher_bank"):
        assert torch.equal(results[0][bank], results[1][bank]), bank
    reference = build_distiller()
    s0, t0, ids0 = batch(0)
    s1, t1, ids1 = batch(1)
    students = torch.cat([s0, s1[valid_on_rank1]])
    teachers = t0 + [t1[i] for i in valid_on_rank1]
    reference({"p2": students}, teachers, SIZES[:1] * len(teachers), ids0 + [ids1[i] for i in valid_on_rank1])
    initial = build_distiller().loss.student_bank.embeddings
    moved = (results[0]["student_bank"] != initial).any(dim=1).tolist()
    assert moved == [row < 2 or row - 2 in valid_on_rank1 for row in range(len(IMAGE_IDS))]
    for bank in ("student_bank", "teacher_bank"):
        assert torch.allclose(results[0][bank], getattr(reference.loss, bank).embeddings, atol=1e-6), bank

    # DDP reduced the same gradients into both processes; a process without a valid image adds zero.
    for name, grad in results[0]["grads"].items():
        assert grad is not None and torch.equal(grad, results[1]["grads"][name]), name
        assert torch.isfinite(grad).all(), name
    if not valid_on_rank1:
        assert results[1]["loss"].item() == 0.0


def test_the_init_stage_averages_every_gradient_when_one_process_has_none_for_a_parameter(two_process_results):
    # abound's init stage trains the backbone; a batch without valid images gives it no gradient on rank 1.
    # Both processes must still reduce it, and both must step with the same average (0 from rank 1).
    for rank in range(2):
        got = two_process_results["init_stage"][rank]
        assert torch.equal(got["connector"], torch.full((3,), 1.5)), rank
        assert got["backbone"] is not None and torch.equal(got["backbone"], torch.full((2,), 2.0)), rank

"""torch.distributed for both stages: a process group from torchrun's environment, and DDP on CPU.

detectron2 v0.6's `launch` spawns one process per GPU and requires CUDA. `torchrun` starts the processes
itself (on one machine or several) and describes them in environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); `init_from_env` joins them into one process group,
nccl on GPUs and gloo on CPU, and sets detectron2's per-machine group as `launch` does, so
`detectron2.utils.comm` (rank, world size, synchronize) works under either launcher.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

from detectron2.utils import comm


def init_from_env(device: str) -> bool:
    """Join the process group torchrun describes; False (nothing done) for a single process.

    A group made before (by detectron2's `launch`) is kept. `device` is cfg.MODEL.DEVICE: a CUDA device
    gives nccl with this process on GPU LOCAL_RANK (so name it "cuda", not "cuda:N"), anything else gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size % local_world_size:
        raise ValueError(f"WORLD_SIZE={world_size} is not a multiple of LOCAL_WORLD_SIZE={local_world_size}: "
                         "start the same number of processes on every machine (torchrun --nproc_per_node)")
    use_cuda = device.startswith("cuda") and torch.cuda.is_available()
    if use_cuda and torch.device(device).index not in (None, local_rank):
        raise ValueError(f"MODEL.DEVICE={device!r} with {world_size} processes: each process takes GPU LOCAL_RANK "
                         f"(here {local_rank}); set MODEL.DEVICE cuda (CUDA_VISIBLE_DEVICES picks the GPUs)")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        # Bound to this process's GPU: unbound, NCCL guesses GPU (global rank % GPUs per machine) for its first
        # barrier, which is another process's GPU wherever a machine runs fewer processes than it has GPUs.
        dist.init_process_group(backend="nccl", init_method="env://", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group(backend="gloo", init_method="env://")
    # detectron2's launch() does the same: every rank creates every machine's group, in the same order.
    node = dist.get_rank() // local_world_size
    for i in range(world_size // local_world_size):
        group = dist.new_group(list(range(i * local_world_size, (i + 1) * local_world_size)))
        if i == node:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    return True


def all_gather(value: Any) -> list[Any]:
    """`value` from every rank, in rank order (a picklable object; [value] for a single process)."""
    if comm.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * comm.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


@contextlib.contextmanager
def ddp_for_device(device: str) -> Iterator[None]:
    """While building a DefaultTrainer, give a CPU model DDP without `device_ids`.

    detectron2 v0.6's DefaultTrainer calls create_ddp_model(model), which passes device_ids=[local_rank]
    and DDP refuses that for a CPU module; on GPUs detectron2's own call stands.
    """
    if device.startswith("cuda") or comm.get_world_size() == 1:
        yield
        return
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    defaults.create_ddp_model = functools.partial(original, device_ids=None)
    try:
        yield
    finally:
        defaults.create_ddp_model = original

"""Where tensors live: training batches pinned ahead on a GPU and left alone on the CPU, and the process group
(nccl bound to the process's GPU, gloo on the CPU) and DDP's device_ids chosen by MODEL.DEVICE."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipeline import distributed, loader
from tests.conftest import make_student_cfg


class Pinnable:
    """Stands in for a tensor (or a store's encoded map): pin_memory() returns a pinned copy, here marked."""

    def __init__(self, value, pinned: bool = False):
        self.value, self.pinned = value, pinned

    def pin_memory(self) -> "Pinnable":
        return Pinnable(self.value, pinned=True)


class Instances:
    """Like detectron2's Instances: no pin_memory(), so it is passed through as it is."""


def test_pin_walks_dicts_lists_and_tuples_pins_what_can_pin_itself_and_keeps_the_rest():
    instances = Instances()
    batch = [{"image": Pinnable(1), "instances": instances, "image_id": 7, "file_name": "a.jpg",
              "teacher_features": {"p2": Pinnable(2), "p3": (Pinnable(3), None)}}]
    pinned = loader.pin(batch)
    x = pinned[0]
    assert x["image"].pinned and x["teacher_features"]["p2"].pinned and x["teacher_features"]["p3"][0].pinned
    assert x["instances"] is instances and x["image_id"] == 7 and x["file_name"] == "a.jpg"
    assert x["teacher_features"]["p3"][1] is None and isinstance(x["teacher_features"]["p3"], tuple)
    assert not batch[0]["image"].pinned  # the loader's own batch is not changed


@pytest.fixture()
def no_gpu_needed(monkeypatch):
    """The pinning thread's set_device, recorded instead of done: the iterator's logic needs no GPU."""
    devices = []
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    return devices


def test_pinned_batches_come_in_order_pinned_on_the_process_gpu_and_end_with_the_loader(no_gpu_needed):
    batches = [[{"image": Pinnable(i)}] for i in range(5)]
    got = list(loader.PinnedBatches(batches, "cuda:3"))
    assert [b[0]["image"].value for b in got] == [0, 1, 2, 3, 4]
    assert all(b[0]["image"].pinned for b in got)
    assert no_gpu_needed == [3]  # the thread made this process's GPU current before pinning


def test_an_error_in_the_loader_is_raised_by_next_after_the_batches_before_it(no_gpu_needed):
    def failing():
        yield [Pinnable(0)]
        raise KeyError("image 5 is not in the store")

    it = iter(loader.PinnedBatches(failing(), "cuda:0"))
    assert next(it)[0].pinned
    with pytest.raises(KeyError, match="image 5"):
        next(it)


def test_closing_the_iterator_stops_its_thread_while_the_loader_still_has_batches(no_gpu_needed):
    endless = ([Pinnable(i)] for i in iter(int, 1))
    it = iter(loader.PinnedBatches(endless, "cuda:0", depth=2))
    next(it)
    it.close()
    assert not it._thread.is_alive()


def test_an_iterator_dropped_unclosed_stops_its_thread(no_gpu_needed):
    import gc

    endless = ([Pinnable(i)] for i in iter(int, 1))
    it = iter(loader.PinnedBatches(endless, "cuda:0", depth=1))
    next(it)
    thread = it._thread
    del it
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_batches_are_pinned_only_for_a_cuda_device():
    batches = [[1], [2]]
    assert loader.for_device(batches, "cpu") is batches
    assert isinstance(loader.for_device(batches, "cuda:0"), loader.PinnedBatches)


def test_the_students_loader_pins_images_and_teacher_maps_on_the_device(tiny_store, tiny_teacher, tmp_path, device):
    from pipeline.stage_two import StudentTrainer

    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"],
                           "MODEL.DEVICE", device.type)
    it = iter(StudentTrainer.build_train_loader(cfg))
    batch = next(it)
    getattr(it, "close", lambda: None)()
    tensors = [x["image"] for x in batch] + [t for x in batch for t in _tensors(x["teacher_features"])]
    assert tensors and all(t.is_pinned() == (device.type == "cuda") for t in tensors)


def _tensors(data):
    """Every tensor inside data (dicts, lists, and objects holding tensors as attributes, e.g. encoded maps)."""
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, dict):
        return [t for v in data.values() for t in _tensors(v)]
    if isinstance(data, (list, tuple)):
        return [t for v in data for t in _tensors(v)]
    return [t for v in vars(data).values() for t in _tensors(v)] if hasattr(data, "__dict__") else []


# --------------------------------------------------------------------------- process group and DDP


@pytest.fixture()
def torchrun_env(monkeypatch):
    """Rank 1 of 2 on one machine as torchrun describes it; the process group's calls recorded, not made."""
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    calls = {"set_device": []}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.update(init=kwargs))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "new_group", lambda ranks: tuple(ranks))
    monkeypatch.setattr(distributed.comm, "synchronize", lambda: None)
    monkeypatch.setattr(distributed.comm, "_LOCAL_PROCESS_GROUP", None)
    monkeypatch.setattr(torch.cuda, "set_device", calls["set_device"].append)
    return calls


def test_a_cuda_process_joins_nccl_bound_to_its_local_gpu(torchrun_env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.init_from_env("cuda")
    assert torchrun_env["init"]["backend"] == "nccl"
    assert torchrun_env["init"]["device_id"] == torch.device("cuda", 1)
    assert torchrun_env["set_device"] == [1]
    assert distributed.comm._LOCAL_PROCESS_GROUP == (0, 1)


def test_a_cpu_process_joins_gloo_with_no_gpu(torchrun_env):
    assert distributed.init_from_env("cpu")
    assert torchrun_env["init"]["backend"] == "gloo" and "device_id" not in torchrun_env["init"]
    assert torchrun_env["set_device"] == []


def test_a_numbered_gpu_under_torchrun_is_refused_naming_the_setting(torchrun_env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="set MODEL.DEVICE cuda"):
        distributed.init_from_env("cuda:0")
    assert "init" not in torchrun_env


@pytest.mark.parametrize("device, device_ids", [("cpu", None), ("cuda", [1])])
def test_ddp_gets_the_local_gpu_as_device_ids_on_cuda_and_none_on_cpu(device, device_ids, monkeypatch):
    from detectron2.engine import defaults

    made = {}
    monkeypatch.setattr(distributed.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(defaults.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(defaults.comm, "get_local_rank", lambda: 1)
    monkeypatch.setattr(defaults, "DistributedDataParallel", lambda model, **kwargs: made.update(kwargs) or model)
    with distributed.ddp_for_device(device):
        defaults.create_ddp_model(torch.nn.Linear(1, 1), broadcast_buffers=False)
    assert made["device_ids"] == device_ids and made["broadcast_buffers"] is False

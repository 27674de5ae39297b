"""Training batches in pinned host memory when the model runs on a GPU.

detectron2 v0.6's build_detection_train_loader makes its DataLoaders without pin_memory, so every copy of an
image or a teacher map to the GPU starts from pageable memory: the driver stages it through a pinned buffer of
its own and the copy blocks the host, even with non_blocking=True. PinnedBatches pins each batch in a
background thread while the GPU runs the previous step, as DataLoader's own pin_memory thread does, so
`.to(device, non_blocking=True)` (the teacher maps) overlaps compute. On the CPU the loader is left as it is.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

_END = object()


def pin(data: Any) -> Any:
    """data with every tensor in pinned memory: dicts, lists and tuples are walked, objects with a pin_memory()
    method (a tensor, or a store's encoded map) pin themselves, anything else (detectron2's Instances) is kept."""
    if isinstance(data, Mapping):
        return {k: pin(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(pin(v) for v in data)
    if callable(getattr(data, "pin_memory", None)):
        return data.pin_memory()
    return data


class PinnedBatches:
    """An iterable over `loader`'s batches, each pinned ahead by a background thread (at most `depth` ahead).

    An error raised by the loader is raised again by next(); close() (or the process's exit) stops the thread.
    """

    def __init__(self, loader: Iterable, device: torch.device | str, depth: int = 2) -> None:
        self.loader, self.depth = loader, depth
        device = torch.device(device)
        # The pinning thread makes this process's GPU current: a thread starts on GPU 0, and pinning there
        # would open a CUDA context on GPU 0 for every DDP process of the machine.
        self.device_index = device.index if device.index is not None else torch.cuda.current_device()

    def __iter__(self) -> "_PinningIterator":
        return _PinningIterator(iter(self.loader), self.device_index, self.depth)

    def __len__(self) -> int:
        return len(self.loader)


class _PinningIterator(Iterator):
    def __init__(self, source: Iterator, device_index: int, depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        # The thread holds the queue and the event, not this iterator: an iterator dropped unclosed is
        # collected, and its __del__ stops the thread.
        self._thread = threading.Thread(target=_pin_ahead, args=(source, device_index, self._queue, self._stop),
                                        daemon=True, name="pin-batches")
        self._thread.start()

    def __next__(self):
        batch, error = self._queue.get()
        if batch is _END:
            self._stop.set()
            if error is not None:
                raise error
            raise StopIteration
        return batch

    def close(self) -> None:
        """Stop the pinning thread (it ends after the batch it is pinning or waiting for, if any)."""
        self._stop.set()
        self._thread.join(timeout=1)

    def __del__(self) -> None:
        self._stop.set()


def _pin_ahead(source: Iterator, device_index: int, out: queue.Queue, stop: threading.Event) -> None:
    """The pinning thread: source's batches, pinned, into `out`; then (_END, the error or None)."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        torch.set_num_threads(1)  # this thread's own setting: a pinning copy needs no more than one core
        torch.cuda.set_device(device_index)
        for batch in source:
            if not put((pin(batch), None)):
                return
    except BaseException as error:  # handed to the consumer, which raises it in the training loop
        put((_END, error))
    else:
        put((_END, None))


def for_device(loader: Iterable, device: torch.device | str) -> Iterable:
    """loader's batches pinned ahead of use when `device` is a CUDA device; the loader itself otherwise."""
    if torch.device(device).type != "cuda":
        return loader
    return PinnedBatches(loader, device)

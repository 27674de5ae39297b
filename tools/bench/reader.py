"""Reader: images/s and decoded MB/s of one DataLoader worker reading the store, per codec."""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

from cache import TeacherFeatureStore

from tools.bench.context import STORES, ensure_stores, log, median
from tools.bench.spec import CODEC_NAMES, SIZES


class _ReadAll(torch.utils.data.Dataset):
    """Item i = store.read(ids[i % n], flip alternating); `passes` passes over every id."""

    def __init__(self, path: str, ids: list[int], passes: int, flip: bool):
        self.store, self.ids, self.passes, self.flip = TeacherFeatureStore(path), ids, passes, flip

    def __len__(self) -> int:
        return len(self.ids) * self.passes

    def __getitem__(self, i: int):
        n = len(self.ids)
        flip = self.flip and (i + i // n) % 2 == 1  # alternate, and swap the pattern each pass
        return self.store.read(self.ids[i % n], flip=flip)


def measure_reader(size: str, ctx: dict, passes: int) -> dict:
    """Images/s and decoded-float32 MB/s of one DataLoader worker calling TeacherFeatureStore.read, per codec.

    Passes over all ids of the store (flip alternating); the first pass is warm-up; the figure is the
    median pass. Time is taken where the main process receives the tensors, as the trainer would.
    """
    out = {}
    for codec in CODEC_NAMES:
        path = str(STORES / f"{size}_{codec}.zarr")
        store = TeacherFeatureStore(path)
        ids = [int(i) for i in store.image_ids]
        loader = torch.utils.data.DataLoader(_ReadAll(path, ids, passes + 1, store.layout.flip != "none"),
                                             batch_size=None, shuffle=False, num_workers=1)
        n = len(ids)
        pass_s, pass_mb = [], []
        t_prev, mb = time.perf_counter(), 0.0
        for i, feats in enumerate(tqdm(loader, desc=f"reader {size} {codec}", unit="img", dynamic_ncols=True, leave=False)):
            mb += sum(t.numel() * 4 for t in feats.values()) / 1e6
            if (i + 1) % n == 0:
                now = time.perf_counter()
                if i + 1 > n:  # pass 0 is warm-up (worker start, zarr open)
                    pass_s.append(now - t_prev)
                    pass_mb.append(mb)
                t_prev, mb = now, 0.0
        rate = n / median(pass_s)
        out[codec] = {"images": n, "passes": passes, "images_per_s": rate,
                      "decoded_mb_per_s": median([m / s for m, s in zip(pass_mb, pass_s)]),
                      "decoded_mb_per_image": median(pass_mb) / n}
        log(f"reader {size} {codec}: {rate:.1f} img/s, {out[codec]['decoded_mb_per_s']:.0f} MB/s decoded")
    return out


def run(ctx: dict, results: dict) -> None:
    for size in SIZES:
        ensure_stores(size, ctx)
    results["reader"] = {size: measure_reader(size, ctx, ctx["plan"]["reader_passes"][size]) for size in SIZES}

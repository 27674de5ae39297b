"""Codec candidates: lossy encodings measured in memory on the teacher's features before one became a codec.

Out of the default run (it chose int8-std<a>'s rule); `--sections codec_candidates` reproduces it.
"""
from __future__ import annotations

import gc
import math

import numpy as np
import torch

from cache.codecs import BLOSC_CLEVEL, get_codec, plane_residuals_
from cache.format import level_step_scale

from tools.bench.context import ensure_fp32, log, loss_batches, loss_kd_deviation, student_cfg
from tools.bench.spec import CANDIDATE_STEPS, SIZES

CANDIDATE_PCA_K = (64,)


def _affine_codes(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel min/max quantisation to 2**bits levels (int8 with fewer levels): codes, decoded."""
    top = 2 ** bits - 1
    flat = x.reshape(x.shape[0], -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    scale = (hi - lo) / top
    scale[~(scale > 0)] = 1.0
    q = np.clip(np.rint((x - lo[:, None, None]) / scale[:, None, None]), 0, top)
    return q.astype(np.uint8), (q * scale[:, None, None] + lo[:, None, None]).astype(np.float32)


def _tile_bytes(codes: np.ndarray, tile: int, shuffle: int, channels_last: bool = False) -> int:
    """Bytes of (C, h, w) codes as the store compresses them: blosc zstd per tile x tile chunk, + crc32c.

    Edge tiles are compressed without the store's zero padding; channels_last serialises each tile
    (h, w, C) as the int8 codecs' stores do.
    """
    from numcodecs import Blosc

    blosc = Blosc(cname="zstd", clevel=BLOSC_CLEVEL, shuffle=shuffle)
    c, h, w = codes.shape
    order = (1, 2, 0) if channels_last else (0, 1, 2)
    return sum(len(blosc.encode(np.ascontiguousarray(codes[:, y:y + tile, x:x + tile].transpose(order)))) + 4
               for y in range(0, h, tile) for x in range(0, w, tile))


def _fit_pca(samples: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (C,) and the top-k principal directions (k, C) of the positions of (C, h, w) samples."""
    rows = np.concatenate([x.reshape(x.shape[0], -1).T for x in samples]).astype(np.float64)
    if len(rows) > 100_000:
        rows = rows[np.random.default_rng(0).choice(len(rows), 100_000, replace=False)]
    mean = rows.mean(axis=0)
    eigval, eigvec = np.linalg.eigh(np.cov((rows - mean).T))
    return mean.astype(np.float32), eigvec[:, np.argsort(eigval)[::-1][:k]].T.astype(np.float32)


def measure_codec_candidates(size: str, ctx: dict, n_batches: int) -> dict:
    """Lossy encodings measured in memory on the fp32 teacher features, before any is made a store codec:
    int8 with and without the plane predictor, int8-std<a> for several steps (as the store encodes it: a at
    p2, halving per level, plane predictor), the same step at every level (the rule before), 4/5-bit
    per-channel codes (one code per byte, plane predictor, zstd unshuffled, so the unused bits cost ~nothing),
    a per-level PCA basis (fitted on the first half of the images, coefficients in fp16), and whether p6 can be
    dropped (p6 == p5[..., ::2, ::2] exactly). Bytes: compressed tiles as the store writes them plus 8 B/channel
    of scale and offset; error and loss_kd deviation as section 4."""
    from numcodecs import Blosc

    ensure_fp32(size, ctx)
    feats = ctx["fp32"][size]
    ids = sorted(feats)
    cfg = student_cfg(size, ctx)
    tile = cfg.DISTILL.CACHE.TILE
    levels = list(next(iter(feats.values()))["orig"])
    strides = {lv: 2 ** int(lv[1:]) for lv in levels}  # FPN level pK has stride 2**K
    step_scale = {lv: level_step_scale(strides[lv], min(strides.values())) for lv in levels}
    p6_exact = all(torch.equal(v["p6"], v["p5"][:, ::2, ::2]) for f in feats.values() for v in f.values()) \
        if {"p5", "p6"} <= set(levels) else None
    fit_ids = ids[: max(1, len(ids) // 2)]
    pca = {k: {lv: _fit_pca([feats[i][v][lv].numpy() for i in fit_ids for v in feats[i]], k) for lv in levels}
           for k in CANDIDATE_PCA_K}

    def pca_encode(k):
        def encode(x, lv):
            mean, basis = pca[k][lv]
            c, h, w = x.shape
            coef = (basis @ (x.reshape(c, -1) - mean[:, None])).astype(np.float16)
            dec = basis.T @ coef.astype(np.float32) + mean[:, None]
            return _tile_bytes(coef.reshape(-1, h, w), tile, Blosc.SHUFFLE), dec.reshape(c, h, w)
        return encode

    def codec_encode(name, predictor=None, per_level=True):
        codec = get_codec(name)
        codec = codec.with_predictor(predictor or codec.predictor)
        shuffle = Blosc.NOSHUFFLE if codec.blosc_shuffle == "noshuffle" else Blosc.BITSHUFFLE
        channels_last = codec.channels_last_chunks
        if codec.predictor == "none" and codec.name == "int8":
            shuffle, channels_last = Blosc.BITSHUFFLE, False  # int8 of format version 1

        def encode(x, lv):
            stored, params = codec.encode(x, step_scale[lv] if per_level else 1.0)
            return (_tile_bytes(stored, tile, shuffle, channels_last) + 8 * x.shape[0],
                    codec.decode(stored, params))
        return encode

    def bits_encode(bits):
        def encode(x, lv):
            codes, dec = _affine_codes(x, bits)
            plane_residuals_(codes)
            return _tile_bytes(codes, tile, Blosc.NOSHUFFLE, channels_last=True) + 8 * x.shape[0], dec
        return encode

    candidates = {"int8 without predictor (format 1)": codec_encode("int8", predictor="none"),
                  "int8": codec_encode("int8")}
    candidates.update({f"int8-std{a:g}": codec_encode(f"int8-std{a:g}") for a in CANDIDATE_STEPS})
    candidates.update({f"int8-std{a:g}, same step every level": codec_encode(f"int8-std{a:g}", per_level=False)
                       for a in (0.1, 0.15)})
    candidates.update({f"{b}-bit per channel": bits_encode(b) for b in (5, 4)})
    candidates.update({f"PCA k={k}, fp16 coefficients": pca_encode(k) for k in CANDIDATE_PCA_K})
    out = {"p6_equals_p5_subsampled": p6_exact, "pca_fit_images": len(fit_ids), "step_scale": step_scale,
           "candidates": {}}
    raw = sum(x.numel() * 4 for f in feats.values() for v in f.values() for x in v.values())
    p6_raw = sum(v["p6"].numel() * 4 for f in feats.values() for v in f.values()) if "p6" in levels else 0
    out["p6_share_of_raw"] = p6_raw / raw
    lb = loss_batches(size, ctx, n_batches)
    in_batches = {(i, "hflip" if f else "orig") for b in lb["batches"] for i, f in zip(b["image_ids"], b["flips"])}
    for name, encode in candidates.items():
        nbytes, sq = 0, {lv: [0.0, 0.0] for lv in levels}
        decoded = {}  # only the (image, view) pairs of the loss batches: memory stays small at COCO size
        for i in ids:
            for view, per_level in feats[i].items():
                for lv, t in per_level.items():
                    x = t.numpy()
                    b, dec = encode(x, lv)
                    nbytes += b
                    sq[lv][0] += float(((dec - x).astype(np.float64) ** 2).sum())
                    sq[lv][1] += float((x.astype(np.float64) ** 2).sum())
                    if (i, view) in in_batches:
                        decoded.setdefault((i, view), {})[lv] = torch.from_numpy(np.ascontiguousarray(dec, np.float32))
        dev = loss_kd_deviation(size, ctx, n_batches, {name: lambda i, v: decoded[(i, v)]})
        out["candidates"][name] = {"ratio_vs_fp32": raw / nbytes, "bytes_per_image": nbytes / len(ids),
                                   "rel_l2": {lv: math.sqrt(e / r) for lv, (e, r) in sq.items()},
                                   "loss_kd_rel_dev": dev["rel_dev"][name]}
        log(f"  candidate {name}: {raw / nbytes:.2f}x, rel L2 {levels[0]} {out['candidates'][name]['rel_l2'][levels[0]]:.4f}, "
            f"max loss_kd deviation {max(dev['rel_dev'][name].values()):.2e}")
    gc.collect()
    return out


def run(ctx: dict, results: dict) -> None:
    log("codec candidates")
    results["codec_candidates"] = {size: measure_codec_candidates(size, ctx, ctx["plan"]["loss_batches"][size])
                                   for size in SIZES}

"""Feature codecs: how one image's float32 features of one level and view become stored values and back.

A codec is the triple (numeric quantisation done here with numpy, a spatial predictor on the codes,
zarr byte codecs applied per inner chunk). `fp16` stores half floats; `int8` stores per-channel
affine-quantised bytes plus a scale and an offset per (image, view, level, channel) in side arrays.
`int8-std<a>` (e.g. `int8-std0.2`) is the lossy one: stored and decoded exactly as `int8`, but its step
is `a` standard deviations of the channel at the finest level and halves with each doubling of the
stride (never finer than int8's): every distillation loss averages its levels with equal weight while a
level has a quarter of the positions of the one below, so the bytes for a given error in the loss are
least when the step's square is proportional to the positions.

Both int8 codecs store their codes through the plane predictor: each byte is the code minus (left + up
- up-left), modulo 256, so a smooth feature map becomes bytes near 0 that zstd's entropy stage, given
the bytes unshuffled, codes in 2-4 bits; decoding is two running sums. It is lossless on the codes. On
fp16 bit patterns it gains under 10% (their low mantissa bits are noise), so fp16 stays without one.
The zarr part is built lazily so this module only needs numpy to import.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

# zstd level for blosc. Level 1, not blosc's default 5: measured on the embedded teacher's features,
# it costs 3% more bytes (fp16, int8) to 4% (int8-std0.3) and a third of the CPU (fp16 write 88 -> 29 ms
# per image), which stage one's writer thread takes from the teacher's inference (make bench, section 2).
BLOSC_CLEVEL = 1
FP16_MAX = float(np.finfo(np.float16).max)  # 65504


@dataclass(frozen=True)
class QuantParams:
    """Per-channel affine parameters: value = stored * scale + offset, shapes (C,) float32."""

    scale: np.ndarray
    offset: np.ndarray


# Spatial predictors of stored integer codes: "none", or "plane" (residual of left + up - up-left).
PREDICTORS = ("none", "plane")


def plane_residuals_(codes: np.ndarray) -> None:
    """In place: codes (C, h, w) of an unsigned dtype -> code - (left + up - up_left), wrapping.

    Equal to a difference along w, then along h (numpy buffers the overlapping operands), so the
    inverse is a running sum along h, then along w.
    """
    codes[:, :, 1:] -= codes[:, :, :-1]
    codes[:, 1:, :] -= codes[:, :-1, :]


def plane_restore(residuals: np.ndarray) -> np.ndarray:
    """Codes from plane residuals (C, h, w) uint8: running sums along h and w, wrapping at 256.

    torch's uint8 cumsum runs about 4x faster than numpy's along the last axis on one thread.
    """
    import torch

    if residuals.dtype != np.uint8:
        raise TypeError(f"the plane predictor is defined on uint8 codes, got {residuals.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(residuals))
    return torch.cumsum(torch.cumsum(t, dim=1, dtype=torch.uint8), dim=2, dtype=torch.uint8).numpy()


@dataclass(frozen=True)
class FeatureCodec:
    """One codec: stored dtype, numpy (de)quantisation of a (C, h, w) block, predictor, zarr inner codecs."""

    name: str
    dtype: np.dtype
    quantised: bool  # True: needs the scale/<level> and offset/<level> side arrays
    quantise_into: Callable[..., QuantParams | None]  # (float32 x, out of `dtype`, step_scale)
    dequantise: Callable[[np.ndarray, QuantParams | None], np.ndarray]
    blosc_typesize: int
    blosc_shuffle: str = "bitshuffle"  # "noshuffle" lets zstd's Huffman stage see whole byte values
    blosc_clevel: int = BLOSC_CLEVEL
    predictor: str = "none"
    # Serialise each inner chunk channels-last (zarr's transpose codec): the zero padding of an edge tile
    # is then one run at the end of the chunk instead of one run per channel, which zstd level 1 codes in
    # a few bytes instead of ~18 per channel (12% of an int8-std0.2 store at the embedded size, 3% at COCO
    # size). fp16 stays channels-first: bit-shuffled half floats grow 12% at COCO size in that order.
    channels_last_chunks: bool = False

    def __post_init__(self) -> None:
        if self.predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor {self.predictor!r}; choose one of {PREDICTORS}")
        if self.predictor == "plane" and self.dtype != np.uint8:
            raise ValueError(f"codec {self.name}: the plane predictor needs uint8 codes, not {self.dtype}")

    def with_predictor(self, predictor: str) -> "FeatureCodec":
        """This codec with another predictor (a store of format version 1 has none)."""
        return self if predictor == self.predictor else replace(self, predictor=predictor)

    def encode_into(self, x: np.ndarray, out: np.ndarray, step_scale: float = 1.0) -> QuantParams | None:
        """Write the stored values of float32 features x (C, h, w) into `out` (a view is fine).

        step_scale: the level's factor on a lossy codec's step, finest stride / the level's stride
        (StoreLayout.step_scale); lossless codecs ignore it.
        """
        params = self.quantise_into(x, out, step_scale)
        if self.predictor == "plane":
            plane_residuals_(out)
        return params

    def encode(self, x: np.ndarray, step_scale: float = 1.0) -> tuple[np.ndarray, QuantParams | None]:
        """Stored values (and quantisation parameters) of float32 features (C, h, w)."""
        out = np.empty(x.shape, dtype=self.dtype)
        return out, self.encode_into(x, out, step_scale)

    def decode(self, stored: np.ndarray, params: QuantParams | None = None) -> np.ndarray:
        """float32 features (C, h, w) from stored values (and their quantisation parameters)."""
        if self.predictor == "plane":
            stored = plane_restore(stored)
        return self.dequantise(stored, params)

    def zarr_filters(self) -> list[Any]:
        """Array-to-array codecs of each inner chunk (N, V, C, h, w): a transpose to channels-last, or none."""
        from zarr.codecs import TransposeCodec

        return [TransposeCodec(order=(0, 1, 3, 4, 2))] if self.channels_last_chunks else []

    def zarr_compressors(self) -> list[Any]:
        """Bytes-to-bytes codecs of each inner chunk: blosc(zstd, the codec's shuffle) then a crc32c checksum."""
        from zarr.codecs import BloscCodec, Crc32cCodec

        return [
            BloscCodec(cname="zstd", clevel=self.blosc_clevel, shuffle=self.blosc_shuffle, typesize=self.blosc_typesize),
            Crc32cCodec(),
        ]


def _non_finite_error(x: np.ndarray) -> ValueError:
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    return ValueError(f"features contain {bad} non-finite values (NaN/inf); the teacher output is broken")


def _encode_fp16_into(x: np.ndarray, out: np.ndarray, step_scale: float = 1.0) -> None:
    """Cast straight into `out` (the writer's shard block); range is checked on float32 min/max (fast)."""
    lo, hi = float(x.min()), float(x.max())  # NaN and inf propagate into min/max
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise _non_finite_error(x)
    if max(-lo, hi) > FP16_MAX:
        raise ValueError(
            f"features exceed the float16 range (max |x| = {max(-lo, hi):.4g} > {FP16_MAX:g}); "
            "use codec 'int8', which has no range limit"
        )
    np.copyto(out, x, casting="unsafe")
    return None


def _decode_fp16(stored: np.ndarray, params: QuantParams | None = None) -> np.ndarray:
    return stored.astype(np.float32)


def _encode_int8_into(x: np.ndarray, out: np.ndarray, step_scale: float = 1.0, step_std: float = 0.0) -> QuantParams:
    """Per-channel affine code in 0..255: step (max - min) / 255, or step_std * step_scale * the channel's
    std when larger.

    int8 is step_std 0 (max abs error scale / 2 per channel). int8-std<a> makes the error a fixed
    fraction of each channel's spread, so losses that normalise per channel (nst, attention) see every
    channel equally perturbed.
    """
    channels = x.shape[0]
    flat = x.reshape(channels, -1)
    if flat.shape[1] == 0:
        raise ValueError(f"cannot quantise empty features of shape {x.shape}")
    lo = flat.min(axis=1).astype(np.float32)
    hi = flat.max(axis=1).astype(np.float32)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):  # min/max propagate NaN and inf
        raise _non_finite_error(x)
    scale = (hi.astype(np.float64) - lo) / 255.0
    if step_std > 0:
        scale = np.maximum(step_std * step_scale * flat.std(axis=1, dtype=np.float64), scale)
    scale = scale.astype(np.float32)
    scale[~(scale > 0)] = 1.0  # constant channel (or a span below float32 resolution)
    # float32 arithmetic (in place, one temporary): rounding error is ~1e-5 of a step, far below scale / 2.
    q = np.subtract(x, lo[:, None, None], dtype=np.float32)
    q /= scale[:, None, None]
    np.rint(q, out=q)
    np.clip(q, 0, 255, out=q)
    np.copyto(out, q, casting="unsafe")
    return QuantParams(scale=scale, offset=lo)


def _decode_int8(stored: np.ndarray, params: QuantParams | None) -> np.ndarray:
    if params is None:
        raise ValueError("int8 features need their scale and offset to decode")
    out = stored.astype(np.float32)
    out *= np.asarray(params.scale, dtype=np.float32)[:, None, None]
    out += np.asarray(params.offset, dtype=np.float32)[:, None, None]
    return out


CODECS: dict[str, FeatureCodec] = {
    "fp16": FeatureCodec("fp16", np.dtype(np.float16), False, _encode_fp16_into, _decode_fp16, blosc_typesize=2),
    "int8": FeatureCodec("int8", np.dtype(np.uint8), True, _encode_int8_into, _decode_int8, blosc_typesize=1,
                         blosc_shuffle="noshuffle", predictor="plane", channels_last_chunks=True),
}


# int8-std<a>: the step fraction a is part of the name, so the store's layout and fingerprint carry it.
INT8_STD_PATTERN = re.compile(r"int8-std(?P<step>\d+(\.\d+)?)")
# The largest step (at p2, halving per level) that kept every method's loss_kd within 1% at both bench sizes,
# and the smallest of those that is >= 8x smaller than float32 at both (docs/store-format.md, section 4).
LOSSY_DEFAULT = "int8-std0.2"


def int8_std_codec(name: str) -> FeatureCodec:
    """The `int8-std<a>` codec: int8's format with a step of `a` channel standard deviations."""
    match = INT8_STD_PATTERN.fullmatch(name)
    step = float(match["step"]) if match else 0.0
    if not 0 < step <= 8:
        raise ValueError(f"codec {name!r}: the step must be written int8-std<a> with 0 < a <= 8, e.g. {LOSSY_DEFAULT}")
    return FeatureCodec(name, np.dtype(np.uint8), True, functools.partial(_encode_int8_into, step_std=step),
                        _decode_int8, blosc_typesize=1, blosc_shuffle="noshuffle", predictor="plane",
                        channels_last_chunks=True)


def get_codec(name: str) -> FeatureCodec:
    """The codec called `name` (a fixed name, or int8-std<a>); a ValueError lists the known names otherwise."""
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        if isinstance(name, str) and name.startswith("int8-std"):
            return int8_std_codec(name)
        raise ValueError(f"unknown feature codec {name!r}; known codecs: {', '.join(sorted(CODECS))}, "
                         f"int8-std<a> (e.g. {LOSSY_DEFAULT})") from None

"""One stored map as it crosses the DataLoader boundary: codes, not floats, decoded where the student runs.

Decoding to float32 in a DataLoader worker sent 4 bytes per value from the worker to the main process
(about 74 MB per image at COCO size) and spent the worker's CPU on the plane predictor's running sums and
the affine decode. A StoredMap holds the stored representation instead: the int8 codecs' uint8 plane
residuals (1 byte per value) with their per-channel scale and offset, or fp16's half floats (2 bytes).
`decode(device)` runs the running sums and the affine in torch on the student's device (the CPU when
there is none); the result is bitwise equal to `FeatureCodec.decode` (tests/cache/test_stored_map.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StoredMap:
    """A level's (or RPN map's) stored values for one image and view, cropped to the valid size.

    values: (C, h, w) uint8 codes (plane residuals when predictor is "plane") or float16 values.
    scale, offset: (C,) float32 for quantised codecs, else None: value = code * scale + offset.
    mirror: serve the horizontal mirror (a store written with flip "mirror"); dx_rows: with mirror, the
    channels that are box dx deltas and change sign (RPN deltas), else None.
    """

    values: torch.Tensor
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    predictor: str = "none"
    mirror: bool = False
    dx_rows: slice | None = None

    @property
    def nbytes(self) -> int:
        """Bytes this map sends across the DataLoader boundary."""
        side = sum(t.numel() * t.element_size() for t in (self.scale, self.offset) if t is not None)
        return self.values.numel() * self.values.element_size() + side

    def pin_memory(self) -> "StoredMap":
        """A copy in pinned host memory, so the copy to a GPU can overlap compute (non_blocking)."""
        pinned = {name: None if t is None else t.pin_memory() for name, t in
                  (("values", self.values), ("scale", self.scale), ("offset", self.offset))}
        return StoredMap(pinned["values"], pinned["scale"], pinned["offset"], self.predictor, self.mirror, self.dx_rows)

    def decode(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 (C, h, w) on `device`: running sums (plane predictor), affine decode, then the mirror."""
        values = self.values.to(device, non_blocking=True)
        if self.predictor == "plane":
            # Inverse of a difference along w then along h: running sums along h then w, wrapping at 256.
            values = torch.cumsum(torch.cumsum(values, dim=1, dtype=torch.uint8), dim=2, dtype=torch.uint8)
        out = values.float()
        if self.scale is not None:
            # Two roundings, as numpy's `out *= scale; out += offset`: a fused multiply-add would differ in the last bit.
            out = out * self.scale.to(device, non_blocking=True)[:, None, None]
            out = out + self.offset.to(device, non_blocking=True)[:, None, None]
        if self.mirror:
            out = torch.flip(out, dims=[-1])
            if self.dx_rows is not None:
                out[self.dx_rows] *= -1
        return out


def decode_maps(maps: dict[str, "StoredMap | torch.Tensor"], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Decode every map of one image's entry on `device` (a float tensor, e.g. a live teacher's, is moved)."""
    return {key: m.decode(device) if isinstance(m, StoredMap) else m.to(device, non_blocking=True)
            for key, m in maps.items()}

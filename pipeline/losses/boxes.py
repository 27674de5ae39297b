"""Ground-truth boxes on FPN levels, for the methods that split features into objects and background.

Boxes arrive per image as (n, 4) x1, y1, x2, y2 in input pixels of the image the student sees
(resized, and flipped when the sample is flipped: detectron2's mapper applies the image's own
transforms to its annotations). Cell (i, j) of a level of stride s covers input pixels
[j s, (j + 1) s) x [i s, (i + 1) s), the area the backbone's stride-s grid assigns to it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_boxes(method: str, boxes: Sequence[Tensor] | None, strides: Sequence[int] | None,
                students: Sequence[Tensor]) -> None:
    """Raise ValueError unless there is one (n_i, 4) box tensor per image and one stride per level."""
    batch = students[0].shape[0]
    if boxes is None or len(boxes) != batch:
        raise ValueError(f"{method} needs each image's ground-truth boxes, one (n, 4) tensor per image of the "
                         f"batch of {batch}: got {None if boxes is None else len(boxes)} (the Distiller passes "
                         "the batch's instances.gt_boxes when the loss has needs_boxes)")
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"{method}: boxes of image {i} must be (n, 4) x1, y1, x2, y2, got {tuple(b.shape)}")
    if strides is None or len(strides) != len(students):
        raise ValueError(f"{method} needs each FPN level's stride to scale boxes to it, one per level "
                         f"({len(students)}): got {strides!r}")


def box_cells(boxes: Tensor, stride: int, shape: tuple[int, int]) -> Tensor:
    """(n, H, W) bool: the cells of an (H, W) level at `stride` that each box overlaps.

    Box columns are floor(x1 / s) <= j < ceil(x2 / s), at least one, and rows likewise: every cell the
    box touches, and the rule is mirror-symmetric, so a flipped image's box covers the mirrored cells
    of the unflipped one (when the width is a multiple of s, the only case where cells mirror exactly).
    """
    height, width = shape
    scaled = boxes.to(torch.float64) / stride
    x0, y0 = scaled[:, 0].floor(), scaled[:, 1].floor()
    x1, y1 = torch.maximum(scaled[:, 2].ceil(), x0 + 1), torch.maximum(scaled[:, 3].ceil(), y0 + 1)
    cols = torch.arange(width, device=boxes.device, dtype=torch.float64)
    rows = torch.arange(height, device=boxes.device, dtype=torch.float64)
    in_cols = (cols >= x0[:, None]) & (cols < x1[:, None])  # (n, W)
    in_rows = (rows >= y0[:, None]) & (rows < y1[:, None])  # (n, H)
    return in_rows[:, :, None] & in_cols[:, None, :]


def fpn_level_of(boxes: Tensor, strides: Sequence[int]) -> Tensor:
    """(n,) index into strides of each box's FPN level: k = floor(4 + log2(sqrt(w h) / 224)).

    FPN's RoI-to-level rule (Lin et al. 2017, Eq. 1; detectron2's assign_boxes_to_levels, and the
    rule DeFeat's code uses with finest scale 56), clamped to the given levels: a box goes to the
    level whose log2(stride) is nearest to its k.
    """
    sides = ((boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)).sqrt()
    k = torch.floor(4 + torch.log2(sides.to(torch.float64) / 224 + 1e-8))
    exponents = torch.tensor([math.log2(s) for s in strides], dtype=torch.float64, device=boxes.device)
    return (k[:, None] - exponents[None, :]).abs().argmin(dim=1)

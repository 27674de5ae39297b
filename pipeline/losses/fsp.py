"""Flow of solution procedure (Yim et al., CVPR 2017)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DistillLoss, check_levels, full_precision, register_loss, valid_counts, zero_padding


def pooled_to(features: Tensor, mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Masked average of the (B, C, H, W) map over k x k windows (k = ceil(H / h)) down to `size` (h, w).

    Windows start at multiples of k whatever the map's total size, so a padded image pools like the
    image alone; padded positions enter neither sum nor count.
    """
    k = max(math.ceil(features.shape[-2] / size[0]), math.ceil(features.shape[-1] / size[1]))
    if (math.ceil(features.shape[-2] / k), math.ceil(features.shape[-1] / k)) != tuple(size):
        raise ValueError(f"fsp relates consecutive levels: a {tuple(features.shape[-2:])} map does not pool to "
                         f"{tuple(size)} with a whole window size (got {k}); check DISTILL.LEVELS are consecutive")
    sums = F.avg_pool2d(zero_padding(features, mask), k, ceil_mode=True, divisor_override=1)
    counts = F.avg_pool2d(mask.to(features.dtype), k, ceil_mode=True, divisor_override=1)
    return sums / counts.clamp_min(1)


def fsp_matrix(finer: Tensor, finer_mask: Tensor, coarser: Tensor, coarser_mask: Tensor) -> Tensor:
    """(B, C1, C2) FSP matrices: the finer map pooled to the coarser's size, inner products averaged over valid positions."""
    pooled = zero_padding(pooled_to(finer, finer_mask, tuple(coarser.shape[-2:])), coarser_mask)
    gram = pooled.flatten(2) @ zero_padding(coarser, coarser_mask).flatten(2).transpose(1, 2)
    return gram / valid_counts(coarser_mask).clamp_min(1)[:, None, None]


@register_loss("fsp")
class FSPLoss(DistillLoss):
    """FSP: A Gift from Knowledge Distillation (Yim et al. 2017), FSP matrices between consecutive layers.

    Adapted to detection: the consecutive layers are consecutive FPN levels (p2-p3, ..., p5-p6).
    The finer level is average-pooled to the coarser one's size over valid positions only (k x k
    windows, k = 2 for FPN), and the Gram matrix is averaged over the coarser level's valid
    positions. The loss is the mean squared difference of student and teacher matrices over
    (B, C, C), averaged over level pairs. Widths must match (the Distiller's 1x1 connectors map
    the student to the teacher's width first).
    """

    default_weight = 0.002  # B that starts loss_kd near 0.5 on the embedded default (tools/measure_weights.py)

    def forward(self, students: Sequence[Tensor], teachers: Sequence[Tensor], masks: Sequence[Tensor]) -> Tensor:
        check_levels(students, teachers, masks)
        if len(students) < 2:
            raise ValueError(f"fsp relates consecutive levels, so it needs at least 2 levels, got {len(students)}")
        for level, (s, t) in enumerate(zip(students, teachers)):
            if s.shape[1] != t.shape[1]:
                raise ValueError(f"level {level}: fsp needs equal widths, got student {s.shape[1]} and teacher "
                                 f"{t.shape[1]}; put a 1x1 connector in front of the student")
        with full_precision(students[0]):
            losses = []
            for i in range(len(students) - 1):
                pair = masks[i], masks[i + 1]
                s = fsp_matrix(students[i].float(), pair[0], students[i + 1].float(), pair[1])
                with torch.no_grad():
                    t = fsp_matrix(teachers[i].float(), pair[0], teachers[i + 1].float(), pair[1])
                losses.append((s - t).pow(2).mean())
        return torch.stack(losses).mean()

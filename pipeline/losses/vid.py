"""Variational information distillation (Ahn et al., CVPR 2019)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DistillLoss, masked_mean, register_loss

# Learned variances start at init_variance and never fall below this (as RepDistiller).
_MIN_VARIANCE = 1e-5


def regressor(student_channels: int, mid_channels: int, teacher_channels: int) -> nn.Sequential:
    """VID's mean regressor: three 1x1 convolutions with ReLUs, student width to teacher width."""
    return nn.Sequential(
        nn.Conv2d(student_channels, mid_channels, 1), nn.ReLU(),
        nn.Conv2d(mid_channels, mid_channels, 1), nn.ReLU(),
        nn.Conv2d(mid_channels, teacher_channels, 1),
    )


@register_loss("vid")
class VIDLoss(DistillLoss):
    """VID: Variational Information Distillation (Ahn et al. 2019), a Gaussian likelihood of the teacher.

    Adapted to detection: per FPN level a regressor (1x1 convs, as RepDistiller) predicts the
    teacher's features from the student's, with a learned variance per teacher channel
    (softplus of a parameter, plus 1e-5). The loss is the Gaussian negative log-likelihood
    0.5 * ((mu - t)^2 / var + log var) averaged over valid positions and channels only, then over
    levels. The regressor runs on the map with its padding zeroed (DistillLoss.forward), and a 1x1
    regressor sees no neighbours, so padding reaches neither the value nor a gradient.
    """

    default_weight = 0.2  # B that starts loss_kd near 0.5 on the embedded default (tools/measure_weights.py)

    own_connectors = True
    shape_args = ("student_channels", "teacher_channels", "num_levels")

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int, mid_channels: int | None = None,
                 init_variance: float = 5.0) -> None:
        super().__init__()
        mid = mid_channels or teacher_channels
        self.regressors = nn.ModuleList(regressor(student_channels, mid, teacher_channels) for _ in range(num_levels))
        # softplus(raw) + 1e-5 == init_variance at the start.
        raw = math.log(math.expm1(init_variance - _MIN_VARIANCE))
        self.raw_variances = nn.Parameter(torch.full((num_levels, teacher_channels), raw))

    def variance(self, level: int) -> Tensor:
        """(C,) the level's learned per-channel variance."""
        return F.softplus(self.raw_variances[level]) + _MIN_VARIANCE

    def forward(self, students, teachers, masks) -> Tensor:
        if len(students) != len(self.regressors):
            raise ValueError(f"vid was built for {len(self.regressors)} levels, got {len(students)}")
        return super().forward(students, teachers, masks)

    def level_loss_at(self, level: int, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        mean = self.regressors[level](student)
        variance = self.variance(level)[None, :, None, None]
        nll = 0.5 * ((mean - teacher).pow(2) / variance + variance.log())
        return masked_mean(nll, mask)


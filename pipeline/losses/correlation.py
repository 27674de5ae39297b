"""Correlation congruence (Peng et al., ICCV 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DistillLoss, register_loss, sample_valid_vectors


def gaussian_correlation(x: Tensor, gamma: float) -> Tensor:
    """(N, N) Gaussian RBF kernel exp(-gamma ||x_i - x_j||^2) between the rows of x."""
    return torch.exp(-gamma * torch.cdist(x, x).pow(2))


@register_loss("correlation")
class CorrelationLoss(DistillLoss):
    """CC: Correlation Congruence for Knowledge Distillation (Peng et al. 2019), with its embedding heads.

    Adapted to detection: the instances whose correlations are compared are the C-vectors at
    up to max_samples valid positions of the batch (evenly spaced, as rkd), per level. Each is
    mapped by a per-level linear embedding to `embed_dim` and L2-normalised; the correlation is the
    paper's Gaussian RBF kernel (computed exactly, not by its Taylor series), and the loss is the
    mean over the N x N entries of (C_s - C_t)^2, averaged over levels. The student embedding is
    trained; the teacher embedding is a fixed random projection (RepDistiller trains it too, but
    then both embeddings can collapse to one point, where every correlation is 1 and the loss 0).
    """

    default_weight = 30.0  # B that starts loss_kd near 0.5 on the embedded default (tools/measure_weights.py)

    own_connectors = True
    shape_args = ("student_channels", "teacher_channels", "num_levels")

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int, embed_dim: int = 128,
                 gamma: float = 0.4, max_samples: int = 256) -> None:
        super().__init__()
        if max_samples < 2:
            raise ValueError(f"correlation relates pairs of positions, so max_samples must be >= 2, got {max_samples}")
        self.gamma = gamma
        self.max_samples = max_samples
        self.embed_student = nn.ModuleList(nn.Linear(student_channels, embed_dim) for _ in range(num_levels))
        self.embed_teacher = nn.ModuleList(nn.Linear(teacher_channels, embed_dim) for _ in range(num_levels))
        self.embed_teacher.requires_grad_(False)

    def forward(self, students, teachers, masks) -> Tensor:
        if len(students) != len(self.embed_student):
            raise ValueError(f"correlation was built for {len(self.embed_student)} levels, got {len(students)}")
        return super().forward(students, teachers, masks)

    def level_loss_at(self, level: int, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        s = F.normalize(self.embed_student[level](sample_valid_vectors(student, mask, self.max_samples)), dim=1)
        with torch.no_grad():
            t = F.normalize(self.embed_teacher[level](sample_valid_vectors(teacher, mask, self.max_samples)), dim=1)
        return (gaussian_correlation(s, self.gamma) - gaussian_correlation(t, self.gamma)).pow(2).mean()

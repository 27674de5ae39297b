"""Relational knowledge distillation (Park et al., CVPR 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DistillLoss, register_loss, sample_valid_vectors

# Squared distances are clamped here before the square root so its gradient stays finite
# for coinciding samples (the same floor RepDistiller uses).
_MIN_SQUARED_DISTANCE = 1e-12


def normalised_distances(x: Tensor) -> Tensor:
    """(N, N) Euclidean distances between the rows of x, divided by their off-diagonal mean."""
    squared_norms = x.pow(2).sum(dim=1)
    squared = (squared_norms[:, None] + squared_norms[None, :] - 2 * x @ x.T).clamp_min(_MIN_SQUARED_DISTANCE)
    off_diagonal = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    distances = torch.where(off_diagonal, squared.sqrt(), torch.zeros((), dtype=x.dtype, device=x.device))
    return distances / distances[off_diagonal].mean()


def vertex_angles(x: Tensor) -> Tensor:
    """(N, N, N) cosines: [i, j, k] = cos of the angle at x_i between x_j and x_k (0 if j or k is i)."""
    directions = F.normalize(x[None, :, :] - x[:, None, :], dim=2)  # [i, j] = unit(x_j - x_i)
    return directions @ directions.transpose(1, 2)


@register_loss("rkd")
class RKDLoss(DistillLoss):
    """RKD: Relational Knowledge Distillation (Park et al. 2019), distance and angle terms.

    Adapted to detection: the samples are the C-vectors at valid spatial positions of all
    images of the batch (padding never sampled). The angle term builds an N x N x C tensor,
    so at most max_samples positions are used, spread evenly over the valid positions
    (deterministic, same positions for student and teacher). Smooth-L1 over the full N x N
    and N x N x N tensors, weights 25 and 50, as RepDistiller. Channel widths may differ.
    """

    default_weight = 0.2  # B that starts loss_kd near 0.5 on the embedded default (tools/measure_weights.py)

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, max_samples: int = 128) -> None:
        super().__init__()
        if max_samples < 2:
            raise ValueError(f"rkd relates pairs of positions, so max_samples must be >= 2, got {max_samples}")
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.max_samples = max_samples

    def sample(self, features: Tensor, mask: Tensor) -> Tensor:
        """The (N <= max_samples, C) position vectors this loss compares."""
        return sample_valid_vectors(features, mask, self.max_samples)

    def level_loss(self, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        return self.relation_loss(self.sample(student, mask), self.sample(teacher, mask))

    def relation_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The RKD loss between two (N, C) sets of samples, row i of each from the same position."""
        if student.shape[0] < 2:
            return student.sum() * 0  # a single sample has no relations; keep the graph connected
        with torch.no_grad():
            teacher_distances = normalised_distances(teacher)
            teacher_angles = vertex_angles(teacher)
        distance_loss = F.smooth_l1_loss(normalised_distances(student), teacher_distances)
        angle_loss = F.smooth_l1_loss(vertex_angles(student), teacher_angles)
        return self.distance_weight * distance_loss + self.angle_weight * angle_loss

"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018)."""
from __future__ import annotations

from torch import Tensor

from .base import DistillLoss, register_loss, sample_valid_vectors


def cosine_probabilities(x: Tensor, eps: float) -> Tensor:
    """(N, N) row-stochastic matrix from the cosine kernel (K + 1) / 2 between the rows of x."""
    unit = x / (x.norm(dim=1, keepdim=True) + eps)
    kernel = (unit @ unit.T + 1) / 2
    return kernel / kernel.sum(dim=1, keepdim=True)


@register_loss("pkt")
class PKTLoss(DistillLoss):
    """PKT: Probabilistic Knowledge Transfer (Passalis & Tefas 2018), KL between affinity distributions.

    Adapted to detection: the samples are the C-vectors at valid spatial positions of all
    images of the batch, at most max_samples of them spread evenly over the valid positions
    (deterministic, same positions for student and teacher), which bounds the N x N kernel.
    The loss is the mean over the N x N entries of p_t log((p_t + eps) / (p_s + eps)), eps 1e-7,
    as RepDistiller. Channel widths may differ.
    """

    default_weight = 20000.0  # B that starts loss_kd near 0.5 on the embedded default (tools/measure_weights.py)

    def __init__(self, max_samples: int = 512, eps: float = 1e-7) -> None:
        super().__init__()
        if max_samples < 1:
            raise ValueError(f"pkt needs max_samples >= 1, got {max_samples}")
        self.max_samples = max_samples
        self.eps = eps

    def sample(self, features: Tensor, mask: Tensor) -> Tensor:
        """The (N <= max_samples, C) position vectors this loss compares."""
        return sample_valid_vectors(features, mask, self.max_samples)

    def level_loss(self, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        return self.relation_loss(self.sample(student, mask), self.sample(teacher, mask))

    def relation_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        """KL(teacher || student) between the affinity distributions of two (N, C) sample sets."""
        p_teacher = cosine_probabilities(teacher, self.eps)
        p_student = cosine_probabilities(student, self.eps)
        return (p_teacher * ((p_teacher + self.eps) / (p_student + self.eps)).log()).mean()

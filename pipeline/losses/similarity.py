"""Similarity-preserving distillation (Tung & Mori, ICCV 2019)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import DistillLoss, register_loss, zero_padding


def batch_similarity(features: Tensor, mask: Tensor) -> Tensor:
    """The (B, B) Gram matrix of the batch's flattened, padding-zeroed maps, rows L2-normalised."""
    flat = zero_padding(features, mask).flatten(1)
    return F.normalize(flat @ flat.T, dim=1)


@register_loss("similarity")
class SimilarityLoss(DistillLoss):
    """Similarity: SP (Tung & Mori 2019), pairwise similarities between the images of a batch.

    Adapted to detection: the samples are the images of the batch, each flattened with its
    padding zeroed, so padding adds nothing to any dot product. The loss is
    ||G_s - G_t||_F^2 / B^2 as in the paper. With detectron2's 2 images per GPU G is 2x2 and
    its rows normalised, a weak signal; with 1 image per GPU G is 1x1 = [1] for both
    networks and the loss is identically 0. Channel widths may differ.
    """

    default_weight = 30.0  # B that starts loss_kd near 0.5 on the embedded default (tools/measure_weights.py)

    def level_loss(self, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        batch = student.shape[0]
        difference = batch_similarity(student, mask) - batch_similarity(teacher, mask)
        return difference.pow(2).sum() / batch**2

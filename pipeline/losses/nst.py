"""Neuron selectivity transfer (Huang & Wang, 2017)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import DistillLoss, register_loss, zero_padding


def channel_maps(features: Tensor, mask: Tensor) -> Tensor:
    """Each channel's map over the image, padding zeroed, L2-normalised: shape (B, C, H*W)."""
    return F.normalize(zero_padding(features, mask).flatten(2), dim=2)


def mean_polynomial_kernel(a: Tensor, b: Tensor) -> Tensor:
    """Per image, the mean over channel pairs of (a_i . b_j)^2: shape (B,).

    A (B, Ca, Cb) matmul; RepDistiller's broadcast builds (B, Ca, Cb, H*W), which at p2 of a
    COCO image (about 54k positions) does not fit in memory.
    """
    return (a @ b.transpose(1, 2)).pow(2).mean(dim=(1, 2))


@register_loss("nst")
class NSTLoss(DistillLoss):
    """NST: Neural Selectivity Transfer (Huang & Wang 2017), MMD with kernel (x . y)^2.

    Adapted to detection: per image, every channel's map is normalised over the image's
    valid positions (padding is zeroed, so it adds nothing to the norm or the dot products);
    the channels are the samples of the MMD, so the widths may differ. The MMD is computed
    with matmuls, B x C x C, and averaged over images.
    """

    default_weight = 10.0  # B that starts loss_kd near 0.5 on the embedded default (tools/measure_weights.py)

    def level_loss(self, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        s, t = channel_maps(student, mask), channel_maps(teacher, mask)
        mmd = mean_polynomial_kernel(t, t) + mean_polynomial_kernel(s, s) - 2 * mean_polynomial_kernel(s, t)
        return mmd.mean()

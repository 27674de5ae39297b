"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import DistillLoss, register_loss, valid_counts, zero_padding


def attention_map(features: Tensor, mask: Tensor, p: float) -> Tensor:
    """Per image, mean over channels of |f|^p, 0 on padding, L2-normalised: shape (B, H*W)."""
    energy = zero_padding(features, mask).abs().pow(p).mean(dim=1).flatten(1)
    # Padding is 0 here, so this norm runs over the image's valid positions only.
    return F.normalize(energy, dim=1)


@register_loss("attention")
class AttentionLoss(DistillLoss):
    """Attention: AT (Zagoruyko & Komodakis 2017), spatial attention maps with p=2.

    Adapted to detection: the map of each image is normalised over its own valid positions
    and the squared difference is averaged over those positions, then over images.
    RepDistiller averages over all B x H x W entries, which would let padding dilute the
    mean; here padding neither enters the normalisation nor the mean. Channel widths may
    differ (the map averages over channels).
    """

    default_weight = 100.0  # B that starts loss_kd near 0.5 on the embedded default (tools/measure_weights.py)

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"attention needs a positive exponent p (the paper uses 2), got p={p}")
        self.p = p

    def level_loss(self, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        squared = (attention_map(student, mask, self.p) - attention_map(teacher, mask, self.p)).pow(2)
        per_image = squared.sum(dim=1) / valid_counts(mask).clamp_min(1)
        return per_image.mean()

"""Channel-wise distillation (Shu et al., ICCV 2021)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import DistillLoss, register_loss


def masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """(B, C, H*W) log-softmax of each image's channel over its valid positions only; 0 on padding.

    Padding is set to -inf before the softmax (so it takes no probability) and the result is
    zeroed there after it, so neither inf nor NaN in the padding reaches the value or the gradient.
    """
    keep = mask.flatten(2)
    log_probs = torch.log_softmax(logits.flatten(2).masked_fill(~keep, float("-inf")), dim=2)
    return torch.where(keep, log_probs, torch.zeros((), dtype=log_probs.dtype, device=log_probs.device))


@register_loss("cwd")
class ChannelWiseDivergenceLoss(DistillLoss):
    """CWD: Channel-wise Knowledge Distillation for Dense Prediction (Shu et al. 2021).

    Each channel of a level becomes a distribution over spatial positions, softmax(f / T); the
    loss is T^2 * KL(teacher || student) per image and channel, averaged over images and channels
    (mmrazor's sum / (N * C)), then over levels. Adapted to detection: the softmax runs over each
    image's valid positions only, so padding takes no probability and a padded image scores like
    its crop. The widths must match; the Distiller's 1x1 connectors map the student first (the
    paper's 1x1 conv when widths differ).
    """

    # Not measured (no trained embedded teacher at hand): the B the paper's config implies here,
    # mmrazor's loss_weight 10 per level x 5 levels (docs/methods.md).
    default_weight = 50.0

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"cwd needs a positive temperature (mmrazor's detection configs use 1), got {temperature}")
        self.temperature = temperature

    def level_loss(self, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(
                f"cwd compares channel by channel, so student and teacher need the same channel count, got "
                f"student {student.shape[1]} and teacher {teacher.shape[1]}; put a 1x1 connector in front of the "
                "student (the Distiller does when FPN widths differ)"
            )
        t = self.temperature
        log_p_student = masked_log_softmax(student / t, mask)
        log_p_teacher = masked_log_softmax(teacher / t, mask)
        p_teacher = torch.where(mask.flatten(2), log_p_teacher.exp(), torch.zeros((), dtype=student.dtype,
                                                                                  device=student.device))
        kl = (p_teacher * (log_p_teacher - log_p_student)).sum(dim=2)  # (B, C)
        return t * t * kl.mean()

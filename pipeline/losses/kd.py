"""Dense knowledge distillation of the RPN's objectness (after Hinton et al., 2015)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import DistillLoss, masked_mean, register_loss


def binary_kl_with_logits(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per value KL(Bernoulli(sigmoid(t)) || Bernoulli(sigmoid(s))): the soft-target BCE minus the teacher's entropy."""
    target = teacher_logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(student_logits, target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher_logits, target, reduction="none")
    return cross_entropy - entropy


@register_loss("kd")
class RPNObjectnessKDLoss(DistillLoss):
    """KD: Distilling the Knowledge in a Neural Network (Hinton et al. 2015), on the RPN's objectness.

    A two-stage detector's classification logits belong to proposals that change every step, so
    they cannot be stored. The RPN's objectness logits are dense, one per anchor (A per position)
    and per level, in the features' layout, so a store can serve them (DISTILL.CACHE.RPN True).
    Each anchor's objectness is a binary distribution: the loss is T^2 * KL(teacher || student)
    of sigmoid(logit / T), averaged over valid positions and anchors, then over levels (the BCE
    runs on maps whose padding is zeroed first, so NaN padding gives no NaN gradient). It is not
    classification-logit KD (the ROI head's class scores are not distilled) and leaves the box
    deltas (stored too) alone. Student and teacher need the same anchors per position.
    """

    default_weight = 0.1  # B that starts loss_kd near 0.5 on the embedded default (tools/measure_weights.py)

    source = "rpn_objectness"

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"kd needs a positive temperature, got {temperature}")
        self.temperature = temperature

    def level_loss(self, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(f"kd compares objectness anchor by anchor, but the student's RPN has {student.shape[1]} "
                             f"anchors per position and the teacher's {teacher.shape[1]}; use the teacher's "
                             "MODEL.ANCHOR_GENERATOR sizes and aspect ratios for the student")
        t = self.temperature
        return t * t * masked_mean(binary_kl_with_logits(student / t, teacher / t), mask)

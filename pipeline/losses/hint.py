"""FitNets hint loss (Romero et al., ICLR 2015)."""
from __future__ import annotations

from torch import Tensor

from .base import DistillLoss, register_loss, valid_counts, zero_padding


@register_loss("hint")
class HintLoss(DistillLoss):
    """Hint: FitNets (Romero et al. 2015), an MSE between student and teacher features.

    Adapted to detection: the squared error is summed over valid positions only and divided
    by (valid positions x channels), so padding neither adds zeros to the mean nor, whatever
    it holds, changes it. The widths must match; when they do not, the caller puts a 1x1
    connector (FitNets' regressor) in front of the student.
    """

    default_weight = 0.05  # B that starts loss_kd near 0.5 on the embedded default (tools/measure_weights.py)

    def level_loss(self, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(
                f"hint compares features value by value, so student and teacher need the same channel "
                f"count, got student {student.shape[1]} and teacher {teacher.shape[1]}; put a 1x1 "
                "connector in front of the student to map its width to the teacher's"
            )
        squared_error = (zero_padding(student, mask) - zero_padding(teacher, mask)).pow(2).sum()
        values = valid_counts(mask).sum() * student.shape[1]
        return squared_error / values.clamp_min(1)

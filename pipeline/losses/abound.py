"""Activation boundaries (Heo et al., AAAI 2019)."""
from __future__ import annotations

from torch import Tensor, nn

from .base import DistillLoss, masked_mean, register_loss


def boundary_loss(student: Tensor, teacher: Tensor, margin: float) -> Tensor:
    """The paper's alternative (hinge-like squared) loss per value: push the student to the teacher's side of 0."""
    teacher_on = teacher > 0
    off_wrong = (student > -margin) & ~teacher_on
    on_wrong = (student <= margin) & teacher_on
    return (student + margin).pow(2) * off_wrong + (student - margin).pow(2) * on_wrong


@register_loss("abound")
class ABLoss(DistillLoss):
    """AB: Activation Boundaries formed by hidden neurons (Heo et al. 2019), with its connector.

    Adapted to detection: per FPN level a 1x1 conv connector maps the student to the teacher's
    width (RepDistiller adds BatchNorm there; its batch statistics would count padding, so it is
    left out), run on the map with its padding zeroed. The teacher's activation boundary is the
    sign of its FPN output. The loss (margin 1, as RepDistiller) is averaged over valid positions
    and channels, then over levels (RepDistiller sums, weights later layers more and divides by
    batch x 1000 / 3; FPN levels are parallel, so they are weighted equally here).

    Init stage ("student"): before training, the student backbone and the connectors are trained
    on this loss alone for DISTILL.INIT_ITERS iterations, as RepDistiller's init epochs. The main
    training keeps it in loss_kd (RepDistiller then drops it; DISTILL.B 0 does the same).
    """

    default_weight = 0.2  # B that starts loss_kd near 0.5 on the embedded default (tools/measure_weights.py)

    own_connectors = True
    shape_args = ("student_channels", "teacher_channels", "num_levels")
    init_stage = "student"

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = margin
        self.connectors = nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, 1) for _ in range(num_levels))

    def forward(self, students, teachers, masks) -> Tensor:
        if len(students) != len(self.connectors):
            raise ValueError(f"abound was built for {len(self.connectors)} levels, got {len(students)}")
        return super().forward(students, teachers, masks)

    def level_loss_at(self, level: int, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        return masked_mean(boundary_loss(self.connectors[level](student), teacher, self.margin), mask)

    def init_loss(self, students, teachers, masks) -> Tensor:
        return self(students, teachers, masks)

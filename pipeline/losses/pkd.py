"""PKD: feature imitation through the Pearson correlation coefficient (Cao et al., NeurIPS 2022)."""
from __future__ import annotations

from torch import Tensor

from .base import DistillLoss, register_loss, valid_counts, zero_padding


def standardised(features: Tensor, mask: Tensor, eps: float) -> Tensor:
    """Each image's channels at zero mean and unit variance over its valid positions; padding 0.

    The variance is the population one (divided by n), so the mean over n positions of
    (s_hat - t_hat)^2 / 2 is exactly 1 - r (r: Pearson's correlation) when eps is 0.
    """
    n = valid_counts(mask).clamp_min(1).to(features.dtype)[:, None, None, None]
    x = zero_padding(features, mask)
    centred = zero_padding(x - x.sum(dim=(2, 3), keepdim=True) / n, mask)
    variance = centred.pow(2).sum(dim=(2, 3), keepdim=True) / n
    return centred * (variance + eps).rsqrt()


@register_loss("pkd")
class PKDLoss(DistillLoss):
    """PKD: General Distillation Framework for Object Detectors via Pearson Correlation (Cao et al. 2022).

    Both maps are standardised per channel (zero mean, unit variance) and compared by MSE / 2,
    which is 1 - Pearson's r: the student imitates the teacher's pattern, not its magnitude, and
    no level or channel dominates by scale. Adapted to detection: the statistics are taken per
    image over its valid positions (mmrazor takes them over the whole batch, padding included);
    the loss is averaged over an image's valid positions and channels, then over images, then
    over levels. The widths must match; the Distiller's 1x1 connectors map the student first.
    """

    # Not measured (no trained embedded teacher at hand): the B the paper's config implies here,
    # mmrazor's loss_weight 6 per level x 5 levels (docs/methods.md).
    default_weight = 30.0

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        if eps < 0:
            raise ValueError(f"pkd's eps is added to each channel's variance and must be >= 0, got {eps}")
        self.eps = eps

    def level_loss(self, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(
                f"pkd correlates channel by channel, so student and teacher need the same channel count, got "
                f"student {student.shape[1]} and teacher {teacher.shape[1]}; put a 1x1 connector in front of the "
                "student (the Distiller does when FPN widths differ)"
            )
        gap = (standardised(student, mask, self.eps) - standardised(teacher, mask, self.eps)).pow(2)
        per_image = gap.flatten(1).sum(dim=1) / (valid_counts(mask).clamp_min(1) * student.shape[1])
        return per_image.mean() / 2

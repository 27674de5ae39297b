"""Masked generative distillation (Yang et al., ECCV 2022)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DistillLoss, check_levels, full_precision, masked_mean, register_loss, zero_padding

_MASK64 = (1 << 64) - 1


def mixed_seed(*parts: int) -> int:
    """One generator seed from several non-negative integers (splitmix64 steps): the same on every machine."""
    x = 0
    for part in parts:
        x = (x + part + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1  # 63 bits: torch.Generator.manual_seed accepts it everywhere


class Generation(nn.Module):
    """MGD's generation block: 3x3 conv, ReLU, 3x3 conv at the teacher's width.

    Padding is zeroed before each conv, so a padded image is generated exactly like its crop
    (whose borders the convs' own zero padding sees).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = F.relu(self.conv1(zero_padding(x, mask)))
        return self.conv2(zero_padding(x, mask))


@register_loss("mgd")
class MGDLoss(DistillLoss):
    """MGD: Masked Generative Distillation (Yang et al. 2022), the teacher generated from a masked student.

    Per level, a random spatial mask drops each student position with probability masked_ratio
    (lambda), a generation block (conv3x3-ReLU-conv3x3, trained with the student) turns the masked
    student into the teacher's features, and the loss is the squared error to the teacher. Adapted
    to detection: the error is averaged over valid positions and channels (the paper sums and
    divides by the batch size; the weight B takes the scale), then over levels. The masks are drawn
    per image from a generator seeded by (seed, step, the image's row in the store's index, level),
    at the image's valid size: the same for a cached and a live teacher, for a padded image and its
    crop, on every device, independent of the global random state. `step` counts training forwards
    (a buffer, so a resumed run continues the sequence). The widths must match; the Distiller's 1x1
    connectors map the student first (MGD's `align`).
    """

    # Not measured (no trained embedded teacher at hand): the B the paper's config implies here,
    # yzd-v/MGD's alpha 5e-7 x 256 channels x 1971 positions (p2-p6) (docs/methods.md).
    default_weight = 0.3

    shape_args = ("teacher_channels", "num_levels")
    needs_image_index = True

    def __init__(self, teacher_channels: int, num_levels: int, masked_ratio: float = 0.45, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= masked_ratio <= 1.0:
            raise ValueError(f"mgd's masked_ratio is a probability in [0, 1] (the paper uses 0.45 for two-stage "
                             f"detectors), got {masked_ratio}")
        if seed < 0:
            raise ValueError(f"mgd's seed must be a non-negative integer, got {seed}")
        self.masked_ratio = masked_ratio
        self.seed = int(seed)
        self.generations = nn.ModuleList(Generation(teacher_channels) for _ in range(num_levels))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def keep_masks(self, rows: Tensor, mask: Tensor, level: int) -> Tensor:
        """(B, 1, H, W) bool: True where the student is kept (probability 1 - masked_ratio), False on padding.

        Drawn on the CPU at each image's valid size (its top-left box, as the batch pads bottom and
        right) and placed top-left, so the draw depends only on (seed, step, row, level).
        """
        valid = mask[:, 0].cpu()
        heights, widths = valid.any(dim=2).sum(dim=1).tolist(), valid.any(dim=1).sum(dim=1).tolist()
        step = int(self.step)
        keep = torch.zeros(valid.shape, dtype=torch.bool)
        for b, (row, h, w) in enumerate(zip(rows.tolist(), heights, widths)):
            generator = torch.Generator().manual_seed(mixed_seed(self.seed, step, int(row), level))
            keep[b, :h, :w] = torch.rand((h, w), generator=generator) >= self.masked_ratio
        return keep[:, None].to(mask.device) & mask

    def forward(self, students: Sequence[Tensor], teachers: Sequence[Tensor], masks: Sequence[Tensor],
                rows: Tensor | None = None) -> Tensor:
        check_levels(students, teachers, masks)
        if len(students) != len(self.generations):
            raise ValueError(f"mgd was built for {len(self.generations)} levels, got {len(students)}; build it with "
                             "num_levels = len(DISTILL.LEVELS)")
        if rows is None or tuple(rows.shape) != (students[0].shape[0],):
            raise ValueError(f"mgd seeds each image's mask by its row in the store's image index and needs one row per "
                             f"image (rows=...), got {rows!r}")
        with full_precision(students[0]):
            losses = [self.level_value(level, student.float(), teacher.float(), mask, rows)
                      for level, (student, teacher, mask) in enumerate(zip(students, teachers, masks))]
        if self.training:
            self.step += 1  # the next step draws new masks
        return torch.stack(losses).mean()

    def level_value(self, level: int, student: Tensor, teacher: Tensor, mask: Tensor, rows: Tensor) -> Tensor:
        """The loss of one level: the masked mean squared error of the generated features to the teacher's."""
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(
                f"mgd generates the teacher's features from the student's, so student and teacher need the same "
                f"channel count, got student {student.shape[1]} and teacher {teacher.shape[1]}; put a 1x1 connector "
                "in front of the student (the Distiller does when FPN widths differ)"
            )
        keep = self.keep_masks(rows, mask, level)
        masked = torch.where(keep, student, torch.zeros((), dtype=student.dtype, device=student.device))
        generated = self.generations[level](masked, mask)
        return masked_mean((generated - zero_padding(teacher, mask)).pow(2), mask)

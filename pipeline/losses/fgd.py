"""Focal and Global Distillation (Yang et al., CVPR 2022)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DistillLoss, check_levels, full_precision, register_loss, valid_counts, zero_padding
from .boxes import box_cells, check_boxes


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over each image's valid positions of (B, 1, H, W) logits; exactly 0 on padding."""
    flat = logits.masked_fill(~mask, float("-inf")).flatten(1)
    return F.softmax(flat, dim=1).view_as(logits)


def fgd_attention(features: Tensor, mask: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """FGD's spatial (B, 1, H, W) and channel (B, C) attention of zero-padded features.

    Spatial: N * softmax over the image's N valid positions of mean_c |f| / T (0 on padding).
    Channel: C * softmax over channels of the mean over valid positions of |f|, / T.
    """
    magnitude = features.abs()
    counts = valid_counts(mask).to(features.dtype)  # (B,)
    spatial = masked_softmax(magnitude.mean(dim=1, keepdim=True) / temperature, mask) * counts[:, None, None, None]
    channel_means = magnitude.flatten(2).sum(dim=2) / counts[:, None]
    channel = features.shape[1] * F.softmax(channel_means / temperature, dim=1)
    return spatial, channel


def object_scale_masks(boxes: Sequence[Tensor], stride: int, mask: Tensor) -> tuple[Tensor, Tensor]:
    """FGD's foreground and background weights (B, 1, H, W) on one level.

    Foreground: a cell inside boxes gets 1 / (cells of the box), the largest over the boxes that
    hold it (the smallest box wins). Background: 1 / (background cells of the image) on every
    valid cell outside all boxes. An image without boxes is all background.
    """
    height, width = mask.shape[-2:]
    foreground = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for i, image_boxes in enumerate(boxes):
        if len(image_boxes):
            cells = box_cells(image_boxes, stride, (height, width)) & mask[i]  # (n, H, W)
            area = cells.flatten(1).sum(dim=1).clamp_min(1).to(torch.float32)
            foreground[i, 0] = (cells / area[:, None, None]).amax(dim=0)
    background = mask & (foreground == 0)
    background = background / valid_counts(background).clamp_min(1)[:, None, None, None]
    return foreground, background


class GlobalContextBlock(nn.Module):
    """GcBlock (Cao et al. 2019) as FGD uses it: f + transform(sum_j softmax_j(W_k f_j) f_j), over valid positions.

    FGD's 1x1 convs act on one position (W_k) or on the 1x1 context (the transform), so they are
    linear maps here: CPU convolution kernels cost several times more on these shapes.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.context_logits = nn.Linear(channels, 1)  # W_k
        self.transform = nn.Sequential(
            nn.Linear(channels, channels // 2),
            nn.LayerNorm(channels // 2),
            nn.ReLU(),
            nn.Linear(channels // 2, channels),
        )
        # As FGD's code: Kaiming (fan-in) context logits, and a zero last layer, so the block starts as identity.
        nn.init.kaiming_normal_(self.context_logits.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context_logits.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def context_term(self, features: Tensor, mask: Tensor) -> Tensor:
        """(B, C): what the block adds at every position, from features (B, C, H, W) with padding zeroed."""
        logits = torch.einsum("bchw,c->bhw", features, self.context_logits.weight[0]) + self.context_logits.bias
        weights = masked_softmax(logits[:, None], mask)  # (B, 1, H, W)
        context = torch.einsum("bchw,bhw->bc", features, weights[:, 0])  # softmax-weighted sum, no (B, C, H, W) product
        return self.transform(context)

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        """The block's output f + context term; only meaningful on valid positions."""
        return features + self.context_term(features, mask)[:, :, None, None]


@register_loss("fgd")
class FGDLoss(DistillLoss):
    """FGD: Focal and Global Distillation (Yang et al. 2022), box-split attention-weighted MSE plus GcBlock relations.

    Per FPN level, with the teacher's attention A_S (spatial) and A_C (channel) at temperature T and
    the box masks of `object_scale_masks`: alpha * fg + beta * bg feature terms, sum of
    mask * A_S * A_C * (s - t)^2; gamma * the L1 gap of student and teacher attention; lambda * the
    squared gap of GcBlock(s) and GcBlock(t), one trainable block per side and level. Each term is
    summed over the image and averaged over images; the loss is the mean over levels. Softmaxes,
    means and sums run over valid positions only, and boxes are scaled to each level by its stride.
    """

    default_weight = 5.0  # not measured here: the paper's per-level weights summed over 5 levels (docs/methods.md)

    shape_args = ("teacher_channels", "num_levels")
    needs_boxes = True

    def __init__(self, teacher_channels: int, num_levels: int, temperature: float = 0.5, alpha: float = 5e-5,
                 beta: float = 2.5e-5, gamma: float = 5e-5, lambda_: float = 5e-7) -> None:
        super().__init__()
        if teacher_channels < 2:
            raise ValueError(f"fgd's GcBlocks halve the width, so it needs >= 2 channels, got {teacher_channels}")
        self.temperature = temperature
        self.alpha, self.beta, self.gamma, self.lambda_ = alpha, beta, gamma, lambda_
        self.student_context = nn.ModuleList(GlobalContextBlock(teacher_channels) for _ in range(num_levels))
        self.teacher_context = nn.ModuleList(GlobalContextBlock(teacher_channels) for _ in range(num_levels))

    def forward(self, students, teachers, masks, boxes: Sequence[Tensor] | None = None,
                strides: Sequence[int] | None = None) -> Tensor:
        check_levels(students, teachers, masks)
        check_boxes(self.method, boxes, strides, students)
        if len(students) != len(self.student_context):
            raise ValueError(f"fgd was built for {len(self.student_context)} levels, got {len(students)}")
        with full_precision(students[0]):
            boxes = [b.float() for b in boxes]
            losses = []
            for level, (s, t, mask) in enumerate(zip(students, teachers, masks)):
                terms = self.level_terms(level, s.float(), t.float(), mask, boxes, strides[level])
                losses.append(self.alpha * terms["foreground"] + self.beta * terms["background"]
                              + self.gamma * terms["attention"] + self.lambda_ * terms["global"])
        return torch.stack(losses).mean()

    def level_terms(self, level: int, student: Tensor, teacher: Tensor, mask: Tensor, boxes: Sequence[Tensor],
                    stride: int) -> dict[str, Tensor]:
        """The four unweighted terms of one level, each summed per image and averaged over images."""
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(f"fgd compares features value by value, so student and teacher need the same channel "
                             f"count, got student {student.shape[1]} and teacher {teacher.shape[1]}; the Distiller's "
                             "1x1 connectors map the student's width (FGD's align layer)")
        batch = student.shape[0]
        student, teacher = zero_padding(student, mask), zero_padding(teacher, mask)
        spatial_t, channel_t = fgd_attention(teacher, mask, self.temperature)
        spatial_s, channel_s = fgd_attention(student, mask, self.temperature)
        foreground, background = object_scale_masks(boxes, stride, mask)
        difference = student - teacher  # 0 on padding
        squared = difference.pow(2)
        # Channel attention applied by a contraction over C, so the weighted (B, C, H, W) map is never built.
        weighted_error = spatial_t[:, 0] * torch.einsum("bc,bchw->bhw", channel_t, squared)
        attention_gap = (channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()
        # GcBlock(s) - GcBlock(t) = difference + delta (one C-vector per image), so over the valid positions
        # sum (difference + delta)^2 = sum difference^2 + 2 delta . sum_p difference + N delta^2.
        delta = self.student_context[level].context_term(student, mask) \
            - self.teacher_context[level].context_term(teacher, mask)  # (B, C)
        relation = (squared.sum() + 2 * (delta * difference.sum(dim=(2, 3))).sum()
                    + (valid_counts(mask) * delta.pow(2).sum(dim=1)).sum())
        return {
            "foreground": (foreground[:, 0] * weighted_error).sum() / batch,
            "background": (background[:, 0] * weighted_error).sum() / batch,
            "attention": attention_gap / batch,
            "global": relation / batch,
        }

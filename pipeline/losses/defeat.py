"""DeFeat: distillation via decoupled features (Guo et al., CVPR 2021), its FPN-feature part."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import DistillLoss, check_levels, full_precision, register_loss, zero_padding
from .boxes import box_cells, check_boxes, fpn_level_of


def adaptation_layer(student_channels: int, teacher_channels: int) -> nn.Conv2d:
    """DeFeat's neck adaptation: a 3x3 conv, weights N(0, 1) folded into (-2, 2) times 1e-4 as its code.

    The adapted student starts near 0, so the adapter learns the mapping before it pulls hard on the student.
    """
    conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=3, padding=1)
    with torch.no_grad():
        conv.weight.normal_().fmod_(2).mul_(1e-4)
    return conv


def level_object_masks(boxes: Sequence[Tensor], levels: Sequence[Tensor], level: int, stride: int,
                       mask: Tensor) -> Tensor:
    """(B, 1, H, W) bool: valid cells of the boxes assigned to this level (levels: per image, (n_i,) box levels)."""
    objects = torch.zeros_like(mask)
    for i, (image_boxes, image_levels) in enumerate(zip(boxes, levels)):
        mine = image_boxes[image_levels == level]
        if len(mine):
            objects[i, 0] = box_cells(mine, stride, tuple(mask.shape[-2:])).any(dim=0)
    return objects & mask


@register_loss("defeat")
class DeFeatLoss(DistillLoss):
    """DeFeat: decoupled features (Guo et al. 2021), separate object and background MSEs of adapted student features.

    Per FPN level, a 3x3 adaptation conv maps the student to the teacher's width; the squared error
    is summed over the cells of the ground-truth boxes assigned to that level (FPN's size rule) and,
    separately, over the other valid cells, each divided by 2 x (its cells x channels), and weighted
    fg_weight and bg_weight. The loss is the mean over levels. Padding is zeroed before the conv
    (so a padded image maps like its crop) and left out of both sums; an image without boxes is all
    background.
    """

    default_weight = 1.0  # not measured here: DeFeat's weights are in fg_weight, bg_weight (docs/methods.md)

    own_connectors = True
    shape_args = ("student_channels", "teacher_channels", "num_levels")
    needs_boxes = True

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int, fg_weight: float = 3.0,
                 bg_weight: float = 12.0, assign_levels: bool = True) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(adaptation_layer(student_channels, teacher_channels) for _ in range(num_levels))
        self.fg_weight, self.bg_weight = fg_weight, bg_weight
        self.assign_levels = assign_levels  # False: every box marks objects on every level

    def forward(self, students, teachers, masks, boxes: Sequence[Tensor] | None = None,
                strides: Sequence[int] | None = None) -> Tensor:
        check_levels(students, teachers, masks)
        check_boxes(self.method, boxes, strides, students)
        if len(students) != len(self.adapters):
            raise ValueError(f"defeat was built for {len(self.adapters)} levels, got {len(students)}")
        with full_precision(students[0]):
            boxes = [b.float() for b in boxes]
            if self.assign_levels:
                box_levels = [fpn_level_of(b, strides) for b in boxes]
            else:  # every level holds every box
                box_levels = None
            losses = []
            for level, (s, t, mask) in enumerate(zip(students, teachers, masks)):
                levels = box_levels if box_levels is not None else \
                    [torch.full((len(b),), level, device=b.device) for b in boxes]
                objects = level_object_masks(boxes, levels, level, strides[level], mask)
                terms = self.level_terms(level, s.float(), t.float(), mask, objects)
                losses.append(self.fg_weight * terms["foreground"] + self.bg_weight * terms["background"])
        return torch.stack(losses).mean()

    def level_terms(self, level: int, student: Tensor, teacher: Tensor, mask: Tensor,
                    objects: Tensor) -> dict[str, Tensor]:
        """The unweighted object and background terms of one level; objects (B, 1, H, W) bool within mask."""
        adapted = self.adapters[level](zero_padding(student, mask))
        # Summed over channels first: each region then only weighs one (B, H, W) map.
        error = (zero_padding(adapted, mask) - zero_padding(teacher, mask)).pow(2).sum(dim=1)
        channels = adapted.shape[1]
        background = mask & ~objects
        terms = {}
        for name, region in (("foreground", objects), ("background", background)):
            total = torch.where(region[:, 0], error, torch.zeros((), dtype=error.dtype, device=error.device)).sum()
            terms[name] = total / (2 * channels * region.sum()).clamp_min(1)
        return terms

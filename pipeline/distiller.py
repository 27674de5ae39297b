"""The distillation loss of a student's FPN against per-image teacher features.

The teacher gives each image's levels cropped to its valid size; here they are padded to
the student's (batch-padded) level shapes, with a mask of the valid positions, just as
ImageList pads the images. Losses never see padding as data.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.losses import DistillLoss


def pad_teacher_level(features: list[torch.Tensor], image_sizes, stride: int, shape: tuple[int, int],
                      level: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-image (C, h, w) maps into (B, C, H, W) zeros-padded, and the (B, 1, H, W) validity mask."""
    c = features[0].shape[0]
    out = features[0].new_zeros((len(features), c) + tuple(shape))
    mask = torch.zeros((len(features), 1) + tuple(shape), dtype=torch.bool, device=out.device)
    for i, (f, (h, w)) in enumerate(zip(features, image_sizes)):
        hh, ww = math.ceil(h / stride), math.ceil(w / stride)
        if tuple(f.shape[-2:]) != (hh, ww) or hh > shape[0] or ww > shape[1]:
            raise ValueError(f"teacher {level} of image {i} is {tuple(f.shape[-2:])}, but an input of {h}x{w} "
                             f"at stride {stride} needs {(hh, ww)} within the student's {tuple(shape)}: "
                             "the store's resize and the student's INPUT differ")
        out[i, :, :hh, :ww] = f
        mask[i, :, :hh, :ww] = True
    return out, mask


class Distiller(nn.Module):
    """loss_kd = B * mean over levels of loss(connector(student), teacher, mask)."""

    def __init__(self, loss: DistillLoss, levels, strides, student_channels: int, teacher_channels: int, weight: float):
        super().__init__()
        self.loss = loss
        self.levels = list(levels)
        self.strides = list(strides)
        self.weight = float(weight)
        # FitNets' answer to different widths: a learned 1x1 conv on the student side, one per level.
        self.connectors = nn.ModuleDict()
        if student_channels != teacher_channels:
            for level in self.levels:
                self.connectors[level] = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, student_features: dict[str, torch.Tensor], teacher_features: list[dict[str, torch.Tensor]],
                image_sizes) -> torch.Tensor:
        students, teachers, masks = [], [], []
        for level, stride in zip(self.levels, self.strides):
            s = student_features[level]
            t, mask = pad_teacher_level([f[level].to(s.device, s.dtype) for f in teacher_features], image_sizes,
                                        stride, tuple(s.shape[-2:]), level)
            if level in self.connectors:
                s = self.connectors[level](s)
            students.append(s)
            teachers.append(t)
            masks.append(mask)
        return self.weight * self.loss(students, teachers, masks)

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
from pipeline.losses.base import zero_padding


def teacher_keys(levels, source: str) -> list[str]:
    """Names of the teacher maps a method compares: the levels ("features"), or "<source>/<level>" (kd)."""
    return [level if source == "features" else f"{source}/{level}" for level in levels]


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


def instance_boxes(batched_inputs: list[dict]) -> list[torch.Tensor | None]:
    """Each input's ground-truth boxes (n, 4) x1, y1, x2, y2, in input pixels of the image as the student sees it.

    These are the mapper's `instances.gt_boxes`: detectron2's DatasetMapper applies the image's own
    transforms (the resize, and the flip when the sample is flipped) to its annotations, so the boxes
    are in the frame of the flipped image and of the teacher's flipped view. None where an input has
    no instances (the Distiller refuses that only for a method that needs boxes).
    """
    return [x["instances"].gt_boxes.tensor if "instances" in x else None for x in batched_inputs]


class Distiller(nn.Module):
    """loss_kd = B * mean over levels of loss(connector(student), teacher, mask).

    Everything trainable (connectors, and the loss's heads, regressors, paraphraser, ...) lives
    in this module inside the student model, so it is in the student's optimizer and checkpoint.
    """

    def __init__(self, loss: DistillLoss, levels, strides, student_channels: int, teacher_channels: int, weight: float,
                 image_rows: dict[int, int] | None = None):
        super().__init__()
        self.loss = loss
        self.levels = list(levels)
        self.strides = list(strides)
        self.weight = float(weight)
        # image_id -> row of the store's image index, for losses that keep per-image state (crd).
        self.image_rows = image_rows
        if loss.needs_image_index and image_rows is None:
            raise ValueError(f"method {loss.method!r} keeps per-image state and needs image_rows (image_id -> store row)")
        # FitNets' answer to different widths: a learned 1x1 conv on the student side, one per level.
        self.connectors = nn.ModuleDict()
        if student_channels != teacher_channels and loss.source == "features" and not loss.own_connectors:
            for level in self.levels:
                self.connectors[level] = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def keys(self) -> list[str]:
        """The student/teacher map names compared: the levels, or e.g. "rpn_objectness/p2" for kd."""
        return teacher_keys(self.levels, self.loss.source)

    def inputs(self, student_features: dict[str, torch.Tensor] | None, teacher_features: list[dict[str, torch.Tensor]],
               image_sizes, padded_hw: tuple[int, int] | None = None):
        """Per level: student maps (through connectors; None without student_features), padded teacher maps, masks.

        padded_hw (the batch's padded input size) gives the level shapes when there are no student maps.
        """
        students, teachers, masks = [], [], []
        for key, level, stride in zip(self.keys(), self.levels, self.strides):
            if key not in teacher_features[0]:
                raise KeyError(f"method {self.loss.method!r} needs the teacher's {key!r}, which the teacher features "
                               f"lack (they have {sorted(teacher_features[0])}); for kd, build the store with "
                               "DISTILL.CACHE.RPN True (make cache-teacher OVERWRITE=1 OPTS='DISTILL.CACHE.RPN True')")
            if student_features is not None:
                s = student_features[key]
                shape, device, dtype = tuple(s.shape[-2:]), s.device, s.dtype
            else:
                s, shape = None, tuple(math.ceil(v / stride) for v in padded_hw)
                device, dtype = teacher_features[0][key].device, teacher_features[0][key].dtype
            t, mask = pad_teacher_level([f[key].to(device, dtype) for f in teacher_features], image_sizes,
                                        stride, shape, key)
            if s is not None and level in self.connectors:
                # Zeroed first: a conv's weight gradient sums input x output gradient over every
                # position, and inf padding x 0 is NaN.
                s = self.connectors[level](zero_padding(s, mask))
            students.append(s)
            teachers.append(t)
            masks.append(mask)
        return students, teachers, masks

    def rows(self, image_ids, device) -> torch.Tensor:
        """(B,) rows of the store's image index of the batch's images."""
        try:
            return torch.tensor([self.image_rows[int(i)] for i in image_ids], dtype=torch.long, device=device)
        except KeyError as e:
            raise KeyError(f"image {e.args[0]} is not in the image index of {len(self.image_rows)} training images "
                           f"that method {self.loss.method!r} was built with") from None

    def boxes(self, boxes, device) -> list[torch.Tensor]:
        """The batch's per-image ground-truth boxes on `device`, float32; ValueError naming the image without any."""
        missing = [i for i, b in enumerate(boxes or []) if b is None]
        if boxes is None or missing:
            raise ValueError(f"method {self.loss.method!r} splits features by ground-truth boxes, but input(s) "
                             f"{missing or 'all'} of the batch came without instances; train from a mapper that "
                             "keeps annotations (detectron2's DatasetMapper with is_train=True does)")
        return [b.to(device, torch.float32) for b in boxes]

    def forward(self, student_features: dict[str, torch.Tensor], teacher_features: list[dict[str, torch.Tensor] | None],
                image_sizes, image_ids=None, boxes: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """loss_kd of the batch; an image whose teacher entry is None (ON_BAD_ENTRY "skip") is left out.

        boxes: per image (n, 4) in input pixels (instance_boxes of the batch), used by methods with needs_boxes.
        A batch left without images gives a zero that reaches every student map and distiller
        parameter, and the loss still joins its collectives (crd's bank gather), so under DDP every
        process takes part in every collective and gradient reduction whatever its valid images.
        """
        keep = [i for i, t in enumerate(teacher_features) if t is not None]
        if not keep:
            return self.zero_without_images(student_features)
        if len(keep) < len(teacher_features):
            student_features = {name: f[keep] for name, f in student_features.items()}
            teacher_features, image_sizes = [teacher_features[i] for i in keep], [image_sizes[i] for i in keep]
            image_ids = None if image_ids is None else [image_ids[i] for i in keep]
            boxes = None if boxes is None else [boxes[i] for i in keep]
        students, teachers, masks = self.inputs(student_features, teacher_features, image_sizes)
        extra = {"rows": self.rows(image_ids, students[0].device)} if self.loss.needs_image_index else {}
        if self.loss.needs_boxes:
            extra.update(boxes=self.boxes(boxes, students[0].device), strides=self.strides)
        return self.weight * self.loss(students, teachers, masks, **extra)

    def zero_without_images(self, student_features: dict[str, torch.Tensor]) -> torch.Tensor:
        """0 with a zero gradient to the compared student maps and every parameter here (never NaN, even from inf)."""
        maps = [student_features[key] for key in self.keys()]
        self.loss.step_without_images(maps[0].device)
        nothing = torch.zeros((), dtype=torch.bool, device=maps[0].device)
        return sum(torch.where(nothing, x, 0).sum() for x in [*maps, *self.parameters()])

    def init_loss(self, student_features: dict[str, torch.Tensor] | None,
                  teacher_features: list[dict[str, torch.Tensor]], image_sizes, padded_hw) -> torch.Tensor:
        """The loss of the method's init stage (unweighted); student_features None for an init stage on the teacher."""
        students, teachers, masks = self.inputs(student_features, teacher_features, image_sizes, padded_hw)
        return self.loss.init_loss(None if student_features is None else students, teachers, masks)

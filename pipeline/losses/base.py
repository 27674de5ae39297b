"""Base class, registry and shared helpers for feature-distillation losses on FPN levels.

Every loss takes one tensor per FPN level (finest first: p2, p3, ...). Student and teacher
tensors of a level share batch size and spatial size; the channel widths may differ for
methods that compare relations rather than values. Batches of detection images are
zero-padded to a common size, so each level comes with a mask (B, 1, H, W) that is True on
the image and False on padding. Padding must never reach a loss: the helpers here zero it
or drop it before any arithmetic, so whatever the padding holds cannot change the value or
make it non-finite.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from fvcore.common.registry import Registry
from torch import Tensor, nn

DISTILL_LOSS_REGISTRY = Registry("DISTILL_LOSS")

_LossClass = TypeVar("_LossClass", bound=type)


def register_loss(name: str) -> Callable[[_LossClass], _LossClass]:
    """Register a DistillLoss subclass under its method name (e.g. "hint")."""

    def decorate(cls: _LossClass) -> _LossClass:
        cls.method = name
        # fvcore's public register() keys by __name__ ("HintLoss"); configs name methods by
        # their short paper names, so register through the same call register() makes.
        DISTILL_LOSS_REGISTRY._do_register(name, cls)
        return cls

    return decorate


def zero_padding(features: Tensor, mask: Tensor) -> Tensor:
    """Features with every padded position set to 0 (where, not multiply: inf * 0 is NaN)."""
    return torch.where(mask, features, torch.zeros((), dtype=features.dtype, device=features.device))


def valid_counts(mask: Tensor) -> Tensor:
    """Number of image (non-padding) positions of each image, shape (B,)."""
    return mask.flatten(1).sum(dim=1)


def valid_vectors(features: Tensor, mask: Tensor) -> list[Tensor]:
    """Per image, the C-vectors at its valid positions in row-major order: a list of (n_i, C)."""
    return [image.flatten(1)[:, keep.flatten()].T for image, keep in zip(features, mask)]


def evenly_spaced(n: int, k: int, device: torch.device | str | None = None) -> Tensor:
    """At most k indices spread evenly over range(n); all of range(n) when n <= k.

    No random numbers: the same (n, k) always gives the same indices, so student and teacher,
    and a cached and a live teacher, are sampled at the same positions.
    """
    if k < 1:
        raise ValueError(f"evenly_spaced needs k >= 1 indices to pick, got k={k}")
    if n <= k:
        return torch.arange(n, device=device)
    return torch.arange(k, device=device) * n // k


def sample_valid_vectors(features: Tensor, mask: Tensor, max_samples: int) -> Tensor:
    """C-vectors at up to max_samples valid positions of the whole batch, shape (N, C).

    Positions are taken image after image in row-major order and subsampled with
    evenly_spaced, so a padded image yields the same samples as the image cropped to its
    valid region. Only the picked vectors are gathered: the full (sum n_i, C) matrix at p2
    would be large.
    """
    height, width = features.shape[-2:]
    flat_ids = mask.flatten().nonzero().squeeze(1)  # over (B, H, W)
    picked = flat_ids[evenly_spaced(flat_ids.numel(), max_samples, device=flat_ids.device)]
    image, position = picked // (height * width), picked % (height * width)
    # Advanced indices separated by a slice put the index dimension first: (N, C).
    return features.flatten(2)[image, :, position]


def check_levels(students: Sequence[Tensor], teachers: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """Raise ValueError unless the three lists describe the same FPN levels consistently."""
    if not (len(students) == len(teachers) == len(masks)):
        raise ValueError(
            f"need one student, teacher and mask tensor per FPN level, got {len(students)} student, "
            f"{len(teachers)} teacher and {len(masks)} mask tensors"
        )
    if not students:
        raise ValueError("got no FPN levels; pass at least one (student, teacher, mask) level")
    for level, (student, teacher, mask) in enumerate(zip(students, teachers, masks)):
        if student.dim() != 4 or teacher.dim() != 4:
            raise ValueError(
                f"level {level}: features must be (B, C, H, W), got student {tuple(student.shape)} "
                f"and teacher {tuple(teacher.shape)}"
            )
        batch, _, height, width = student.shape
        if teacher.shape[0] != batch or teacher.shape[2:] != student.shape[2:]:
            raise ValueError(
                f"level {level}: teacher {tuple(teacher.shape)} must match student {tuple(student.shape)} "
                "in batch size and H, W (resize or crop the teacher features to the student's level)"
            )
        if mask.shape != (batch, 1, height, width):
            raise ValueError(
                f"level {level}: mask must be (B, 1, H, W) = {(batch, 1, height, width)}, got {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"level {level}: mask must be a bool tensor (True on the image), got {mask.dtype}")


def full_precision(reference: Tensor) -> torch.autocast:
    """A context that turns autocast off: sums over a whole p2 map overflow float16."""
    return torch.autocast(device_type=reference.device.type, enabled=False)


class DistillLoss(nn.Module):
    """A feature-distillation loss over FPN levels: the mean over levels of level_loss.

    Subclasses implement level_loss(student, teacher, mask) for one level; a method that
    relates several levels (kdsvd) overrides forward instead. Inputs are cast to float32
    with autocast off, so the loss is computed the same way under mixed precision, and their
    padding is zeroed before level_loss sees them: a method's convs or BCE on the whole map
    (vid, abound, kd) would otherwise give NaN gradients from inf or NaN padding, even where
    their loss terms are dropped afterwards.
    """

    method: str = ""  # the registry name, set by register_loss
    default_weight: float = 1.0  # B when DISTILL.B < 0: each method measures its own (tools/measure_weights.py)
    # What a method needs beyond the default; the Distiller reads these, so the training loop never
    # has to know which method it runs.
    source: str = "features"  # maps compared per level: "features", or "rpn_objectness" (the RPN's logits)
    own_connectors: bool = False  # maps student widths itself: the Distiller adds no 1x1 connectors
    shape_args: tuple[str, ...] = ()  # constructor arguments the Distiller supplies, from: student_channels,
    #   teacher_channels, num_levels, num_images (rows of the store's image index)
    needs_image_index: bool = False  # forward also takes rows: (B,) long, each image's row in the store
    needs_boxes: bool = False  # forward also takes boxes: per image (n_i, 4) ground-truth x1, y1, x2, y2 in input
    #   pixels of the resized, flipped image (the mapper's instances.gt_boxes), and strides: each level's stride
    init_stage: str | None = None  # "student": before training, train the student backbone and this loss's
    #   init_parameters on init_loss; "teacher": train only init_parameters on init_loss of teacher maps

    def forward(self, students: Sequence[Tensor], teachers: Sequence[Tensor], masks: Sequence[Tensor]) -> Tensor:
        check_levels(students, teachers, masks)
        with full_precision(students[0]):
            losses = [
                self.level_loss_at(level, zero_padding(student.float(), mask), zero_padding(teacher.float(), mask),
                                   mask)
                for level, (student, teacher, mask) in enumerate(zip(students, teachers, masks))
            ]
        return torch.stack(losses).mean()

    def level_loss_at(self, level: int, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        """level_loss of the level-th level; methods with per-level modules override this instead."""
        return self.level_loss(student, teacher, mask)

    def level_loss(self, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        """The loss of one level: student (B, Cs, H, W), teacher (B, Ct, H, W), both 0 on padding; mask (B, 1, H, W)."""
        raise NotImplementedError(f"{type(self).__name__} must implement level_loss or override forward")

    def init_loss(self, students: Sequence[Tensor] | None, teachers: Sequence[Tensor], masks: Sequence[Tensor]) -> Tensor:
        """The loss minimised by the init stage (students is None for an init_stage "teacher")."""
        raise NotImplementedError(f"{type(self).__name__} has no init stage")

    def init_parameters(self) -> list[nn.Parameter]:
        """This loss's parameters that the init stage trains."""
        return list(self.parameters())

    def step_without_images(self, device: torch.device) -> None:
        """Join what forward shares between DDP processes, in a step where this process has no valid image.

        Every process must enter every collective of a step, or the others wait for it forever; a
        method whose forward has collectives (crd's memory-bank all_gather) overrides this.
        """


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of (B, C, H, W) values over the valid positions and all channels; padding is dropped."""
    total = zero_padding(values, mask).sum()
    return total / (valid_counts(mask).sum() * values.shape[1]).clamp_min(1)


def masked_pool(features: Tensor, mask: Tensor) -> Tensor:
    """(B, C) mean of each image's features over its valid positions (global average pooling without padding)."""
    return zero_padding(features, mask).flatten(2).sum(2) / valid_counts(mask).clamp_min(1)[:, None]

"""Where a training step gets its teacher features: the store (via the data mapper) or a live teacher.

Both are TeacherSource: DistillRCNN calls one with the batch and the device, and gets one dict of
teacher maps per input, so the model does not know which of the two it has (DISTILL.SOURCE).
"""
from __future__ import annotations

from typing import Protocol

import torch

from pipeline.teacher import TeacherFeatureExtractor, convert_format
from cache.stored_map import decode_maps

# One image's teacher maps by name: "p2", ..., and with RPN outputs "rpn_objectness/p2", ...
TeacherMaps = dict[str, torch.Tensor]


class TeacherSource(Protocol):
    """What DistillRCNN reads the teacher's features from: CachedTeacher or LiveTeacher.

    A static type (no runtime check): any callable with this signature serves, e.g. a test double.
    """

    def __call__(self, batched_inputs: list[dict], device: torch.device) -> list[TeacherMaps | None]:
        """One entry per input, in order, on `device`: its maps, or None where it has none."""
        ...


class CachedTeacher:
    """Features the DistillDatasetMapper attached to each input from the store; no teacher is built."""

    def __call__(self, batched_inputs: list[dict], device: torch.device) -> list[TeacherMaps | None]:
        """One dict per input; None for an image the mapper skipped (DISTILL.CACHE.ON_BAD_ENTRY "skip")."""
        try:
            # The mapper sends stored codes (StoredMap); they are decoded here, on the student's device.
            return [None if x["teacher_features"] is None else decode_maps(x["teacher_features"], device)
                    for x in batched_inputs]
        except KeyError:
            raise KeyError("an input has no 'teacher_features': DISTILL.SOURCE 'cache' needs the training loader "
                           "built with DistillDatasetMapper (pipeline.stage_two.StudentTrainer does this)") from None


class LiveTeacher:
    """The original design's live teacher, computing the same per-image features that stage one stores.

    A plain object, not an nn.Module, so the teacher stays out of the student's optimizer,
    checkpoints and DDP wrapper.
    """

    def __init__(self, extractor: TeacherFeatureExtractor, student_format: str):
        self.extractor = extractor
        self.student_format = student_format

    def __call__(self, batched_inputs: list[dict], device: torch.device) -> list[TeacherMaps | None]:
        """One dict per input, never None: the teacher runs on every image."""
        return [
            {k: v.to(device) for k, v in
             self.extractor(convert_format(x["image"], self.student_format, self.extractor.input_format)).items()}
            for x in batched_inputs
        ]

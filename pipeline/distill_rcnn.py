"""DistillRCNN: detectron2's GeneralizedRCNN plus `loss_kd` from a teacher's FPN features."""
from __future__ import annotations

import logging

from pipeline import compat  # noqa: F401  (before detectron2)
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.utils.events import get_event_storage

from pipeline.distiller import Distiller
from pipeline.losses import build_distill_loss, loss_weight
from pipeline.teacher import TeacherFeatureExtractor, load_teacher_cfg, teacher_geometry
from pipeline.teacher_source import CachedTeacher, LiveTeacher

logger = logging.getLogger(__name__)
SOURCES = ("cache", "live")


def build_distiller(cfg, backbone) -> Distiller:
    """The loss module, with 1x1 connectors where student and teacher FPN widths differ."""
    loss = build_distill_loss(cfg.DISTILL.DISTILL)
    cfg_t = load_teacher_cfg(cfg)
    shapes = backbone.output_shape()
    missing = [lvl for lvl in cfg.DISTILL.LEVELS if lvl not in shapes]
    if missing:
        raise ValueError(f"DISTILL.LEVELS {missing} are not student backbone outputs {sorted(shapes)}")
    strides, _ = teacher_geometry(cfg_t, cfg.DISTILL.LEVELS)
    student_strides = [shapes[lvl].stride for lvl in cfg.DISTILL.LEVELS]
    if strides != student_strides:
        raise ValueError(f"student strides {student_strides} differ from the teacher's {strides} at DISTILL.LEVELS")
    return Distiller(loss, cfg.DISTILL.LEVELS, strides, shapes[cfg.DISTILL.LEVELS[0]].channels,
                     cfg_t.MODEL.FPN.OUT_CHANNELS, loss_weight(cfg.DISTILL.DISTILL, cfg.DISTILL.B))


@META_ARCH_REGISTRY.register()
class DistillRCNN(GeneralizedRCNN):
    """With a distiller, training adds `loss_kd`; without one (DISTILL.ENABLE False) it is GeneralizedRCNN."""

    @configurable
    def __init__(self, *, distiller: Distiller | None = None, teacher_source=None, **kwargs):
        super().__init__(**kwargs)
        self.distiller = distiller
        self.teacher_source = teacher_source
        if distiller is not None and teacher_source is None:
            raise ValueError("a distiller needs a teacher_source (CachedTeacher or LiveTeacher)")

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        if not cfg.DISTILL.ENABLE:
            return ret
        if cfg.DISTILL.SOURCE not in SOURCES:
            raise ValueError(f"DISTILL.SOURCE={cfg.DISTILL.SOURCE!r}; choose one of {SOURCES}")
        ret["distiller"] = build_distiller(cfg, ret["backbone"])
        if cfg.DISTILL.SOURCE == "live":
            ret["teacher_source"] = LiveTeacher(TeacherFeatureExtractor.from_config(cfg), cfg.INPUT.FORMAT)
            logger.info("distillation: live teacher %s with weights %s", cfg.DISTILL.CFG_T, cfg.DISTILL.PATH_T)
        else:
            ret["teacher_source"] = CachedTeacher()
        return ret

    def forward(self, batched_inputs):
        if not self.training or self.distiller is None:
            return super().forward(batched_inputs)
        # The student's FPN outputs are taken from the backbone as GeneralizedRCNN runs it, so its
        # forward pass stays detectron2's own.
        captured: dict = {}
        handle = self.backbone.register_forward_hook(lambda module, inputs, output: captured.update(output))
        try:
            losses = super().forward(batched_inputs)
        finally:
            handle.remove()
        teacher = self.teacher_source(batched_inputs, self.device)
        sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        keep = [i for i, t in enumerate(teacher) if t is not None]
        if len(keep) < len(teacher):
            losses["loss_kd"] = self._loss_kd_without_skipped(captured, teacher, sizes, keep, batched_inputs)
        else:
            losses["loss_kd"] = self.distiller(captured, teacher, sizes)
        return losses

    def _loss_kd_without_skipped(self, captured, teacher, sizes, keep, batched_inputs):
        """loss_kd of the images that have teacher features (ON_BAD_ENTRY "skip"); the others are counted.

        A batch with none gives a zero that still reaches every student and distiller parameter, so
        the step (and DDP's gradient reduction) goes on unchanged.
        """
        skipped = [x for x in batched_inputs if x.get("teacher_features", 0) is None]
        for x in skipped:
            logger.warning("no loss_kd for image %s: %s", x.get("image_id"), x.get("teacher_skip_reason", "no teacher features"))
        self._kd_skipped_images = getattr(self, "_kd_skipped_images", 0) + len(skipped)
        get_event_storage().put_scalar("kd_skipped_images", self._kd_skipped_images, smoothing_hint=False)
        if not keep:
            zero = sum(captured[level].sum() for level in self.distiller.levels)
            return (zero + sum(p.sum() for p in self.distiller.parameters())) * 0.0
        kept = {name: f[keep] for name, f in captured.items()}
        return self.distiller(kept, [teacher[i] for i in keep], [sizes[i] for i in keep])

"""DistillRCNN: detectron2's GeneralizedRCNN plus `loss_kd` from a teacher's FPN features."""
from __future__ import annotations

import logging
from contextlib import contextmanager

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.utils.events import get_event_storage

from pipeline.config import TeacherSourceName
from pipeline.distiller import Distiller, instance_boxes
from pipeline.losses import build_distill_loss, loss_class, loss_weight
from pipeline.plan import TeacherPlan, as_plan
from pipeline.teacher import TeacherFeatureExtractor
from pipeline.teacher_source import CachedTeacher, LiveTeacher, TeacherSource

logger = logging.getLogger(__name__)
SOURCES: tuple[TeacherSourceName, ...] = ("cache", "live")


def image_index(cfg) -> dict[int, int]:
    """image_id -> row of the store's image index: the store's own rows in cache mode; in live mode the
    rows stage one would write (DATASETS.TRAIN in order), so both modes index per-image state alike."""
    if cfg.DISTILL.SOURCE == "cache":
        from cache import TeacherFeatureStore

        ids = TeacherFeatureStore(cfg.DISTILL.CACHE.PATH).image_ids.tolist()
    else:
        from pipeline.stage_one import training_images

        ids = [d["image_id"] for d in training_images(cfg.DATASETS.TRAIN)]
    return {int(image_id): row for row, image_id in enumerate(ids)}


def build_distiller(cfg, backbone, plan: TeacherPlan | None = None) -> Distiller:
    """The loss module, with 1x1 connectors where student and teacher FPN widths differ."""
    plan = plan or as_plan(cfg)
    cfg_t = plan.teacher_cfg
    shapes = backbone.output_shape()
    missing = [lvl for lvl in cfg.DISTILL.LEVELS if lvl not in shapes]
    if missing:
        raise ValueError(f"DISTILL.LEVELS {missing} are not student backbone outputs {sorted(shapes)}")
    strides = list(plan.strides)
    student_strides = [shapes[lvl].stride for lvl in cfg.DISTILL.LEVELS]
    if strides != student_strides:
        raise ValueError(f"student strides {student_strides} differ from the teacher's {strides} at DISTILL.LEVELS")
    rows = image_index(cfg) if loss_class(cfg.DISTILL.DISTILL).needs_image_index else None
    student_channels, teacher_channels = shapes[cfg.DISTILL.LEVELS[0]].channels, cfg_t.MODEL.FPN.OUT_CHANNELS
    loss = build_distill_loss(cfg.DISTILL.DISTILL, student_channels=student_channels, teacher_channels=teacher_channels,
                              num_levels=len(cfg.DISTILL.LEVELS), num_images=len(rows) if rows else None)
    return Distiller(loss, cfg.DISTILL.LEVELS, strides, student_channels, teacher_channels,
                     loss_weight(cfg.DISTILL.DISTILL, cfg.DISTILL.B), image_rows=rows)


@contextmanager
def student_outputs(model, rpn: bool):
    """A dict filled, while the block runs, with the backbone's outputs (and with rpn, the RPN head's as
    "rpn_objectness/<level>", "rpn_deltas/<level>"), taken by forward hooks so detectron2's forward stays its own."""
    captured: dict = {}

    def keep_rpn(module, inputs, output):
        for level, logits, deltas in zip(model.proposal_generator.in_features, *output):
            captured[f"rpn_objectness/{level}"], captured[f"rpn_deltas/{level}"] = logits, deltas

    handles = [model.backbone.register_forward_hook(lambda module, inputs, output: captured.update(output))]
    if rpn:
        handles.append(model.proposal_generator.rpn_head.register_forward_hook(keep_rpn))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@META_ARCH_REGISTRY.register()
class DistillRCNN(GeneralizedRCNN):
    """With a distiller, training adds `loss_kd`; without one (DISTILL.ENABLE False) it is GeneralizedRCNN."""

    @configurable
    def __init__(self, *, distiller: Distiller | None = None, teacher_source: TeacherSource | None = None,
                 **kwargs):
        """
        Args:
            distiller: the loss module that turns student and teacher maps into loss_kd (with its
                connectors and trainable parts); None trains plain GeneralizedRCNN.
            teacher_source: where each batch's teacher maps come from, CachedTeacher (the store,
                through DistillDatasetMapper) or LiveTeacher; required with a distiller.
            **kwargs: GeneralizedRCNN's own arguments (backbone, proposal_generator, roi_heads, ...).
        """
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
        # detectron2's build_model hands a meta-architecture the config alone, so the model resolves its
        # own plan once here, for the distiller and the live teacher alike.
        plan = TeacherPlan.from_config(cfg)
        ret["distiller"] = build_distiller(cfg, ret["backbone"], plan)
        if cfg.DISTILL.SOURCE == "live":
            rpn = ret["distiller"].loss.source != "features"
            ret["teacher_source"] = LiveTeacher(TeacherFeatureExtractor.from_config(plan, rpn=rpn), cfg.INPUT.FORMAT)
            logger.info("distillation: live teacher %s with weights %s", cfg.DISTILL.CFG_T, cfg.DISTILL.PATH_T)
        else:
            ret["teacher_source"] = CachedTeacher()
        return ret

    def forward(self, batched_inputs):
        if not self.training or self.distiller is None:
            return super().forward(batched_inputs)
        # The student's FPN (and RPN) outputs are taken as GeneralizedRCNN runs it, so its
        # forward pass stays detectron2's own.
        with student_outputs(self, rpn=self.distiller.loss.source != "features") as captured:
            losses = super().forward(batched_inputs)
        teacher = self.teacher_source(batched_inputs, self.device)
        sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        ids = [x.get("image_id") for x in batched_inputs]
        boxes = instance_boxes(batched_inputs)  # the augmented instances, in the frame of each input image
        keep = [i for i, t in enumerate(teacher) if t is not None]
        if len(keep) < len(teacher):
            losses["loss_kd"] = self._loss_kd_without_skipped(captured, teacher, sizes, ids, boxes, keep,
                                                              batched_inputs)
        else:
            losses["loss_kd"] = self.distiller(captured, teacher, sizes, ids, boxes)
        return losses

    def _loss_kd_without_skipped(self, captured, teacher, sizes, ids, boxes, keep, batched_inputs):
        """loss_kd of the images that have teacher features (ON_BAD_ENTRY "skip"); the others are counted.

        The Distiller leaves the skipped images out. A batch with none gives a zero that still reaches
        every student and distiller parameter and joins the loss's collectives (crd's bank gather), so
        the step, DDP's gradient reduction and the other processes go on unchanged.
        """
        skipped = [x for x in batched_inputs if x.get("teacher_features", 0) is None]
        for x in skipped:
            logger.warning("no loss_kd for image %s: %s", x.get("image_id"), x.get("teacher_skip_reason", "no teacher features"))
        self._kd_skipped_images = getattr(self, "_kd_skipped_images", 0) + len(skipped)
        get_event_storage().put_scalar("kd_skipped_images", self._kd_skipped_images, smoothing_hint=False)
        return self.distiller(captured, teacher, sizes, ids, boxes)

    def distill_init_loss(self, batched_inputs):
        """The distiller's init-stage loss on a batch: the student backbone runs only if the stage trains it.

        Images without teacher features (ON_BAD_ENTRY "skip") are left out of the batch.
        """
        teacher = self.teacher_source(batched_inputs, self.device)
        keep = [i for i, t in enumerate(teacher) if t is not None]
        batched_inputs, teacher = [batched_inputs[i] for i in keep], [teacher[i] for i in keep]
        if not batched_inputs:  # a zero with a gradient path, so every rank still takes the step
            return sum(p.sum() for p in self.distiller.parameters()) * 0.0
        images = self.preprocess_image(batched_inputs)
        students = self.backbone(images.tensor) if self.distiller.loss.init_stage == "student" else None
        sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        return self.distiller.init_loss(students, teacher, sizes, tuple(images.tensor.shape[-2:]))

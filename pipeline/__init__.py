"""Knowledge distillation for detectron2 from a teacher-feature store, as a detectron2 project.

Importing the package applies detectron2 v0.6's compatibility shims once (before detectron2 is
imported anywhere), registers `DistillRCNN` and the distillation losses, and exports the public API.
Stage entry points: `python -m pipeline.cache_teacher`, `pipeline.train_student`, `pipeline.train_teacher`.
"""
from pipeline import compat as _compat  # noqa: F401  (first: the shims detectron2 v0.6 needs)
from pipeline import datasets as _datasets  # noqa: F401  (registers the embedded datasets' names)
from pipeline.config import add_distill_config, get_distill_cfg
from pipeline.distill_rcnn import DistillRCNN
from pipeline.distiller import Distiller
from pipeline.losses import DISTILL_LOSS_REGISTRY, METHODS, DistillLoss, build_distill_loss
from pipeline.mapper import DistillDatasetMapper
from pipeline.teacher import TeacherFeatureExtractor

__all__ = [
    "DISTILL_LOSS_REGISTRY",
    "METHODS",
    "DistillDatasetMapper",
    "DistillLoss",
    "DistillRCNN",
    "Distiller",
    "TeacherFeatureExtractor",
    "add_distill_config",
    "build_distill_loss",
    "get_distill_cfg",
]

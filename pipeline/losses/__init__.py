"""Feature-distillation losses between student and teacher FPN levels, by method name.

build_distill_loss("rkd", max_samples=256) gives a DistillLoss; METHODS lists the names. Methods
with trainable parts take their sizes too (their class lists them in `shape_args`), e.g.
build_distill_loss("vid", student_channels=256, teacher_channels=256, num_levels=5).
"""
from __future__ import annotations

from .base import DISTILL_LOSS_REGISTRY, DistillLoss

# Importing a method's module registers it.
from . import hint as _  # registration
from . import attention as _  # registration
from . import similarity as _  # registration
from . import nst as _  # registration
from . import rkd as _  # registration
from . import pkt as _  # registration
from . import kdsvd as _  # registration
from . import fsp as _  # registration
from . import correlation as _  # registration
from . import vid as _  # registration
from . import crd as _  # registration
from . import abound as _  # registration
from . import factor as _  # registration
from . import kd as _  # registration
from . import cwd as _  # registration
from . import pkd as _  # registration
from . import mgd as _  # registration
from . import fgd as _  # registration
from . import defeat as _  # registration

METHODS: tuple[str, ...] = tuple(name for name, _cls in DISTILL_LOSS_REGISTRY)

# Weight B per method that makes loss_kd start near 0.5 (the detector's own losses start near 2.5),
# measured on the embedded default: R50-FPN student at initialisation, the embedded R101-FPN teacher.
# Each loss class carries its own (`default_weight`); DISTILL.B < 0 selects it. RepDistiller's
# classification defaults differ because its losses are normalised differently.
DEFAULT_WEIGHTS: dict[str, float] = {name: cls.default_weight for name, cls in DISTILL_LOSS_REGISTRY}


def loss_weight(method: str, b: float) -> float:
    """DISTILL.B, or the method's default_weight when B is negative."""
    return loss_class(method).default_weight if b < 0 else float(b)


def loss_class(name: str) -> type[DistillLoss]:
    """The DistillLoss subclass registered as `name` (ValueError listing the methods otherwise)."""
    if name not in DISTILL_LOSS_REGISTRY:
        raise ValueError(f"unknown distillation method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return DISTILL_LOSS_REGISTRY.get(name)


def build_distill_loss(name: str, **kwargs) -> DistillLoss:
    """The loss registered as `name`, constructed with kwargs (e.g. max_samples for rkd/pkt).

    Sizes a method does not list in its shape_args are dropped, so a caller can pass the same
    student_channels/teacher_channels/num_levels/num_images to every method.
    """
    cls = loss_class(name)
    sizes = ("student_channels", "teacher_channels", "num_levels", "num_images")
    kwargs = {k: v for k, v in kwargs.items() if k not in sizes or k in cls.shape_args}
    missing = [k for k in cls.shape_args if k not in kwargs]
    if missing:
        raise ValueError(f"method {name!r} has trainable parts sized by {list(cls.shape_args)}; pass {missing}")
    return cls(**kwargs)


__all__ = ["DEFAULT_WEIGHTS", "DISTILL_LOSS_REGISTRY", "METHODS", "DistillLoss", "build_distill_loss", "loss_class",
           "loss_weight"]

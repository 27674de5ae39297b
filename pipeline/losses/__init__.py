"""Feature-distillation losses between student and teacher FPN levels, by method name.

build_distill_loss("rkd", max_samples=256) gives a DistillLoss; METHODS lists the names.
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

METHODS: tuple[str, ...] = tuple(name for name, _cls in DISTILL_LOSS_REGISTRY)


def build_distill_loss(name: str, **kwargs) -> DistillLoss:
    """The loss registered as `name`, constructed with kwargs (e.g. max_samples for rkd/pkt)."""
    if name not in DISTILL_LOSS_REGISTRY:
        raise ValueError(f"unknown distillation method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return DISTILL_LOSS_REGISTRY.get(name)(**kwargs)


__all__ = ["DISTILL_LOSS_REGISTRY", "METHODS", "DistillLoss", "build_distill_loss"]

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

# Weight B per method that makes loss_kd start near 0.5 (the detector's own losses start near 2.5),
# measured on the embedded default: R50-FPN student at initialisation, the embedded R101-FPN teacher.
# DISTILL.B < 0 selects these; RepDistiller's classification defaults differ because its losses
# are normalised differently.
DEFAULT_WEIGHTS: dict[str, float] = {
    "hint": 0.05, "attention": 100.0, "similarity": 30.0, "nst": 10.0, "rkd": 0.2, "pkt": 20000.0, "kdsvd": 2.0,
}


def loss_weight(method: str, b: float) -> float:
    """DISTILL.B, or the method's DEFAULT_WEIGHTS entry when B is negative."""
    return DEFAULT_WEIGHTS[method] if b < 0 else float(b)


def build_distill_loss(name: str, **kwargs) -> DistillLoss:
    """The loss registered as `name`, constructed with kwargs (e.g. max_samples for rkd/pkt)."""
    if name not in DISTILL_LOSS_REGISTRY:
        raise ValueError(f"unknown distillation method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return DISTILL_LOSS_REGISTRY.get(name)(**kwargs)


__all__ = ["DEFAULT_WEIGHTS", "DISTILL_LOSS_REGISTRY", "METHODS", "DistillLoss", "build_distill_loss", "loss_weight"]

"""The teacher plan: everything stage one and stage two derive from the student's config about the
teacher and its store, resolved once at start and passed down.

Before this object, the teacher's config was re-derived from the student's in five places on stage
one's path (fingerprint, geometry, resize rule, extractor, checkpoint); one resolution means one place
where a mistake in DISTILL.CFG_T, PATH_T or INPUT is caught, with one message.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import get_distill_cfg
from detectron2.config import CfgNode


@dataclass(frozen=True)
class TeacherPlan:
    """The resolved teacher and store settings of one student config.

    Attributes:
        teacher_cfg: the teacher's config (DISTILL.CFG_T) on the student's device, MODEL.WEIGHTS = weights.
        weights: the teacher's weights (DISTILL.PATH_T): detectron2:// URL, .pkl or .pth.
        input_format: the teacher's INPUT.FORMAT (images are converted to it).
        resize: the store's resize rule: ResizeShortestEdge at each stored short edge (`store_sizes`).
        train_sizes: INPUT.MIN_SIZE_TRAIN, the short edges the student samples (`choice`).
        levels, strides: the distilled FPN levels and their strides.
        size_divisibility: the teacher's input padding multiple.
        codec, flip: DISTILL.CACHE.CODEC and FLIP.
        rpn: whether the teacher's RPN outputs are stored / served (DISTILL.CACHE.RPN).
        datasets: DATASETS.TRAIN.
        store_path, storage_options: DISTILL.CACHE.PATH and its fsspec options.
    """

    teacher_cfg: CfgNode
    weights: str
    input_format: str
    resize: dict
    train_sizes: tuple[int, ...]
    levels: tuple[str, ...]
    strides: tuple[int, ...]
    size_divisibility: int
    codec: str
    flip: str
    rpn: bool
    datasets: tuple[str, ...]
    store_path: str
    storage_options: dict

    @classmethod
    def from_config(cls, cfg: CfgNode) -> "TeacherPlan":
        """Resolve the plan of a student config (with a DISTILL node); raises with the key to fix."""
        from pipeline.teacher import store_resize, teacher_geometry

        cfg_t = load_teacher_cfg(cfg)
        strides, divisibility = teacher_geometry(cfg_t, cfg.DISTILL.LEVELS)
        return cls(
            teacher_cfg=cfg_t, weights=cfg.DISTILL.PATH_T, input_format=cfg_t.INPUT.FORMAT, resize=store_resize(cfg),
            train_sizes=tuple(int(v) for v in cfg.INPUT.MIN_SIZE_TRAIN),
            levels=tuple(cfg.DISTILL.LEVELS), strides=tuple(strides), size_divisibility=divisibility,
            codec=cfg.DISTILL.CACHE.CODEC, flip=cfg.DISTILL.CACHE.FLIP, rpn=bool(cfg.DISTILL.CACHE.RPN),
            datasets=tuple(cfg.DATASETS.TRAIN), store_path=cfg.DISTILL.CACHE.PATH,
            storage_options=dict(cfg.DISTILL.CACHE.STORAGE_OPTIONS),
        )

    @property
    def store_sizes(self) -> tuple[int, ...]:
        """The short edges the store holds, ascending."""
        from pipeline.teacher import rule_sizes

        return rule_sizes(self.resize)

    @functools.cached_property
    def fingerprint(self) -> dict:
        """Everything that determines the stored features (hashes the weights once per plan)."""
        from pipeline.teacher import plan_fingerprint

        check_teacher_weights(self.weights)  # one clear line before any hashing
        return plan_fingerprint(self)


EMBEDDED_TEACHER = "output/embedded/teacher/model_final.pth"


def check_teacher_weights(path: str) -> None:
    """One clear line for empty or missing teacher weights (a URL is fetched later by detectron2)."""
    if not path:
        raise ValueError("DISTILL.PATH_T is empty: set it to the teacher's weights (detectron2:// URL, .pkl or .pth)")
    if "://" in path or Path(path).exists():
        return
    if Path(path).resolve() == Path(EMBEDDED_TEACHER).resolve():
        raise FileNotFoundError(f"DISTILL.PATH_T={path!r} does not exist: train the embedded teacher first (make teacher)")
    raise FileNotFoundError(f"DISTILL.PATH_T={path!r} does not exist: point it at the teacher's weights "
                            "(detectron2:// URL, .pkl or .pth)")


def load_teacher_cfg(cfg: CfgNode) -> CfgNode:
    """The teacher's config named by the student's DISTILL.CFG_T, on the student's device."""
    if not cfg.DISTILL.CFG_T:
        raise ValueError("DISTILL.CFG_T is empty: set it to the teacher's config file (e.g. configs/embedded/teacher_R101_FPN.yaml)")
    if not Path(cfg.DISTILL.CFG_T).exists():
        raise FileNotFoundError(f"DISTILL.CFG_T={cfg.DISTILL.CFG_T!r} does not exist (paths are relative to the working directory)")
    cfg_t = get_distill_cfg(cfg.DISTILL.CFG_T)
    cfg_t.MODEL.DEVICE = cfg.MODEL.DEVICE
    cfg_t.MODEL.WEIGHTS = cfg.DISTILL.PATH_T
    cfg_t.freeze()
    return cfg_t


def as_plan(cfg_or_plan: "CfgNode | TeacherPlan") -> TeacherPlan:
    """A plan, resolving a student config when given one (the library's convenience entry)."""
    return cfg_or_plan if isinstance(cfg_or_plan, TeacherPlan) else TeacherPlan.from_config(cfg_or_plan)

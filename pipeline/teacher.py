"""The teacher's features of one image: the single definition used by stage one and live mode.

detectron2 pads a batch after normalisation, so a border feature depends on the other
images of the batch. Here each image is normalised, padded alone to the size divisibility,
run through the backbone, and each level is cropped to the image's valid size
ceil(resized / stride). These features are a function of the image alone.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.plan import TeacherPlan, as_plan, check_teacher_weights, load_teacher_cfg  # noqa: F401  (load_teacher_cfg re-exported)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from detectron2.utils.file_io import PathManager

# Keys of the teacher's MODEL node that do not change its features.
_NON_FEATURE_KEYS = ("WEIGHTS", "DEVICE")


class TeacherCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that loads .pth weights with torch's weights_only=True, whatever the environment.

    Tensors and plain containers load, a detectron2 checkpoint ({"model": state_dict, ...}) or a bare
    state dict alike; a file holding other Python objects (a pickle that could run code) is refused.
    Model-zoo .pkl files are pickles by format: detectron2 unpickles them, so only point
    DISTILL.PATH_T at a .pkl you trust.
    """

    def _load_file(self, filename: str) -> dict:
        if filename.endswith((".pkl", ".pyth")):
            return super()._load_file(filename)
        try:
            loaded = torch.load(filename, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as exc:
            raise pickle.UnpicklingError(
                f"teacher weights {filename} hold Python objects beyond tensors, which torch's weights_only "
                f"loader refuses ({str(exc).splitlines()[0]}). Use a plain state-dict checkpoint, or re-save "
                "one you trust with torch.save({'model': model.state_dict()}, path)"
            ) from None
        # A bare torch.save(model.state_dict(), path) has no "model" key: wrap it, as DetectionCheckpointer does.
        return loaded if "model" in loaded else {"model": loaded}


def build_teacher(plan: TeacherPlan | CfgNode) -> torch.nn.Module:
    """Build the teacher detector from DISTILL.CFG_T and load DISTILL.PATH_T, frozen in eval mode."""
    plan = as_plan(plan)
    check_teacher_weights(plan.weights)
    model = build_model(plan.teacher_cfg)
    TeacherCheckpointer(model).load(plan.weights)
    model.eval()
    model.requires_grad_(False)
    return model


def store_resize(cfg: CfgNode) -> dict:
    """The student's training resize rule, which the store's features are computed at (one view set per size).

    With `choice` sampling the inputs are finite: the store holds every short edge of INPUT.MIN_SIZE_TRAIN, or
    the subset DISTILL.CACHE.SIZES names (the student's other sizes then train without loss_kd). `range`
    sampling and random crops are refused here with the values to change, instead of silently misaligning
    features. One size is recorded as formats 1-2 recorded it (`short_edge`), so stores built before stay valid.
    """
    sizes = tuple(int(s) for s in cfg.INPUT.MIN_SIZE_TRAIN)
    sampling = cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    live = cfg.DISTILL.SOURCE == "live"  # the live teacher runs on whatever input the student gets
    if sampling == "range" and not live:
        low, high = min(sizes), max(sizes)
        choice = tuple(range(low, high + 1, 32)) if high > low else (low,)
        raise ValueError(
            f"INPUT.MIN_SIZE_TRAIN_SAMPLING 'range' samples any short edge in [{low}, {high}], which a teacher-feature "
            f"store cannot hold; use 'choice' over a list, e.g. INPUT.MIN_SIZE_TRAIN {choice} "
            "INPUT.MIN_SIZE_TRAIN_SAMPLING choice (detectron2's 1x recipe), or DISTILL.SOURCE live"
        )
    if cfg.INPUT.CROP.ENABLED and not live:
        raise ValueError("INPUT.CROP.ENABLED=True crops at random, which a store cannot serve; disable it or use DISTILL.SOURCE live")
    stored = tuple(int(s) for s in cfg.DISTILL.CACHE.SIZES) or sizes
    extra = sorted(set(stored) - set(sizes))
    if extra and sampling == "choice":
        raise ValueError(f"DISTILL.CACHE.SIZES {tuple(cfg.DISTILL.CACHE.SIZES)} names short edges {extra} that "
                         f"INPUT.MIN_SIZE_TRAIN {sizes} never samples; choose a subset of INPUT.MIN_SIZE_TRAIN, or () for all")
    stored = tuple(sorted(set(stored)))
    rule = {"type": "ResizeShortestEdge", "max_size": int(cfg.INPUT.MAX_SIZE_TRAIN), "interp": "bilinear"}
    if len(stored) == 1:
        return {"type": rule["type"], "short_edge": stored[0], **rule}
    return {**rule, "short_edges": list(stored), "sample_style": sampling}


def rule_sizes(rule: dict) -> tuple[int, ...]:
    """The short edges of a resize rule, ascending (one for a rule recorded with `short_edge`)."""
    if "short_edges" in rule:
        return tuple(int(s) for s in rule["short_edges"])
    return (int(rule["short_edge"]),) if "short_edge" in rule else ()


def resize_augmentation(rule: dict, size: int | None = None) -> T.Augmentation:
    """The deterministic detectron2 resize of a recorded rule at one of its short edges (None: its only one)."""
    sizes = rule_sizes(rule)
    if size is None:
        if len(sizes) != 1:
            raise ValueError(f"the resize rule holds short edges {list(sizes)}; name the one to resize to")
        size = sizes[0]
    if size not in sizes:
        raise ValueError(f"short edge {size} is not in the resize rule's {list(sizes)}")
    return T.ResizeShortestEdge(size, rule["max_size"], sample_style="choice")


def teacher_geometry(cfg_t: CfgNode, levels) -> tuple[list[int], int]:
    """Strides of the FPN levels ("pK" has stride 2**K) and the input size divisibility, from the config alone."""
    strides = []
    for name in levels:
        if not (name.startswith("p") and name[1:].isdigit()):
            raise ValueError(f"DISTILL.LEVELS entry {name!r} is not an FPN level name like 'p2'")
        strides.append(2 ** int(name[1:]))
    res = [int(f[3:]) for f in cfg_t.MODEL.FPN.IN_FEATURES]
    return strides, 2 ** max(res)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with PathManager.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def images_sha256(dataset_names) -> str:
    """sha256 of the training images' (id, file base name, height, width): a regenerated or edited dataset
    under the same name and ids changes it. Image bytes are not hashed (too slow for COCO)."""
    from detectron2.data import DatasetCatalog

    rows = [[int(d["image_id"]), os.path.basename(str(d["file_name"])), d.get("height"), d.get("width")]
            for name in dataset_names for d in DatasetCatalog.get(name)]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def teacher_fingerprint(plan: TeacherPlan | CfgNode) -> dict:
    """Everything that determines the stored features, computed without building the teacher."""
    return as_plan(plan).fingerprint


def plan_fingerprint(plan: TeacherPlan) -> dict:
    """The fingerprint of a plan (TeacherPlan.fingerprint caches it: the weights are hashed once)."""
    cfg_t = plan.teacher_cfg
    model_node = cfg_t.MODEL.clone()
    for key in _NON_FEATURE_KEYS:
        model_node.pop(key, None)
    return {
        "teacher_config_sha256": hashlib.sha256(model_node.dump(sort_keys=True).encode()).hexdigest(),
        "teacher_weights_sha256": sha256_file(PathManager.get_local_path(plan.weights)),
        "input_format": plan.input_format,
        "pixel_mean": [float(v) for v in cfg_t.MODEL.PIXEL_MEAN],
        "pixel_std": [float(v) for v in cfg_t.MODEL.PIXEL_STD],
        "resize": dict(plan.resize),
        "size_divisibility": plan.size_divisibility,
        "levels": list(plan.levels),
        "strides": list(plan.strides),
        "codec": plan.codec,
        "flip": plan.flip,
        "images_sha256": images_sha256(plan.datasets),
    }


def convert_format(image: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Reorder channels between detectron2's BGR and RGB inputs (the only formats supported here)."""
    if src == dst:
        return image
    if {src, dst} == {"BGR", "RGB"}:
        return image.flip(0)
    raise ValueError(f"cannot convert input format {src!r} to {dst!r}; only BGR and RGB are supported")


class TeacherFeatureExtractor:
    """Run a frozen teacher's backbone on images one at a time (the per-image definition above).

    With rpn=True the teacher's RPN head also runs on those features, and each level's objectness
    logits (A, h_l, w_l) and box deltas (4A, h_l, w_l) are returned as "rpn_objectness/<level>"
    and "rpn_deltas/<level>", cropped like the features (what the `kd` method distils); rpn_outputs
    picks which of the two (stage one stores only those a method reads).
    """

    def __init__(self, model: torch.nn.Module, levels, input_format: str, rpn: bool = False,
                 rpn_outputs: Sequence[str] = ("rpn_objectness", "rpn_deltas")):
        self.model = model
        self.rpn = rpn
        self.rpn_outputs = tuple(rpn_outputs) if rpn else ()
        self.levels = list(levels)
        self.input_format = input_format
        shapes = model.backbone.output_shape()
        missing = [name for name in self.levels if name not in shapes]
        if missing:
            raise ValueError(f"teacher backbone has no level(s) {missing}; it has {sorted(shapes)}")
        self.strides = [shapes[name].stride for name in self.levels]
        self.channels = [shapes[name].channels for name in self.levels]
        self.size_divisibility = model.backbone.size_divisibility
        self.rpn_anchors = 0
        if rpn:
            rpn_levels = list(getattr(model.proposal_generator, "in_features", []))
            if not set(self.levels) <= set(rpn_levels):
                raise ValueError(f"storing RPN outputs needs every DISTILL.LEVELS {self.levels} among the teacher's "
                                 f"RPN.IN_FEATURES {rpn_levels}; set DISTILL.CACHE.RPN False or change DISTILL.LEVELS")
            self.rpn_anchors = model.proposal_generator.rpn_head.objectness_logits.out_channels

    @classmethod
    def from_config(cls, cfg: CfgNode | TeacherPlan, rpn: bool = False,
                    rpn_outputs: Sequence[str] = ("rpn_objectness", "rpn_deltas")) -> "TeacherFeatureExtractor":
        """The extractor of a student config or of its resolved TeacherPlan (the teacher built once)."""
        plan = as_plan(cfg)
        extractor = cls(build_teacher(plan), plan.levels, plan.input_format, rpn=rpn, rpn_outputs=rpn_outputs)
        if extractor.strides != list(plan.strides) or extractor.size_divisibility != plan.size_divisibility:
            raise ValueError(f"teacher strides {extractor.strides}/divisibility {extractor.size_divisibility} differ from "
                             f"those its config implies ({list(plan.strides)}/{plan.size_divisibility})")
        return extractor

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """image: uint8 (3, H, W) in the teacher's input format, already resized. Returns level -> (C, h_l, w_l)."""
        h, w = image.shape[-2:]
        x = (image.to(self.device, non_blocking=True).float() - self.model.pixel_mean) / self.model.pixel_std
        batch = ImageList.from_tensors([x], self.size_divisibility)
        features = self.model.backbone(batch.tensor)
        if self.rpn:
            rpn_levels = self.model.proposal_generator.in_features
            objectness, deltas = self.model.proposal_generator.rpn_head([features[f] for f in rpn_levels])
            for f, logits, box in zip(rpn_levels, objectness, deltas):
                features[f"rpn_objectness/{f}"], features[f"rpn_deltas/{f}"] = logits, box
        return {
            key: features[key][0, :, : math.ceil(h / s), : math.ceil(w / s)]
            for name, s in zip(self.levels, self.strides)
            for key in (name, *(f"{output}/{name}" for output in self.rpn_outputs))
        }


def hflip_image(image: np.ndarray) -> np.ndarray:
    """detectron2's HFlipTransform on an HWC image (a contiguous copy)."""
    return np.ascontiguousarray(image[:, ::-1])

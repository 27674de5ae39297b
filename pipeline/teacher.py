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

from pipeline.config import get_distill_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from detectron2.utils.file_io import PathManager

# Keys of the teacher's MODEL node that do not change its features.
_NON_FEATURE_KEYS = ("WEIGHTS", "DEVICE")


def load_teacher_cfg(cfg: CfgNode) -> CfgNode:
    """The teacher's config named by the student's DISTILL.CFG_T, on the student's device."""
    if not cfg.DISTILL.CFG_T:
        raise ValueError("DISTILL.CFG_T is empty: set it to the teacher's config file (e.g. configs/embedded/teacher_R101_FPN.yaml)")
    if not Path(cfg.DISTILL.CFG_T).exists():
        raise FileNotFoundError(f"DISTILL.CFG_T={cfg.DISTILL.CFG_T!r} does not exist (paths are relative to the working directory)")
    cfg_t = get_distill_cfg(cfg.DISTILL.CFG_T)
    cfg_t.MODEL.DEVICE = cfg.MODEL.DEVICE
    cfg_t.MODEL.WEIGHTS = cfg.DISTILL.PATH_T
    return cfg_t


class TeacherCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that loads .pth weights with torch's weights_only=True, whatever the environment.

    Tensors and plain containers load; a file holding other Python objects (a pickle that could run
    code) is refused. Model-zoo .pkl files are pickles by format: detectron2 unpickles them, so only
    point DISTILL.PATH_T at a .pkl you trust.
    """

    def _load_file(self, filename: str) -> dict:
        if filename.endswith((".pkl", ".pyth")):
            return super()._load_file(filename)
        try:
            return torch.load(filename, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as exc:
            raise pickle.UnpicklingError(
                f"teacher weights {filename} hold Python objects beyond tensors, which torch's weights_only "
                f"loader refuses ({str(exc).splitlines()[0]}). Use a plain state-dict checkpoint, or re-save "
                "one you trust with torch.save({'model': model.state_dict()}, path)"
            ) from None


def build_teacher(cfg: CfgNode) -> torch.nn.Module:
    """Build the teacher detector from DISTILL.CFG_T and load DISTILL.PATH_T, frozen in eval mode."""
    cfg_t = load_teacher_cfg(cfg)
    if not cfg.DISTILL.PATH_T:
        raise ValueError("DISTILL.PATH_T is empty: set it to the teacher's weights (detectron2:// URL, .pkl or .pth)")
    model = build_model(cfg_t)
    TeacherCheckpointer(model).load(cfg.DISTILL.PATH_T)
    model.eval()
    model.requires_grad_(False)
    return model


def store_resize(cfg: CfgNode) -> dict:
    """The student's deterministic training resize, which the store's features are computed at.

    A store holds one resize per image, so multi-scale training and random crops are refused
    here with the values to change, instead of silently misaligning features.
    """
    sizes = tuple(cfg.INPUT.MIN_SIZE_TRAIN)
    if len(sizes) != 1 or cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING != "choice":
        raise ValueError(
            f"the teacher-feature store serves one training resize, but INPUT.MIN_SIZE_TRAIN={sizes} with "
            f"MIN_SIZE_TRAIN_SAMPLING={cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING!r} asks for multi-scale training; "
            f"set INPUT.MIN_SIZE_TRAIN to one size, e.g. ({max(sizes)},), or use DISTILL.SOURCE live"
        )
    if cfg.INPUT.CROP.ENABLED:
        raise ValueError("INPUT.CROP.ENABLED=True crops at random, which a store cannot serve; disable it or use DISTILL.SOURCE live")
    return {"type": "ResizeShortestEdge", "short_edge": int(sizes[0]), "max_size": int(cfg.INPUT.MAX_SIZE_TRAIN), "interp": "bilinear"}


def resize_augmentation(rule: dict) -> T.Augmentation:
    """The detectron2 augmentation that implements a recorded resize rule."""
    return T.ResizeShortestEdge(rule["short_edge"], rule["max_size"], sample_style="choice")


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


def teacher_fingerprint(cfg: CfgNode) -> dict:
    """Everything that determines the stored features, computed without building the teacher."""
    cfg_t = load_teacher_cfg(cfg)
    model_node = cfg_t.MODEL.clone()
    for key in _NON_FEATURE_KEYS:
        model_node.pop(key, None)
    weights = PathManager.get_local_path(cfg.DISTILL.PATH_T)
    strides, divisibility = teacher_geometry(cfg_t, cfg.DISTILL.LEVELS)
    return {
        "teacher_config_sha256": hashlib.sha256(model_node.dump(sort_keys=True).encode()).hexdigest(),
        "teacher_weights_sha256": sha256_file(weights),
        "input_format": cfg_t.INPUT.FORMAT,
        "pixel_mean": [float(v) for v in cfg_t.MODEL.PIXEL_MEAN],
        "pixel_std": [float(v) for v in cfg_t.MODEL.PIXEL_STD],
        "resize": store_resize(cfg),
        "size_divisibility": divisibility,
        "levels": list(cfg.DISTILL.LEVELS),
        "strides": strides,
        "codec": cfg.DISTILL.CACHE.CODEC,
        "flip": cfg.DISTILL.CACHE.FLIP,
        "images_sha256": images_sha256(cfg.DATASETS.TRAIN),
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
    def from_config(cls, cfg: CfgNode, rpn: bool = False,
                    rpn_outputs: Sequence[str] = ("rpn_objectness", "rpn_deltas")) -> "TeacherFeatureExtractor":
        model = build_teacher(cfg)
        extractor = cls(model, cfg.DISTILL.LEVELS, load_teacher_cfg(cfg).INPUT.FORMAT, rpn=rpn, rpn_outputs=rpn_outputs)
        strides, divisibility = teacher_geometry(load_teacher_cfg(cfg), cfg.DISTILL.LEVELS)
        if extractor.strides != strides or extractor.size_divisibility != divisibility:
            raise ValueError(f"teacher strides {extractor.strides}/divisibility {extractor.size_divisibility} differ from "
                             f"those its config implies ({strides}/{divisibility})")
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

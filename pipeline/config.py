"""The DISTILL config node (the original live-teacher design's keys plus the store's).

Written like detectron2's config/defaults.py: a comment block above each key says what it does and,
for a key with a fixed set of values, lists them; the Literal types below are those sets, for type
hints on the code that takes them.
"""
from __future__ import annotations

from typing import Literal

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

# DISTILL.SOURCE: where the teacher's features come from.
TeacherSourceName = Literal["cache", "live"]
# DISTILL.CACHE.FLIP: how the store serves a horizontally flipped training image.
FlipOption = Literal["none", "mirror", "stored"]
# DISTILL.CACHE.ON_BAD_ENTRY: what an image without usable teacher features does to training.
OnBadEntry = Literal["fail", "skip"]
# DISTILL.CACHE.CODEC has no Literal: besides "fp16" and "int8" it takes the open family
# "int8-std<a>" (any step 0 < a <= 8), which a Literal cannot spell; cache.get_codec checks it.


def add_distill_config(cfg: CN) -> None:
    """Add the DISTILL subtree (and DATASETS.COCO_FORMAT) with their defaults to cfg."""
    _C = cfg

    # ---------------------------------------------------------------------------------------- #
    # Distillation
    # ---------------------------------------------------------------------------------------- #
    _C.DISTILL = CN()
    # Add the distillation loss `loss_kd` to the student's losses.
    # False: plain detectron2 training (the baseline); the other DISTILL keys are then unused.
    _C.DISTILL.ENABLE = False
    # The teacher's weights: a detectron2:// URL, a local .pkl (model zoo) or a .pth checkpoint.
    _C.DISTILL.PATH_T = ""
    # The teacher's config file (yacs), relative to the working directory.
    _C.DISTILL.CFG_T = ""
    # The distillation method, one module per method in pipeline/losses (docs/methods.md).
    # Options: "hint", "attention", "similarity", "nst", "rkd", "pkt", "kdsvd", "fsp",
    # "correlation", "vid", "crd", "abound", "factor", "kd" (kd needs DISTILL.CACHE.RPN True),
    # and the detection methods "cwd", "pkd", "mgd", "fgd", "defeat" (fgd, defeat use the boxes).
    _C.DISTILL.DISTILL = "hint"
    # Trial number, as in the original design: tells repeated runs of one setting apart.
    # Recorded in student_metrics.json; changes nothing else.
    _C.DISTILL.TRIAL = 0
    # Weight of loss_kd (it multiplies the mean over levels).
    # A negative value selects the method's own `default_weight` (pipeline/losses).
    _C.DISTILL.B = -1.0
    # Where a training step gets the teacher's features.
    # Options: "cache" (read them from the store that stage one wrote, DISTILL.CACHE.PATH),
    # "live" (run the teacher in the training loop, the original design).
    _C.DISTILL.SOURCE = "cache"
    # FPN levels distilled, by name (the same names in student and teacher).
    # Options: any subset of "p2", "p3", "p4", "p5", "p6" that both backbones output.
    _C.DISTILL.LEVELS = ["p2", "p3", "p4", "p5", "p6"]
    # Iterations of a method's init stage, run before training (abound and factor have one).
    # 0 skips it; methods without an init stage ignore it.
    _C.DISTILL.INIT_ITERS = 20
    # Learning rate of that init stage (SGD, momentum 0.9).
    _C.DISTILL.INIT_LR = 0.01

    # ---------------------------------------------------------------------------------------- #
    # The teacher-feature store (stage one writes it, stage two reads it; docs/store-format.md)
    # ---------------------------------------------------------------------------------------- #
    _C.DISTILL.CACHE = CN()
    # The store: a directory, or a URL such as s3://bucket/key.zarr (docs/scale-out.md).
    _C.DISTILL.CACHE.PATH = "output/embedded/teacher_store.zarr"
    # fsspec options when PATH is a URL, e.g. {client_kwargs: {endpoint_url: ...}}.
    # Empty: the JSON object in $CACHE_STORAGE_OPTIONS. Keep credentials in the environment
    # (AWS_*), not in configs.
    _C.DISTILL.CACHE.STORAGE_OPTIONS = CN(new_allowed=True)
    # How the features are encoded (README, "Store size: which codec").
    # Options: "fp16" (half floats, exact to float16), "int8" (per-channel min/max bytes,
    # near-exact), "int8-std<a>" (lossy: a step of a channel standard deviations at p2, halving
    # per level, e.g. "int8-std0.2", the lossy default).
    _C.DISTILL.CACHE.CODEC = "fp16"
    # How a horizontally flipped training image gets its teacher features.
    # Options: "stored" (the teacher also ran on the flipped image: two views per image),
    # "mirror" (the original view's features, mirrored), "none" (no flipped features: a flipped
    # read is refused, so train with INPUT.RANDOM_FLIP "none").
    _C.DISTILL.CACHE.FLIP = "stored"
    # Images per zarr shard: the unit one writer owns and the granularity of a resume.
    _C.DISTILL.CACHE.SHARD_IMAGES = 16
    # Spatial size of the inner chunks inside a shard.
    _C.DISTILL.CACHE.TILE = 64
    # Short edges the store holds: a subset of INPUT.MIN_SIZE_TRAIN (choice sampling).
    # (): all of them. The student's other sizes train without loss_kd (docs/store-format.md, 3a).
    _C.DISTILL.CACHE.SIZES = ()
    # Also store the teacher's RPN outputs that a method reads, per level (kd: the objectness
    # logits; the box deltas only once a method reads them). The feature methods read none.
    _C.DISTILL.CACHE.RPN = False
    # Shards waiting for the background writer before the teacher's inference blocks.
    _C.DISTILL.CACHE.WRITE_QUEUE = 2
    # What an image whose entry is damaged, unwritten or was unreadable does (docs/reliability.md).
    # Options: "fail" (stop, naming the image and the store), "skip" (train that image without
    # loss_kd, counted as kd_skipped_images).
    _C.DISTILL.CACHE.ON_BAD_ENTRY = "fail"

    # ---------------------------------------------------------------------------------------- #
    # Datasets
    # ---------------------------------------------------------------------------------------- #
    # Your own COCO-format datasets, registered by name: [[name, json_file, image_root], ...];
    # then use the names in DATASETS.TRAIN / DATASETS.TEST.
    _C.DATASETS.COCO_FORMAT = []


def get_distill_cfg(config_file: str | None = None, opts: list[str] | None = None) -> CN:
    """A detectron2 config with the DISTILL node, merged from a file and KEY VALUE overrides."""
    cfg = get_cfg()
    add_distill_config(cfg)
    # detectron2's default device is "cuda"; ours picks CUDA where there is one. A device the
    # config or the command line names is kept; pipeline.trainer.setup refuses CUDA without CUDA.
    cfg.MODEL.DEVICE = "auto"
    if config_file:
        cfg.merge_from_file(config_file)
    if opts:
        cfg.merge_from_list(list(opts))
    if cfg.MODEL.DEVICE == "auto":
        import torch

        cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg

"""The DISTILL config node (the original live-teacher design's keys plus the store's)."""
from __future__ import annotations

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg


def add_distill_config(cfg: CN) -> None:
    """Add the DISTILL subtree (and DATASETS.COCO_FORMAT) with their defaults to cfg."""
    cfg.DISTILL = CN()
    cfg.DISTILL.ENABLE = False  # add the distillation loss `loss_kd`; False is plain detectron2 training
    cfg.DISTILL.PATH_T = ""  # teacher weights: detectron2:// URL, local .pkl (model zoo) or .pth
    cfg.DISTILL.CFG_T = ""  # teacher config file (yacs), relative to the working directory
    cfg.DISTILL.DISTILL = "hint"  # method: hint, attention, similarity, nst, rkd, pkt, kdsvd, fsp, correlation, vid, crd, abound, factor, kd
    cfg.DISTILL.TRIAL = 0  # trial number, as in the original design: tells repeated runs of one setting apart
    cfg.DISTILL.B = -1.0  # weight of loss_kd (times the mean over levels); < 0: the method's default_weight
    cfg.DISTILL.SOURCE = "cache"  # "cache": read the teacher's features from the store; "live": run the teacher
    cfg.DISTILL.LEVELS = ["p2", "p3", "p4", "p5", "p6"]  # FPN levels distilled (student and teacher names)
    cfg.DISTILL.INIT_ITERS = 20  # iterations of a method's init stage before training (abound, factor); 0 skips it
    cfg.DISTILL.INIT_LR = 0.01  # SGD (momentum 0.9) learning rate of that init stage
    cfg.DISTILL.CACHE = CN()
    cfg.DISTILL.CACHE.PATH = "output/embedded/teacher_store.zarr"  # the teacher-feature store (stage one writes it)
    # fsspec options when PATH is a URL such as s3://bucket/key.zarr, e.g. {client_kwargs: {endpoint_url: ...}};
    # empty: $CACHE_STORAGE_OPTIONS (JSON). Keep credentials in the environment (AWS_*), not in configs.
    cfg.DISTILL.CACHE.STORAGE_OPTIONS = CN(new_allowed=True)
    cfg.DISTILL.CACHE.CODEC = "fp16"  # fp16 (lossless on fp16 values), int8 (per-channel affine), int8-std<a> (lossy: step a channel std at p2, halving per level; docs/store-format.md)
    cfg.DISTILL.CACHE.FLIP = "stored"  # horizontal flip: "stored" (teacher run on the flipped image), "mirror", "none"
    cfg.DISTILL.CACHE.SHARD_IMAGES = 16  # images per zarr shard: one writer per shard, resume granularity
    cfg.DISTILL.CACHE.TILE = 64  # spatial size of the inner chunks inside a shard
    cfg.DISTILL.CACHE.RPN = False  # also store the teacher's RPN outputs that a method reads, per level (kd: objectness logits)
    cfg.DISTILL.CACHE.WRITE_QUEUE = 2  # shards waiting for the background writer before inference blocks
    cfg.DISTILL.CACHE.ON_BAD_ENTRY = "fail"  # entry damaged/unwritten/unreadable: "fail" names image+store; "skip" drops its loss_kd, counted (docs/reliability.md)
    cfg.DATASETS.COCO_FORMAT = []  # user datasets: [[name, json_file, image_root], ...], then use the names


def get_distill_cfg(config_file: str | None = None, opts: list[str] | None = None) -> CN:
    """A detectron2 config with the DISTILL node, merged from a file and KEY VALUE overrides."""
    cfg = get_cfg()
    add_distill_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg

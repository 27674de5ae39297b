"""The store's RPN outputs mean what detectron2 means by them, read as detectron2's RPN reads them.

A teacher with two anchors per position (MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS [[0.5, 2.0]]), so
that a channel index right only for anchor 0 fails. Its stored objectness and deltas, and their
mirrored read (DISTILL.CACHE.FLIP mirror), are handed to detectron2's own RPN.forward in place of its
head's output; RPN.forward lays them out per anchor, and its _decode_proposals turns them into
boxes. A mirrored read must decode to the mirror image of the boxes of the original read.
"""
from __future__ import annotations

from unittest import mock

import numpy as np
import torch

from cache import ImageEntry, StoreLayout, TeacherFeatureStore, TeacherFeatureWriter
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from pipeline.config import get_distill_cfg
from pipeline.teacher import TeacherFeatureExtractor
from tests.conftest import write_tiny_config

LEVELS = ("p2", "p3", "p4", "p5", "p6")
IMAGE_HW, PADDED_HW = (128, 176), (128, 192)


def two_anchor_teacher(tmp_path) -> torch.nn.Module:
    cfg = get_distill_cfg(str(write_tiny_config(tmp_path / "teacher.yaml")),
                          ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[0.5, 2.0]]])
    assert cfg.MODEL.ANCHOR_GENERATOR.OFFSET == 0.0  # anchor centres at x * stride: the mirror of column x is w - 1 - x
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    head = model.proposal_generator.rpn_head
    with torch.no_grad():  # detectron2 initialises the head with std 0.01: make the deltas O(1), so a wrong sign shows
        head.anchor_deltas.weight.normal_(std=0.5)
        head.anchor_deltas.bias.normal_(std=0.5)
    return model


def stored_rpn_outputs(model, tmp_path) -> TeacherFeatureStore:
    """A one-image FLIP mirror store of the teacher's features and RPN outputs (through stage one's extractor)."""
    extractor = TeacherFeatureExtractor(model, LEVELS, "BGR", rpn=True)
    assert extractor.rpn_anchors == 2
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, *IMAGE_HW), dtype=np.uint8))
    maps = {key: x.numpy() for key, x in extractor(image).items()}
    layout = StoreLayout(LEVELS, tuple(extractor.strides), extractor.channels[0], "fp16", "mirror", PADDED_HW,
                         shard_images=1, tile=64, rpn_anchors=extractor.rpn_anchors)
    writer = TeacherFeatureWriter.open(str(tmp_path / "store"), layout, [1], "toy", {"t": 1})
    writer.write_shard(0, [ImageEntry(1, IMAGE_HW, IMAGE_HW, PADDED_HW, {"orig": maps})])
    return TeacherFeatureStore(str(tmp_path / "store"))


def detectron2_decode(model, maps: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per level, (h, w, A) objectness and (h, w, A, 4) boxes: detectron2's RPN.forward, these maps as its head's output."""
    rpn = model.proposal_generator
    captured = {}

    def head(features):
        return ([maps[f"rpn_objectness/{f}"][None] for f in rpn.in_features],
                [maps[f"rpn_deltas/{f}"][None] for f in rpn.in_features])

    def keep(anchors, objectness, deltas, image_sizes):
        captured.update(anchors=anchors, objectness=objectness, deltas=deltas)
        return []

    features = {f: torch.zeros(1, 1, *maps[f"rpn_objectness/{f}"].shape[-2:]) for f in rpn.in_features}
    with mock.patch.object(rpn.rpn_head, "forward", head), mock.patch.object(rpn, "predict_proposals", keep):
        rpn(ImageList(torch.zeros(1, 3, *PADDED_HW), [IMAGE_HW]), features)
    boxes = rpn._decode_proposals(captured["anchors"], captured["deltas"])
    shapes = [features[f].shape[-2:] for f in rpn.in_features]
    return ([o.view(*hw, -1) for o, hw in zip(captured["objectness"], shapes)],
            [b.view(*hw, -1, 4) for b, hw in zip(boxes, shapes)])


def test_a_mirrored_read_of_a_two_anchor_teacher_decodes_to_the_mirrored_boxes_and_scores(tmp_path):
    model = two_anchor_teacher(tmp_path)
    store = stored_rpn_outputs(model, tmp_path)
    plain_scores, plain_boxes = detectron2_decode(model, store.read(1))
    mirror_scores, mirror_boxes = detectron2_decode(model, store.read(1, flip=True))
    strides = dict(zip(LEVELS, store.layout.strides))
    for level, ps, pb, ms, mb in zip(LEVELS, plain_scores, plain_boxes, mirror_scores, mirror_boxes):
        assert ps.shape[-1] == 2, level  # two anchors per position
        axis = (ps.shape[1] - 1) * strides[level]  # column x's anchors, mirrored, are column w - 1 - x's
        expected = torch.flip(pb, dims=[1])[..., [2, 1, 0, 3]] * torch.tensor([-1.0, 1, -1, 1]) \
            + torch.tensor([axis, 0.0, axis, 0])  # x1' = axis - x2, x2' = axis - x1; y unchanged
        assert torch.equal(ms, torch.flip(ps, dims=[1])), level
        assert torch.allclose(mb, expected, rtol=1e-5, atol=1e-3), (level, (mb - expected).abs().max().item())
        # dx is O(1) (a wrong sign moves a box by 2 dx anchor widths, far beyond atol) and differs per anchor.
        dx = store.read(1)[f"rpn_deltas/{level}"].view(2, 4, *ps.shape[:2])[:, 0]
        assert dx.abs().mean() > 0.1 and not torch.equal(dx[0], dx[1]), level

"""The store against detectron2 itself: each entry is detectron2's own single-image forward of the teacher.

The reference never touches the project's extractor, reader of images or checkpointer: the image
comes from detectron2's DatasetMapper (read_image, ResizeShortestEdge, and for the flipped view
RandomFlip after the resize, as the student's mapper applies them), the weights from detectron2's
DetectionCheckpointer, the features from GeneralizedRCNN.preprocess_image and backbone on a batch
of that one image (and the RPN head on them, as RPN.forward calls it), each level cropped to the
image's valid size ceil(resized / stride). An fp16 store must hold that, rounded to fp16.
"""
from __future__ import annotations

import math

import torch

from cache import TeacherFeatureStore
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from pipeline.config import get_distill_cfg

# fp16 keeps 11 significant bits: rounding moves a normal value by at most 2**-11 of itself, and a
# value in fp16's subnormal range (below 2**-14) by at most half its spacing, 2**-25.
FP16_RELATIVE, FP16_ABSOLUTE = 2.0**-11, 2.0**-25


def detectron2_teacher(teacher_cfg_file: str, weights: str) -> torch.nn.Module:
    cfg = get_distill_cfg(teacher_cfg_file)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    return model, cfg


@torch.no_grad()
def detectron2_features(model, mapped: dict) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """Levels (and RPN outputs) of one mapped image through detectron2's own path, cropped to its valid size."""
    images = model.preprocess_image([mapped])
    features = model.backbone(images.tensor)
    rpn_levels = model.proposal_generator.in_features
    objectness, deltas = model.proposal_generator.rpn_head([features[f] for f in rpn_levels])
    outputs = dict(features)
    for level, logits, box in zip(rpn_levels, objectness, deltas):
        outputs[f"rpn_objectness/{level}"], outputs[f"rpn_deltas/{level}"] = logits, box
    h, w = images.image_sizes[0]
    strides = {name: shape.stride for name, shape in model.backbone.output_shape().items()}
    cropped = {}
    for key, x in outputs.items():
        s = strides[key.rsplit("/", 1)[-1]]
        cropped[key] = x[0, :, : math.ceil(h / s), : math.ceil(w / s)]
    return cropped, (h, w)


def test_every_stored_entry_both_views_is_detectron2s_single_image_forward_rounded_to_fp16(tiny_rpn_store,
                                                                                           tiny_teacher):
    store_cfg = tiny_rpn_store["cfg"]
    store = TeacherFeatureStore(tiny_rpn_store["path"])
    assert store.layout.codec == "fp16" and store.layout.flip == "stored" and store.layout.rpn_anchors == 3
    model, teacher_cfg = detectron2_teacher(tiny_teacher["cfg"], tiny_teacher["weights"])
    resize = T.ResizeShortestEdge(store_cfg.INPUT.MIN_SIZE_TRAIN, store_cfg.INPUT.MAX_SIZE_TRAIN, "choice")
    mappers = {flip: DatasetMapper(False, augmentations=[resize] + ([T.RandomFlip(prob=1.0)] if flip else []),
                                   image_format=teacher_cfg.INPUT.FORMAT) for flip in (False, True)}
    dicts = {d["image_id"]: d for d in DatasetCatalog.get(store_cfg.DATASETS.TRAIN[0])}
    worst, compared = 0.0, 0
    for image_id in (int(i) for i in store.image_ids):
        for flip, mapper in mappers.items():
            reference, resized_hw = detectron2_features(model, mapper(dict(dicts[image_id])))
            assert tuple(store.sizes(image_id)["resized_hw"]) == resized_hw, image_id
            stored = store.read(image_id, flip=flip)
            assert set(stored) == set(store.layout.stored_keys) and set(stored) <= set(reference)
            for key, got in stored.items():
                want = reference[key]
                assert got.shape == want.shape, (image_id, flip, key)
                error = (got - want).abs()
                bound = FP16_RELATIVE * want.abs() + FP16_ABSOLUTE
                assert torch.all(error <= bound), (image_id, flip, key, (error - bound).max().item())
                worst = max(worst, (error / (want.abs() + FP16_ABSOLUTE / FP16_RELATIVE)).max().item())
                compared += 1
    assert compared == len(store.image_ids) * 2 * len(store.layout.stored_keys)
    assert worst > 0  # the store really is rounded (a float32 store here would be a different codec)
    print(f"worst relative deviation {worst:.3g} over {compared} maps (fp16 allows {FP16_RELATIVE:.3g})")

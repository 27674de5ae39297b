"""Specification of the other seven methods: fsp, correlation, vid, crd, abound, factor and kd.

Each method's value on tiny tensors is worked out by hand in the test (trainable parts set to
known weights), then every method is held to what detection needs: padding never matters, a
padded image scores like its cropped self where the method is per image, gradients are finite
and skip padding; then the parts around them: RPN outputs in the store, the init stage, the
trainable parts in the optimizer and checkpoint, CRD's memory bank under DDP, and a short
training run of each method from a tiny store.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.losses import METHODS, DEFAULT_WEIGHTS, build_distill_loss, loss_class
from pipeline.losses.abound import ABLoss
from pipeline.losses.correlation import CorrelationLoss
from pipeline.losses.crd import CRDLoss
from pipeline.losses.factor import FactorTransferLoss
from pipeline.losses.fsp import FSPLoss
from pipeline.losses.kd import RPNObjectnessKDLoss
from pipeline.losses.vid import VIDLoss
from tests.conftest import REPO, make_student_cfg
from tests.pipeline.losses.test_losses import LEVEL_VALID, box_mask, fill_padding, two_level_batch

NEW_METHODS = ("fsp", "correlation", "vid", "crd", "abound", "factor", "kd")
# Methods whose value is a sum of per-image terms (crd pools each image; correlation samples the batch).
PER_IMAGE = ("fsp", "vid", "abound", "factor", "kd", "crd")
SIZES = {"student_channels": 4, "teacher_channels": 4, "num_levels": 2, "num_images": 5}


def build(method: str, device="cpu", **kwargs):
    """The method's loss for two_level_batch (4 channels, 2 levels, a 5-image bank), in eval mode (crd's bank frozen)."""
    torch.manual_seed(0)
    return build_distill_loss(method, **SIZES, **kwargs).to(device).eval()


def score(loss, students, teachers, masks, rows=(0, 1)):
    """The loss, with crd's rows (on the students' device) and a fixed draw of its negatives."""
    rows = torch.tensor(rows[: students[0].shape[0]], device=students[0].device)
    extra = {"rows": rows} if loss.needs_image_index else {}
    if loss.needs_boxes:  # fgd, defeat: one ground-truth box per image, inside every image's valid region
        box = torch.tensor([[0.0, 0.0, 8.0, 8.0]], device=students[0].device)
        extra.update(boxes=[box] * students[0].shape[0], strides=(4, 8, 16, 32, 64)[: len(students)])
    torch.manual_seed(1)
    return loss(students, teachers, masks, **extra)


def set_identity(conv: torch.nn.Conv2d) -> None:
    """A conv that passes its (single) input channel through: centre tap 1, all else 0."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = torch.eye(conv.out_channels,
                                                                                          conv.in_channels)
        conv.bias.zero_()


def one_map(*values, shape=None) -> torch.Tensor:
    x = torch.tensor(values, dtype=torch.float32)
    return x.reshape(shape or (1, 1, 1, len(values)))


# --------------------------------------------------------------------------- registry and weights


def test_all_fourteen_methods_are_registered_with_a_default_weight():
    assert set(METHODS) >= {"hint", "attention", "similarity", "nst", "rkd", "pkt", "kdsvd", *NEW_METHODS}
    assert set(DEFAULT_WEIGHTS) == set(METHODS)
    for name in NEW_METHODS:
        assert loss_class(name).method == name and loss_class(name).__doc__


def test_the_sweep_runs_all_fourteen_by_default_and_stops_early_when_the_store_lacks_rpn_outputs():
    from tools.sweep import check_store_serves

    config = str(REPO / "configs" / "embedded" / "student_R50_FPN.yaml")
    check_store_serves(config, list(METHODS), [])  # the embedded default stores RPN outputs
    makefile = (REPO / "Makefile").read_text()
    assert f"METHODS ?= {' '.join(METHODS)}" in makefile
    with pytest.raises(SystemExit, match="DISTILL.CACHE.RPN"):
        check_store_serves(config, ["hint", "kd"], ["DISTILL.CACHE.RPN", "False"])
    check_store_serves(config, ["hint", "crd"], ["DISTILL.CACHE.RPN", "False"])


def test_a_method_with_trainable_parts_says_which_sizes_it_needs():
    with pytest.raises(ValueError, match="num_images"):
        build_distill_loss("crd", student_channels=4, teacher_channels=4, num_levels=2)
    assert isinstance(build_distill_loss("kd", **SIZES), RPNObjectnessKDLoss)  # sizes it does not use are dropped


# --------------------------------------------------------------------------- hand-computed values


def test_fsp_is_the_squared_gap_of_masked_gram_matrices_between_consecutive_levels():
    # Finer 2x2 level with only its left column valid; coarser 1x1 level.
    mask_fine = torch.tensor([[True, False], [True, False]]).reshape(1, 1, 2, 2)
    mask_coarse = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    student = [one_map(1.0, 99.0, 3.0, -99.0, shape=(1, 1, 2, 2)), one_map(2.0)]
    teacher = [one_map(1.0, 7.0, 1.0, 7.0, shape=(1, 1, 2, 2)), one_map(3.0)]
    # Student: the finer level pools to mean(1, 3) = 2, times 2 -> 4. Teacher: mean(1, 1) * 3 = 3.
    loss = FSPLoss()(student, teacher, [mask_fine, mask_coarse])
    assert loss.item() == pytest.approx((4.0 - 3.0) ** 2)


def test_fsp_needs_two_levels_and_equal_widths():
    s, t, m = two_level_batch(channels_student=3)
    with pytest.raises(ValueError, match="equal widths"):
        FSPLoss()(s, t, m)
    with pytest.raises(ValueError, match="at least 2 levels"):
        FSPLoss()(s[:1], s[:1], m[:1])


def test_correlation_compares_gaussian_kernels_of_embedded_positions():
    loss = CorrelationLoss(2, 2, 1, embed_dim=2, gamma=0.4)
    for head in (loss.embed_student[0], loss.embed_teacher[0]):
        with torch.no_grad():
            head.weight.copy_(torch.eye(2))
            head.bias.zero_()
    mask = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # orthogonal: distance^2 = 2
    teacher = torch.tensor([[1.0, 0.0], [2.0, 0.0]]).T.reshape(1, 2, 1, 2)  # same direction: distance 0
    expected = 2 * (math.exp(-0.4 * 2) - 1) ** 2 / 4  # two off-diagonal entries of four differ
    assert loss([student], [teacher], [mask]).item() == pytest.approx(expected, rel=1e-6)


def test_correlation_trains_the_student_embedding_and_keeps_the_teacher_projection_fixed():
    loss = build("correlation")
    assert all(p.requires_grad for p in loss.embed_student.parameters())
    assert not any(p.requires_grad for p in loss.embed_teacher.parameters())


def test_vid_is_the_gaussian_nll_of_the_teacher_under_the_regressed_mean_and_learned_variance():
    loss = VIDLoss(1, 1, 1, init_variance=2.0)
    for conv in loss.regressors[0][::2]:
        set_identity(conv)  # with ReLU on positive values: mean = student
    assert loss.variance(0).item() == pytest.approx(2.0)
    mask = torch.tensor([True, True, False]).reshape(1, 1, 1, 3)
    value = loss([one_map(1.0, 2.0, 50.0)], [one_map(3.0, 2.0, -50.0)], [mask])
    # 0.5 * ((1 - 3)^2 / 2 + ln 2) and 0.5 * (0 + ln 2), averaged over the two valid positions.
    assert value.item() == pytest.approx(0.5 + 0.5 * math.log(2.0), rel=1e-5)


def test_abound_penalises_the_student_on_the_wrong_side_of_the_teachers_boundary_within_the_margin():
    loss = ABLoss(1, 1, 1, margin=1.0)
    set_identity(loss.connectors[0])
    mask = torch.tensor([True, True, True, True, False]).reshape(1, 1, 1, 5)
    student, teacher = one_map(0.5, -2.0, 0.0, 3.0, 9.0), one_map(-1.0, 1.0, 1.0, 2.0, -9.0)
    # off but s > -1: (0.5 + 1)^2; on but s <= 1: (-2 - 1)^2 and (0 - 1)^2; on and s > 1: 0.
    assert loss([student], [teacher], [mask]).item() == pytest.approx((2.25 + 9.0 + 1.0 + 0.0) / 4)


def factor_with_identity_convs(bias_on_reconstruction: float = 0.0) -> FactorTransferLoss:
    loss = FactorTransferLoss(1, 1, factor_rate=1.0)
    for conv in [*loss.translator.convs, *loss.paraphraser.encoder.convs, *loss.paraphraser.decoder.convs]:
        set_identity(conv)
    with torch.no_grad():
        loss.paraphraser.decoder.convs[-1].bias.fill_(bias_on_reconstruction)
    return loss


def test_factor_is_the_l1_gap_of_per_image_l2_normalised_factors():
    loss = factor_with_identity_convs()  # positive maps pass unchanged: factors = the maps
    mask = torch.tensor([True, True, False]).reshape(1, 1, 1, 3)
    value = loss([one_map(3.0, 4.0, 100.0)], [one_map(4.0, 3.0, 100.0)], [mask])
    # (0.6, 0.8) against (0.8, 0.6): |0.2| at both valid positions.
    assert value.item() == pytest.approx(0.2, rel=1e-5)


def test_factor_init_stage_is_the_paraphrasers_masked_reconstruction_error():
    """The paraphraser is frozen for the main training; its init stage alone trains it."""
    loss = factor_with_identity_convs(bias_on_reconstruction=1.0)  # reconstructs t + 1
    mask = torch.tensor([True, True, False]).reshape(1, 1, 1, 3)
    assert loss.init_loss(None, [one_map(3.0, 4.0, 100.0)], [mask]).item() == pytest.approx(1.0)
    assert {id(p) for p in loss.init_parameters()} == {id(p) for p in loss.paraphraser.parameters()}


def test_kd_is_t_squared_times_the_binary_kl_of_tempered_objectness():
    p = 0.75  # teacher probability at T: logit ln 3 / T ... scaled below
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    mask = torch.tensor([True, True, False]).reshape(1, 1, 1, 3)
    student, teacher = one_map(0.0, 5.0, 0.0), one_map(2 * math.log(3.0), 5.0, 40.0)
    value = RPNObjectnessKDLoss(temperature=2.0)([student], [teacher], [mask])
    # Position 1 agrees (KL 0); position 0: sigmoid(ln 3) = 0.75 against 0.5, times T^2 = 4.
    assert value.item() == pytest.approx(4 * kl / 2, rel=1e-5)


def test_kd_refuses_different_anchor_counts():
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="anchors per position"):
        RPNObjectnessKDLoss()([torch.zeros(1, 3, 1, 1)], [torch.zeros(1, 5, 1, 1)], [mask])


def test_crd_contrast_is_the_cross_entropy_of_the_positive_among_the_candidates():
    loss = CRDLoss(2, 2, 1, num_images=2, dim=2, temperature=0.5)
    with torch.no_grad():
        loss.teacher_bank.embeddings.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    value = loss.contrast(torch.tensor([[1.0, 0.0]]), loss.teacher_bank, torch.tensor([[0, 1]]))
    # logits (1 / 0.5, 0 / 0.5): -log(e^2 / (e^2 + 1)).
    assert value.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)


def test_crd_with_a_uniform_bank_gives_twice_log_of_one_plus_k_and_moves_the_rows_it_saw():
    loss = CRDLoss(2, 2, 1, num_images=3, dim=2, negatives=5, momentum=0.5).train()
    with torch.no_grad():
        for bank in (loss.student_bank, loss.teacher_bank):
            bank.embeddings.copy_(torch.tensor([[1.0, 0.0]]).repeat(3, 1))
        for head in (loss.embed_student, loss.embed_teacher):
            head.weight.copy_(torch.eye(2))
            head.bias.zero_()
    mask = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    image = torch.tensor([[0.0, 0.0], [1.0, 3.0]]).reshape(1, 2, 1, 2)  # pools to (0, 2): embeds to (0, 1)
    value = loss([image], [image], [mask], rows=torch.tensor([2]))
    assert value.item() == pytest.approx(2 * math.log(1 + 5), rel=1e-6)  # all 6 candidates score alike
    half = 1 / math.sqrt(2)
    assert torch.allclose(loss.student_bank.embeddings[2], torch.tensor([half, half]))  # normalise(0.5 old + 0.5 new)
    assert torch.equal(loss.student_bank.embeddings[:2], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_crd_bank_memory_is_images_times_dim_times_four_bytes_per_bank_as_documented():
    from pipeline.losses.crd import MemoryBank

    bank = MemoryBank(num_images=1000, dim=128, momentum=0.5)
    assert bank.embeddings.dtype == torch.float32 and bank.embeddings.nbytes == 1000 * 128 * 4
    coco = 118_287 * 128 * 4  # COCO train2017 images
    assert f"{coco / 1e6:.1f} MB" in MemoryBank.__doc__


# --------------------------------------------------------------------------- properties of every new method


@pytest.mark.parametrize("method", NEW_METHODS)
def test_padding_content_does_not_change_the_loss(method, device):
    s, t, m = two_level_batch(device=device)
    loss = build(method, device)
    clean = score(loss, s, t, m)
    for value in (1e30, float("inf")):
        noisy = score(loss, [fill_padding(f, mask, value) for f, mask in zip(s, m)],
                      [fill_padding(f, mask, value) for f, mask in zip(t, m)], m)
        assert noisy.item() == pytest.approx(clean.item(), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("method", PER_IMAGE)
def test_padded_image_scores_like_the_image_cropped_to_its_valid_region(method, device):
    s, t, m = two_level_batch(device=device)
    one = slice(1, 2)  # image 1 is the padded one
    loss = build(method, device)
    padded = score(loss, [f[one] for f in s], [f[one] for f in t], [mask[one] for mask in m])
    crops = [valid[1] for valid in LEVEL_VALID]
    cropped = score(loss, [f[one, :, :h, :w] for f, (h, w) in zip(s, crops)],
                    [f[one, :, :h, :w] for f, (h, w) in zip(t, crops)],
                    [mask[one, :, :h, :w] for mask, (h, w) in zip(m, crops)])
    assert padded.item() == pytest.approx(cropped.item(), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("method", ["fsp", "kd"])
def test_identical_student_and_teacher_give_zero(method, device):
    s, _, m = two_level_batch(device=device)
    assert abs(score(build(method, device), s, [f.clone() for f in s], m).item()) < 1e-6


@pytest.mark.parametrize("method", NEW_METHODS)
def test_gradients_reach_the_student_are_finite_and_skip_padding(method, device):
    s, t, m = two_level_batch(device=device)
    s = [f.requires_grad_() for f in s]
    score(build(method, device), s, t, m).backward()
    for f, mask in zip(s, m):
        assert torch.isfinite(f.grad).all()
        assert (f.grad[~mask.expand_as(f)] == 0).all()
    assert any(f.grad.abs().sum() > 0 for f in s)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_half_precision_inputs_give_a_float32_loss(method, device):
    s, t, m = two_level_batch(device=device)
    loss = build(method, device)
    half = score(loss, [f.half() for f in s], [f.half() for f in t], m)
    assert half.dtype == torch.float32
    full = score(loss, [f.half().float() for f in s], [f.half().float() for f in t], m)
    assert half.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-9)


# --------------------------------------------------------------------------- RPN outputs in the store


def _rpn_layout(flip: str):
    from cache import StoreLayout

    # Two anchors per position, so that a channel index that is right only for anchor 0 fails.
    return StoreLayout(("p2", "p3"), (4, 8), 2, "fp16", flip, (32, 32), shard_images=2, tile=16, rpn_anchors=2)


def _rpn_entry(image_id: int, layout):
    from cache import ImageEntry

    g = np.random.default_rng(image_id)
    views = {view: {key: g.standard_normal((layout.channels_of(key), *layout.valid_hw(key, (24, 32))))
                    .astype(np.float32) for key in layout.stored_keys} for view in layout.views}
    return ImageEntry(image_id, (24, 32), (24, 32), (32, 32), views)


def test_a_layout_with_rpn_anchors_stores_objectness_and_deltas_per_level_at_the_levels_stride():
    layout = _rpn_layout("stored")
    assert layout.stored_keys == ("p2", "p3", "rpn_objectness/p2", "rpn_objectness/p3", "rpn_deltas/p2", "rpn_deltas/p3")
    assert [layout.channels_of(k) for k in layout.stored_keys] == [2, 2, 2, 2, 8, 8]
    assert layout.valid_hw("rpn_deltas/p3", (24, 32)) == layout.valid_hw("p3", (24, 32)) == (3, 4)
    assert layout.to_attrs()["rpn_anchors"] == 2
    assert "rpn_anchors" not in _rpn_layout("stored").__class__(("p2",), (4,), 2, "fp16", "none", (32, 32)).to_attrs()


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_rpn_outputs_round_trip_and_a_mirrored_read_negates_dx(tmp_path, codec):
    from dataclasses import replace

    from cache import TeacherFeatureStore, TeacherFeatureWriter

    layout = replace(_rpn_layout("mirror"), codec=codec)
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, [1, 2], "toy", {"t": 1})
    entries = [_rpn_entry(1, layout), _rpn_entry(2, layout)]
    writer.write_shard(0, entries)
    store = TeacherFeatureStore(str(tmp_path / "s"))
    tolerance = 3e-2 if codec == "int8" else 1e-3  # int8: half a step of a ~7-wide channel range over 255
    plain, mirrored = store.read(1), store.read(1, flip=True)
    for key in layout.stored_keys:
        np.testing.assert_allclose(plain[key].numpy(), entries[0].features["orig"][key], atol=tolerance)
    for key in ("rpn_deltas/p2", "rpn_deltas/p3"):
        # Channel 4a + k is coordinate k (dx, dy, dw, dh) of anchor a: detectron2's RPN.forward views the
        # head's (N, 4A, H, W) output as (N, A, 4, H, W).
        deltas = torch.flip(plain[key], dims=[-1]).view(layout.rpn_anchors, 4, *plain[key].shape[-2:])
        got = mirrored[key].view(layout.rpn_anchors, 4, *plain[key].shape[-2:])
        assert torch.equal(got[:, 0], -deltas[:, 0]), key  # dx of every anchor changes sign
        assert torch.equal(got[:, 1:], deltas[:, 1:]), key  # dy, dw, dh do not
        level = key.split("/")[1]
        assert torch.equal(mirrored[f"rpn_objectness/{level}"], torch.flip(plain[f"rpn_objectness/{level}"], dims=[-1]))


def test_a_lossy_codec_keeps_int8s_step_on_rpn_outputs_and_its_own_on_features(tmp_path):
    from dataclasses import replace

    from cache import TeacherFeatureStore, TeacherFeatureWriter

    layout = replace(_rpn_layout("stored"), codec="int8-std0.5", predictor="plane")
    assert [layout.step_scale(k) for k in layout.stored_keys] == [1.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, [1, 2], "toy", {"t": 1})
    entries = [_rpn_entry(1, layout), _rpn_entry(2, layout)]
    writer.write_shard(0, entries)
    got = TeacherFeatureStore(str(tmp_path / "s")).read(1)
    for key in layout.stored_keys:
        x = entries[0].features["orig"][key]
        err = np.abs(got[key].numpy() - x).max(axis=(1, 2))
        int8_half_step = (x.max(axis=(1, 2)) - x.min(axis=(1, 2))) / 255 / 2 * (1 + 1e-4) + 1e-6
        if key.startswith("rpn_"):
            assert np.all(err <= int8_half_step), key
    p2 = entries[0].features["orig"]["p2"]
    assert np.abs(got["p2"].numpy() - p2).max() > ((p2.max() - p2.min()) / 255 / 2)  # coarser than int8 there


def test_a_read_of_some_keys_returns_exactly_those_as_a_full_read_has_them_and_refuses_unknown_ones(tmp_path):
    from dataclasses import replace

    from cache import TeacherFeatureStore, TeacherFeatureWriter

    layout = replace(_rpn_layout("mirror"), codec="int8", predictor="plane")
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, [1, 2], "toy", {"t": 1})
    writer.write_shard(0, [_rpn_entry(1, layout), _rpn_entry(2, layout)])
    store = TeacherFeatureStore(str(tmp_path / "s"))
    for flip in (False, True):  # the mirrored read negates dx of the deltas it reads
        full = store.read(1, flip=flip)
        some = store.read(1, flip=flip, keys=["p3", "rpn_deltas/p2"])
        assert list(some) == ["p3", "rpn_deltas/p2"]
        assert all(torch.equal(some[k], full[k]) for k in some)
    with pytest.raises(KeyError, match=r"holds no \['p4'\]"):
        store.read(1, keys=["p2", "p4"])


@pytest.mark.parametrize("method, expected", [("hint", ["p2", "p3", "p4", "p5", "p6"]),
                                              ("kd", [f"rpn_objectness/p{i}" for i in range(2, 7)])])
def test_the_students_mapper_reads_only_the_maps_its_method_compares(method, expected, tiny_rpn_store, tiny_teacher,
                                                                     tmp_path):
    from detectron2.data import DatasetCatalog

    from pipeline.mapper import DistillDatasetMapper

    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_rpn_store["path"],
                           "DISTILL.DISTILL", method, "INPUT.RANDOM_FLIP", "none")
    item = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[0]
    features = DistillDatasetMapper(cfg, True)(dict(item))["teacher_features"]
    assert sorted(features) == sorted(expected)


def test_resuming_a_store_without_rpn_outputs_for_one_with_them_names_the_field(tmp_path):
    from dataclasses import replace

    from cache import StoreMismatchError, TeacherFeatureWriter

    layout = _rpn_layout("none")
    TeacherFeatureWriter.open(str(tmp_path / "s"), replace(layout, rpn_anchors=0), [1, 2], "toy", {"t": 1})
    with pytest.raises(StoreMismatchError, match="rpn_anchors"):
        TeacherFeatureWriter.open(str(tmp_path / "s"), layout, [1, 2], "toy", {"t": 1})


def test_kd_refuses_a_store_without_rpn_outputs_saying_how_to_build_one(tiny_store, tiny_teacher, tmp_path):
    from cache import StoreMismatchError
    from pipeline.stage_two import check_store

    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"], "DISTILL.DISTILL", "kd")
    with pytest.raises(StoreMismatchError, match="DISTILL.CACHE.RPN True"):
        check_store(cfg)


def test_the_live_teacher_returns_rpn_outputs_cropped_like_the_features(tiny_rpn_store, tiny_teacher):
    from cache import TeacherFeatureStore
    from pipeline.teacher import TeacherFeatureExtractor

    store = TeacherFeatureStore(tiny_rpn_store["path"])
    extractor = TeacherFeatureExtractor.from_config(tiny_rpn_store["cfg"], rpn=True)
    assert store.layout.rpn_anchors == extractor.rpn_anchors == 3
    image_id = int(store.image_ids[0])
    stored = store.read(image_id)
    h, w = store.sizes(image_id)["resized_hw"]
    assert set(stored) == set(store.layout.stored_keys)
    for key, x in stored.items():
        assert tuple(x.shape) == (store.layout.channels_of(key), *store.layout.valid_hw(key, (h, w)))


# --------------------------------------------------------------------------- in the student: optimizer, checkpoint, DDP


@pytest.mark.parametrize("method", ["correlation", "vid", "crd", "abound", "factor"])
def test_trainable_parts_are_in_the_students_optimizer_and_checkpoint(method, tiny_rpn_store, tiny_teacher, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer

    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_rpn_store["path"],
                           "DISTILL.DISTILL", method, fpn_channels=32)
    model = build_model(cfg)
    trainable = [p for p in model.distiller.parameters() if p.requires_grad]
    assert trainable, f"{method} has no trainable parts"
    in_optimizer = {id(p) for group in build_optimizer(cfg, model).param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in trainable)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("student")
    saved = torch.load(tmp_path / "student.pth", map_location="cpu", weights_only=False)["model"]
    for name, value in model.distiller.state_dict().items():
        assert torch.equal(saved[f"distiller.{name}"], value), name


def _crd_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial banks and heads everywhere, as DDP's initial broadcast gives
    loss = CRDLoss(4, 4, 1, num_images=6, dim=8, negatives=3).train()
    torch.manual_seed(10 + rank)  # each process sees other images and features
    features = torch.randn(2, 4, 3, 3)
    loss([features], [features.flip(1)], [torch.ones(2, 1, 3, 3, dtype=torch.bool)], rows=torch.tensor([2 * rank, 2 * rank + 1]))
    torch.save({"student": loss.student_bank.embeddings, "teacher": loss.teacher_bank.embeddings},
               f"{out_dir}/bank{rank}.pt")
    dist.destroy_process_group()


def test_crd_banks_stay_identical_across_ddp_processes_and_hold_every_processs_images(tmp_path):
    mp.spawn(_crd_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    banks = [torch.load(tmp_path / f"bank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    initial = CRDLoss(4, 4, 1, num_images=6, dim=8, negatives=3).student_bank.embeddings
    for name in ("student", "teacher"):
        assert torch.equal(banks[0][name], banks[1][name])
    moved = (banks[0]["student"] != initial).any(dim=1)
    assert moved.tolist() == [True, True, True, True, False, False]  # rows 0, 1 (rank 0) and 2, 3 (rank 1)


# --------------------------------------------------------------------------- init stage and training runs


@pytest.mark.parametrize("method", ["abound", "factor"])
def test_the_init_stage_lowers_its_loss_on_a_repeated_batch(method, tiny_rpn_store, tiny_teacher, tmp_path):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from pipeline.init_stage import init_stage_parameters, run_init_stage
    from pipeline.stage_two import StudentTrainer

    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_rpn_store["path"], "DISTILL.DISTILL", method)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    params = {id(p) for p in init_stage_parameters(model)}
    backbone = {id(p) for p in model.backbone.parameters()}
    assert (params >= backbone) == (method == "abound")  # only abound's stage trains the student
    batch = next(iter(StudentTrainer.build_train_loader(cfg)))
    with EventStorage(0):
        log = run_init_stage(model, itertools.repeat(batch), iterations=6, lr=0.01, clip_norm=5.0)
    assert log["iterations"] == 6 and log["last_loss"] < log["first_loss"], log
    if method == "factor":  # the paraphraser trained in the stage, and is frozen again for the main training
        assert not any(p.requires_grad for p in model.distiller.loss.paraphraser.parameters())


@pytest.mark.parametrize("method", NEW_METHODS)
def test_two_training_iterations_log_a_finite_loss_kd_and_run_the_init_stage(method, tiny_rpn_store, tiny_teacher,
                                                                              tmp_path):
    from detectron2.engine import default_argument_parser
    from pipeline.train_student import main

    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_rpn_store["path"],
                           "DISTILL.DISTILL", method, "SOLVER.MAX_ITER", 2, "DISTILL.INIT_ITERS", 2)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(cfg.dump())
    metrics = main(default_argument_parser().parse_args(["--config-file", str(cfg_file)]))
    out = Path(cfg.OUTPUT_DIR)
    logged = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    kd = [row["loss_kd"] for row in logged if "loss_kd" in row]
    assert kd and all(math.isfinite(v) for v in kd)
    if loss_class(method).init_stage:
        assert metrics["init_stage"]["iterations"] == 2 and math.isfinite(metrics["init_stage"]["last_loss"])
        assert "init stage of " + method in (out / "log.txt").read_text()
    else:
        assert metrics["init_stage"] is None

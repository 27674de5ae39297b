"""Specification of the two methods that split features by ground-truth boxes: fgd and defeat.

Values are recomputed here with explicit Python loops from the papers' definitions, with the
box cells of each level written out by hand. Then what detection needs: padding (even inf or
NaN there) never matters, an image without boxes is all background, a flipped image's boxes
reach the loss in the frame of the teacher's flipped view (through detectron2's mapper with
RANDOM_FLIP), the trainable parts train and are saved, and two iterations run from the store.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.stored_map import decode_maps

from pipeline.distiller import instance_boxes
from pipeline.losses import DEFAULT_WEIGHTS, METHODS, build_distill_loss, loss_class
from pipeline.losses.boxes import box_cells, fpn_level_of
from pipeline.losses.defeat import DeFeatLoss
from pipeline.losses.fgd import FGDLoss, GlobalContextBlock
from tests.conftest import make_student_cfg
from tests.pipeline.losses.test_losses import box_mask, fill_padding, seeded, valid_positions

BOX_METHODS = ("fgd", "defeat")
SIZES = {"student_channels": 4, "teacher_channels": 4, "num_levels": 2}
STRIDES = [4, 8]


def build(method: str, **kwargs):
    torch.manual_seed(0)
    return build_distill_loss(method, **SIZES, **kwargs)


def randomise(module: torch.nn.Module, seed: int = 3) -> None:
    """Every parameter drawn at random, so no term hides behind a zero initialisation."""
    g = seeded(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# Input 16 x 20 px (image 0) and 12 x 16 px (image 1, padded): level strides 4 and 8.
LEVEL_SHAPES = [(4, 5), (2, 3)]
LEVEL_VALID = [[(4, 5), (3, 4)], [(2, 3), (2, 2)]]
BOXES = [torch.tensor([[2.0, 3.0, 9.0, 8.0], [6.0, 1.0, 14.0, 15.0]]), torch.tensor([[8.0, 4.0, 16.0, 12.0]])]


def cells(rows, cols) -> set[tuple[int, int]]:
    return {(y, x) for y in rows for x in cols}


# The cells each box covers, worked out by hand: floor(x1 / s) <= column < ceil(x2 / s), rows likewise.
BOX_CELLS = {
    4: [[cells(range(0, 2), range(0, 3)),    # (2, 3, 9, 8):   cols 0.5..2.25 -> 0-2, rows 0.75..2 -> 0-1
         cells(range(0, 4), range(1, 4))],   # (6, 1, 14, 15): cols 1.5..3.5 -> 1-3, rows 0.25..3.75 -> 0-3
        [cells(range(1, 3), range(2, 4))]],  # (8, 4, 16, 12): cols 2..4 -> 2-3, rows 1..3 -> 1-2
    8: [[cells(range(0, 1), range(0, 2)),    # cols 0.25..1.125 -> 0-1, rows 0.375..1 -> 0
         cells(range(0, 2), range(0, 2))],   # cols 0.75..1.75 -> 0-1, rows 0.125..1.875 -> 0-1
        [cells(range(0, 2), range(1, 2))]],  # cols 1..2 -> 1, rows 0.5..1.5 -> 0-1
}


def batch(channels_student: int = 4, channels_teacher: int = 4, seed: int = 0):
    g = seeded(seed)
    students = [torch.randn(2, channels_student, h, w, generator=g) for h, w in LEVEL_SHAPES]
    teachers = [torch.randn(2, channels_teacher, h, w, generator=g) * 2 for h, w in LEVEL_SHAPES]
    masks = [box_mask(2, h, w, valid) for (h, w), valid in zip(LEVEL_SHAPES, LEVEL_VALID)]
    return students, teachers, masks


def score(loss, students, teachers, masks, boxes=BOXES, strides=STRIDES):
    return loss(students, teachers, masks, boxes=boxes, strides=strides)


# --------------------------------------------------------------------------- registry and boxes


def test_both_methods_are_registered_take_boxes_and_carry_a_default_weight():
    assert set(BOX_METHODS) <= set(METHODS) and set(DEFAULT_WEIGHTS) == set(METHODS)
    for name, cls in (("fgd", FGDLoss), ("defeat", DeFeatLoss)):
        assert loss_class(name) is cls and cls.method == name and cls.needs_boxes and cls.__doc__
    assert DEFAULT_WEIGHTS["fgd"] == 5.0 and DEFAULT_WEIGHTS["defeat"] == 1.0
    assert not any(loss_class(m).needs_boxes for m in METHODS if m not in BOX_METHODS)


def test_the_makefile_sweeps_both():
    makefile = (Path(__file__).resolve().parents[3] / "Makefile").read_text()
    methods_line = next(line for line in makefile.splitlines() if line.startswith("METHODS ?="))
    assert {"fgd", "defeat"} <= set(methods_line.split()[2:])


def test_a_box_covers_every_cell_it_overlaps_at_each_levels_stride():
    for stride, per_image in BOX_CELLS.items():
        for image_boxes, expected in zip(BOXES, per_image):
            got = box_cells(image_boxes, stride, (4, 5))
            for box, want in zip(got, expected):
                assert {(y, x) for y in range(4) for x in range(5) if box[y, x]} == want


def test_a_box_within_one_cell_covers_that_cell():
    assert box_cells(torch.tensor([[5.0, 5.0, 6.0, 7.0]]), 4, (3, 3))[0].nonzero().tolist() == [[1, 1]]


def test_the_mirrored_box_covers_the_mirrored_cells():
    width = 32  # a multiple of both strides, so cells mirror exactly
    box = torch.tensor([[3.3, 2.0, 17.9, 9.5]])
    mirrored = torch.tensor([[width - 17.9, 2.0, width - 3.3, 9.5]])
    for stride in (4, 8):
        shape = (4, width // stride)
        assert torch.equal(box_cells(mirrored, stride, shape), box_cells(box, stride, shape).flip(-1))


def test_boxes_go_to_fpn_levels_by_size_clamped_to_the_distilled_levels():
    # sqrt(w h): 50 -> k 2, 111 -> 2, 112 -> 3, 300 -> 4, 500 -> 5, 1000 -> 6 (k = floor(4 + log2(side / 224))).
    sides = [50.0, 111.0, 112.0, 300.0, 500.0, 1000.0]
    boxes = torch.tensor([[0.0, 0.0, s, s] for s in sides])
    assert fpn_level_of(boxes, [4, 8, 16, 32, 64]).tolist() == [0, 0, 1, 2, 3, 4]
    assert fpn_level_of(boxes, [8, 16, 32]).tolist() == [0, 0, 0, 1, 2, 2]


# --------------------------------------------------------------------------- fgd by hand


def reference_gcblock(block: GlobalContextBlock, f, b: int, positions) -> dict:
    """GcBlock by loops: context = sum_p softmax_p(W_k f_p + b_k) f_p; add = W2 relu(LN(W1 context + b1)) + b2."""
    channels = f.shape[1]
    wk, bk = block.context_logits.weight.flatten().tolist(), block.context_logits.bias.item()
    logits = {p: sum(wk[c] * f[b, c, p[0], p[1]].item() for c in range(channels)) + bk for p in positions}
    z = sum(math.exp(v) for v in logits.values())
    context = [sum(math.exp(logits[p]) / z * f[b, c, p[0], p[1]].item() for p in positions) for c in range(channels)]
    conv1, norm, conv2 = block.transform[0], block.transform[1], block.transform[3]
    w1, b1 = conv1.weight.flatten(1).tolist(), conv1.bias.tolist()
    hidden = [sum(w1[o][c] * context[c] for c in range(channels)) + b1[o] for o in range(len(b1))]
    mean = sum(hidden) / len(hidden)
    var = sum((h - mean) ** 2 for h in hidden) / len(hidden)
    gain, shift = norm.weight.flatten().tolist(), norm.bias.flatten().tolist()
    hidden = [max(0.0, (h - mean) / math.sqrt(var + norm.eps) * gain[o] + shift[o]) for o, h in enumerate(hidden)]
    w2, b2 = conv2.weight.flatten(1).tolist(), conv2.bias.tolist()
    add = [sum(w2[c][o] * hidden[o] for o in range(len(hidden))) + b2[c] for c in range(channels)]
    return {(c, p): f[b, c, p[0], p[1]].item() + add[c] for c in range(channels) for p in positions}


def reference_fgd_level(loss: FGDLoss, level: int, s, t, mask, box_cells_per_image, temperature: float) -> dict:
    """FGD's four terms of one level, image by image over its valid positions (Yang et al. 2022, Eq. 1-10)."""
    batch, channels = s.shape[:2]
    terms = {"foreground": 0.0, "background": 0.0, "attention": 0.0, "global": 0.0}
    for b in range(batch):
        positions = valid_positions(mask, b)
        n = len(positions)

        def attention(f):
            g = {p: sum(abs(f[b, c, p[0], p[1]].item()) for c in range(channels)) / channels for p in positions}
            z = sum(math.exp(v / temperature) for v in g.values())
            spatial = {p: n * math.exp(g[p] / temperature) / z for p in positions}
            gc = [sum(abs(f[b, c, p[0], p[1]].item()) for p in positions) / n for c in range(channels)]
            zc = sum(math.exp(v / temperature) for v in gc)
            return spatial, [channels * math.exp(v / temperature) / zc for v in gc]

        spatial_t, channel_t = attention(t)
        spatial_s, channel_s = attention(s)
        scale = {}
        for box in box_cells_per_image[b]:
            for p in box:
                scale[p] = max(scale.get(p, 0.0), 1.0 / len(box))
        background = [p for p in positions if p not in scale]
        for p in positions:
            weight_p = scale[p] if p in scale else 1.0 / len(background)
            for c in range(channels):
                error = (s[b, c, p[0], p[1]].item() - t[b, c, p[0], p[1]].item()) ** 2
                terms["foreground" if p in scale else "background"] += weight_p * spatial_t[p] * channel_t[c] * error
        terms["attention"] += sum(abs(a - b_) for a, b_ in zip(channel_s, channel_t))
        terms["attention"] += sum(abs(spatial_s[p] - spatial_t[p]) for p in positions)
        r_s = reference_gcblock(loss.student_context[level], s, b, positions)
        r_t = reference_gcblock(loss.teacher_context[level], t, b, positions)
        terms["global"] += sum((r_s[k] - r_t[k]) ** 2 for k in r_s)
    return {k: v / batch for k, v in terms.items()}


def test_fgd_value_by_hand():
    s, t, m = batch()
    loss = build("fgd")
    randomise(loss)
    per_level = []
    for level, stride in enumerate(STRIDES):
        ref = reference_fgd_level(loss, level, s[level], t[level], m[level], BOX_CELLS[stride], 0.5)
        got = loss.level_terms(level, s[level], t[level], m[level], BOXES, stride)
        for name, value in ref.items():
            assert got[name].item() == pytest.approx(value, rel=1e-5), (level, name)
        per_level.append(5e-5 * ref["foreground"] + 2.5e-5 * ref["background"] + 5e-5 * ref["attention"]
                         + 5e-7 * ref["global"])
    assert score(loss, s, t, m).item() == pytest.approx(sum(per_level) / 2, rel=1e-5)


def test_fgd_global_blocks_start_as_identity_so_the_global_term_starts_as_the_squared_error():
    s, t, m = batch()
    terms = build("fgd").level_terms(0, s[0], t[0], m[0], BOXES, 4)
    expected = sum((s[0][b, c, y, x].item() - t[0][b, c, y, x].item()) ** 2
                   for b in range(2) for c in range(4) for y, x in valid_positions(m[0], b)) / 2
    assert terms["global"].item() == pytest.approx(expected, rel=1e-5)


def test_fgd_uses_the_papers_temperature_and_weights_for_two_stage_detectors():
    loss = build("fgd")
    assert (loss.temperature, loss.alpha, loss.beta, loss.gamma, loss.lambda_) == (0.5, 5e-5, 2.5e-5, 5e-5, 5e-7)


def test_fgd_refuses_different_widths_naming_the_connector():
    s, t, m = batch(channels_student=3)
    with pytest.raises(ValueError, match="student 3 and teacher 4.*connectors"):
        score(build("fgd"), s, t, m)


# --------------------------------------------------------------------------- defeat by hand


def reference_conv3x3(conv: torch.nn.Conv2d, f, mask, b: int) -> dict:
    """A 3x3 'same' convolution by loops over the image's valid positions, padding and borders read as 0."""
    _, channels, height, width = f.shape
    w, bias = conv.weight, conv.bias
    out = {}
    for y, x in valid_positions(mask, b):
        for o in range(w.shape[0]):
            total = bias[o].item()
            for i in range(channels):
                for dy in range(3):
                    for dx in range(3):
                        yy, xx = y + dy - 1, x + dx - 1
                        if 0 <= yy < height and 0 <= xx < width and mask[b, 0, yy, xx]:
                            total += w[o, i, dy, dx].item() * f[b, i, yy, xx].item()
            out[(o, y, x)] = total
    return out


def test_defeat_value_by_hand_with_boxes_assigned_to_levels_by_size():
    # 128 x 128 px image 0 with a small box (side 24 -> p2) and a large one (side 120 -> p3); image 1,
    # 96 x 80 px and padded, has no boxes, so all its valid cells are background.
    g = seeded(4)
    shapes, valid = [(32, 32), (16, 16)], [[(32, 32), (24, 20)], [(16, 16), (12, 10)]]
    s = [torch.randn(2, 2, h, w, generator=g) for h, w in shapes]
    t = [torch.randn(2, 3, h, w, generator=g) for h, w in shapes]  # widths differ: the adapter maps 2 -> 3
    m = [box_mask(2, h, w, v) for (h, w), v in zip(shapes, valid)]
    boxes = [torch.tensor([[8.0, 12.0, 40.0, 30.0], [0.0, 4.0, 120.0, 124.0]]), torch.zeros(0, 4)]
    objects = {0: [cells(range(3, 8), range(2, 10)), set()],   # small box at stride 4: rows 3-7, cols 2-9
               1: [cells(range(0, 16), range(0, 15)), set()]}  # large box at stride 8: rows 0-15, cols 0-14
    loss = build_distill_loss("defeat", student_channels=2, teacher_channels=3, num_levels=2)
    randomise(loss)
    per_level = []
    for level in range(2):
        sums = {"fg": 0.0, "bg": 0.0}
        counts = {"fg": 0, "bg": 0}
        for b in range(2):
            adapted = reference_conv3x3(loss.adapters[level], s[level], m[level], b)
            for y, x in valid_positions(m[level], b):
                region = "fg" if (y, x) in objects[level][b] else "bg"
                counts[region] += 3
                sums[region] += sum((adapted[(o, y, x)] - t[level][b, o, y, x].item()) ** 2 for o in range(3))
        fg, bg = sums["fg"] / max(1, 2 * counts["fg"]), sums["bg"] / (2 * counts["bg"])
        terms = loss.level_terms(level, s[level], t[level], m[level],
                                 torch.tensor([[[[(y, x) in objects[level][b] for x in range(shapes[level][1])]
                                                 for y in range(shapes[level][0])]] for b in range(2)]))
        assert terms["foreground"].item() == pytest.approx(fg, rel=1e-5)
        assert terms["background"].item() == pytest.approx(bg, rel=1e-5)
        per_level.append(3.0 * fg + 12.0 * bg)
    assert loss(s, t, m, boxes=boxes, strides=STRIDES).item() == pytest.approx(sum(per_level) / 2, rel=1e-5)


def objects_at(level: int, mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) bool: the hand-derived cells of BOXES at STRIDES[level], within the mask."""
    objects = torch.zeros_like(mask)
    for b, per_box in enumerate(BOX_CELLS[STRIDES[level]]):
        for y, x in set().union(*per_box):
            objects[b, 0, y, x] = bool(mask[b, 0, y, x])
    return objects


def test_defeat_puts_each_box_on_its_fpn_level_or_with_assign_levels_false_on_every_level():
    s, t, m = batch()
    assigned, everywhere = build("defeat"), build("defeat", assign_levels=False)  # same seed: same adapters

    def expected(loss, objects):
        terms = [loss.level_terms(level, s[level], t[level], m[level], objects[level]) for level in range(2)]
        return sum(3.0 * x["foreground"] + 12.0 * x["background"] for x in terms).item() / 2

    # Every box of BOXES is smaller than 112 px (FPN level 2), so assigned, p3 holds no objects.
    hand = [objects_at(0, m[0]), objects_at(1, m[1])]
    assert score(assigned, s, t, m).item() == pytest.approx(expected(assigned, [hand[0], torch.zeros_like(hand[1])]),
                                                            rel=1e-6)
    assert score(everywhere, s, t, m).item() == pytest.approx(expected(everywhere, hand), rel=1e-6)
    assert score(assigned, s, t, m).item() != pytest.approx(score(everywhere, s, t, m).item(), rel=1e-3)


def test_defeat_adapter_starts_near_zero_as_its_code():
    loss = build("defeat")
    for adapter in loss.adapters:
        assert adapter.kernel_size == (3, 3) and adapter.weight.abs().max() < 2e-4
    assert (loss.fg_weight, loss.bg_weight) == (3.0, 12.0)


# --------------------------------------------------------------------------- properties of both


@pytest.mark.parametrize("method", BOX_METHODS)
def test_padding_content_even_inf_or_nan_does_not_change_the_loss_or_its_gradient(method):
    s, t, m = batch()
    loss = build(method)
    randomise(loss)
    clean_s = [f.clone().requires_grad_() for f in s]
    clean = score(loss, clean_s, t, m)
    clean.backward()
    for value in (1e30, float("inf"), float("nan")):
        noisy_s = [fill_padding(f, mask, value).requires_grad_() for f, mask in zip(s, m)]
        noisy = score(loss, noisy_s, [fill_padding(f, mask, value) for f, mask in zip(t, m)], m)
        noisy.backward()
        assert noisy.item() == pytest.approx(clean.item(), rel=1e-6), value
        for a, b, mask in zip(noisy_s, clean_s, m):
            assert torch.isfinite(a.grad).all() and (a.grad[~mask.expand_as(a)] == 0).all()
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("method", BOX_METHODS)
def test_padded_image_scores_like_the_image_cropped_to_its_valid_region(method):
    s, t, m = batch()
    loss = build(method)
    randomise(loss)
    one = slice(1, 2)
    padded = score(loss, [f[one] for f in s], [f[one] for f in t], [mask[one] for mask in m], boxes=BOXES[1:])
    crops = [valid[1] for valid in LEVEL_VALID]
    cropped = score(loss, [f[one, :, :h, :w] for f, (h, w) in zip(s, crops)],
                    [f[one, :, :h, :w] for f, (h, w) in zip(t, crops)],
                    [mask[one, :, :h, :w] for mask, (h, w) in zip(m, crops)], boxes=BOXES[1:])
    assert padded.item() == pytest.approx(cropped.item(), rel=1e-6)


def test_fgd_image_without_boxes_is_all_background_weighted_by_its_valid_cells():
    s, t, m = batch()
    loss = build("fgd")
    no_boxes = [torch.zeros(0, 4), torch.zeros(0, 4)]
    for level, stride in enumerate(STRIDES):
        terms = loss.level_terms(level, s[level], t[level], m[level], no_boxes, stride)
        ref = reference_fgd_level(loss, level, s[level], t[level], m[level], [[], []], 0.5)
        assert terms["foreground"].item() == 0.0
        assert terms["background"].item() == pytest.approx(ref["background"], rel=1e-5)
    # Boxes change only the image that has them: image 1's terms are the same with or without image 0's boxes.
    with_one = loss.level_terms(0, s[0], t[0], m[0], [BOXES[0], torch.zeros(0, 4)], 4)
    alone = loss.level_terms(0, s[0][:1], t[0][:1], m[0][:1], [BOXES[0]], 4)
    image1 = loss.level_terms(0, s[0][1:], t[0][1:], m[0][1:], [torch.zeros(0, 4)], 4)
    for name in ("foreground", "background"):
        assert with_one[name].item() == pytest.approx((alone[name] + image1[name]).item() / 2, rel=1e-6)


def test_defeat_image_without_boxes_has_no_foreground_term_and_all_valid_cells_as_background():
    s, t, m = batch()
    loss = build("defeat")
    randomise(loss)
    no_boxes = [torch.zeros(0, 4), torch.zeros(0, 4)]
    got = score(loss, s, t, m, boxes=no_boxes)
    expected = [12.0 * loss.level_terms(level, s[level], t[level], m[level], torch.zeros_like(m[level]))["background"]
                for level in range(2)]
    assert got.item() == pytest.approx(sum(v.item() for v in expected) / 2, rel=1e-6)
    terms = loss.level_terms(0, s[0], t[0], m[0], torch.zeros_like(m[0]))
    assert terms["foreground"].item() == 0.0 and terms["background"].item() > 0


@pytest.mark.parametrize("method", BOX_METHODS)
def test_mirrored_maps_with_mirrored_boxes_give_the_same_loss(method):
    # Widths 32 and 16 cells at strides 4 and 8 (128 px): cells mirror exactly. DeFeat's 3x3 adapter
    # is made mirror-symmetric so that the loss itself has no preferred side.
    g = seeded(5)
    shapes = [(6, 32), (3, 16)]
    s = [torch.randn(1, 4, h, w, generator=g) for h, w in shapes]
    t = [torch.randn(1, 4, h, w, generator=g) for h, w in shapes]
    m = [torch.ones(1, 1, h, w, dtype=torch.bool) for h, w in shapes]
    boxes = [torch.tensor([[3.3, 2.0, 17.9, 9.5], [50.5, 0.0, 127.0, 23.0]])]
    mirrored = [torch.stack([128 - boxes[0][:, 2], boxes[0][:, 1], 128 - boxes[0][:, 0], boxes[0][:, 3]], dim=1)]
    loss = build(method)
    randomise(loss)
    if method == "defeat":
        with torch.no_grad():
            for adapter in loss.adapters:
                adapter.weight.copy_((adapter.weight + adapter.weight.flip(-1)) / 2)
    flipped = score(loss, [f.flip(-1) for f in s], [f.flip(-1) for f in t], m, boxes=mirrored)
    assert flipped.item() == pytest.approx(score(loss, s, t, m, boxes=boxes).item(), rel=1e-6)
    # The boxes matter: unmirrored boxes on the mirrored maps give another value.
    assert score(loss, [f.flip(-1) for f in s], [f.flip(-1) for f in t], m, boxes=boxes).item() != \
        pytest.approx(flipped.item(), rel=1e-3)


@pytest.mark.parametrize("method", BOX_METHODS)
def test_half_precision_inputs_give_a_float32_loss(method):
    s, t, m = batch()
    loss = build(method)
    half = score(loss, [f.half() for f in s], [f.half() for f in t], m)
    assert half.dtype == torch.float32
    full = score(loss, [f.half().float() for f in s], [f.half().float() for f in t], m)
    assert half.item() == pytest.approx(full.item(), rel=1e-6)


@pytest.mark.parametrize("method", BOX_METHODS)
def test_a_loss_without_boxes_or_strides_says_what_it_needs(method):
    s, t, m = batch()
    with pytest.raises(ValueError, match="ground-truth boxes, one .* per image"):
        build(method)(s, t, m)
    with pytest.raises(ValueError, match="stride"):
        build(method)(s, t, m, boxes=BOXES, strides=[4])


# --------------------------------------------------------------------------- in the student, from the store


def _mapped_views(cfg, image_id: int) -> dict:
    """The mapper's output for one image, flipped and unflipped (RANDOM_FLIP draws until both came)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data import transforms as T
    from pipeline.mapper import DistillDatasetMapper

    mapper = DistillDatasetMapper(cfg, True)
    record = next(d for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0]) if d["image_id"] == image_id)
    np.random.seed(0)
    views = {}
    for _ in range(40):
        out = mapper(copy.deepcopy(record))
        views.setdefault(any(isinstance(t, T.HFlipTransform) for t in mapper.augmentations.last.transforms), out)
        if len(views) == 2:
            return {"flipped": views[True], "unflipped": views[False], "record": record}
    raise AssertionError("RANDOM_FLIP gave only one view in 40 draws")


def _annotation_boxes(record: dict, resized_hw: tuple[int, int], flipped: bool) -> torch.Tensor:
    """The record's boxes resized to resized_hw, mirrored when flipped: computed from the annotations alone."""
    from detectron2.structures import BoxMode

    h, w = resized_hw
    sx, sy = w / record["width"], h / record["height"]
    out = []
    for a in record["annotations"]:
        x1, y1, x2, y2 = BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
        x1, x2 = x1 * sx, x2 * sx
        if flipped:
            x1, x2 = w - x2, w - x1
        out.append([x1, y1 * sy, x2, y2 * sy])
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("method", BOX_METHODS)
def test_a_flipped_images_boxes_reach_the_loss_in_the_frame_of_its_flipped_teacher_view(method, tiny_store,
                                                                                         tiny_teacher, tmp_path):
    from cache import TeacherFeatureStore
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from pipeline.teacher import TeacherFeatureExtractor
    from pipeline.teacher_source import LiveTeacher

    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"], "DISTILL.DISTILL", method)
    assert cfg.INPUT.RANDOM_FLIP == "horizontal"
    store = TeacherFeatureStore(tiny_store["path"])
    image_id = int(store.image_ids[0])
    views = _mapped_views(cfg, image_id)
    flipped, unflipped = views["flipped"], views["unflipped"]
    hw = tuple(flipped["image"].shape[-2:])
    assert torch.equal(flipped["image"], unflipped["image"].flip(-1))

    # The mapper's boxes are the annotations resized and, for the flipped sample, mirrored.
    for view, is_flipped in ((flipped, True), (unflipped, False)):
        expected = _annotation_boxes(views["record"], hw, is_flipped)
        torch.testing.assert_close(view["instances"].gt_boxes.tensor, expected)
    # The flipped sample's teacher maps are the store's hflip view, which is the teacher run on that flipped image.
    stored = store.read(image_id, flip=True)
    live = LiveTeacher(TeacherFeatureExtractor.from_config(cfg), cfg.INPUT.FORMAT)([flipped], torch.device("cpu"))[0]
    for level in cfg.DISTILL.LEVELS:
        assert torch.equal(decode_maps(flipped["teacher_features"])[level], stored[level])  # codes cross, decoded here
        assert (stored[level].float() - live[level]).abs().max() <= 1e-3 * live[level].abs().max()

    # What the loss receives in a training step: those boxes, and those maps, in one frame.
    torch.manual_seed(0)
    model = build_model(cfg).train()
    seen = {}
    model.distiller.loss.register_forward_pre_hook(lambda module, args, kwargs: seen.update(args=args, kwargs=kwargs),
                                                   with_kwargs=True)
    with EventStorage(0):
        model([flipped, unflipped])
    _, teachers, masks = seen["args"]
    torch.testing.assert_close(seen["kwargs"]["boxes"][0], _annotation_boxes(views["record"], hw, True))
    torch.testing.assert_close(seen["kwargs"]["boxes"][1], _annotation_boxes(views["record"], hw, False))
    assert seen["kwargs"]["strides"] == [4, 8, 16, 32, 64]
    for level, teacher, mask in zip(cfg.DISTILL.LEVELS, teachers, masks):
        h, w = stored[level].shape[-2:]
        assert torch.equal(teacher[0, :, :h, :w], stored[level].float()) and mask[0, 0, :h, :w].all()


def test_the_distiller_refuses_an_input_without_instances_and_accepts_one_with_none(student_cfg):
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances

    model = build_model(student_cfg("DISTILL.DISTILL", "fgd"))
    features = {lvl: torch.randn(1, 64, math.ceil(32 / 2 ** int(lvl[1:])), math.ceil(32 / 2 ** int(lvl[1:])))
                for lvl in model.distiller.levels}
    teacher = [{lvl: f[0].clone() for lvl, f in features.items()}]
    empty = Instances((32, 32), gt_boxes=Boxes(torch.zeros(0, 4)))
    boxes = instance_boxes([{"image": torch.zeros(3, 32, 32), "instances": empty}])
    assert torch.isfinite(model.distiller(features, teacher, [(32, 32)], boxes=boxes))
    with pytest.raises(ValueError, match=r"input\(s\) \[0\] of the batch came without instances"):
        model.distiller(features, teacher, [(32, 32)], boxes=instance_boxes([{"image": torch.zeros(3, 32, 32)}]))


@pytest.mark.parametrize("method", BOX_METHODS)
def test_trainable_parts_are_in_the_students_optimizer_and_checkpoint(method, tiny_store, tiny_teacher, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer

    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"],
                           "DISTILL.DISTILL", method, fpn_channels=32)
    model = build_model(cfg)
    parts = model.distiller.loss.student_context if method == "fgd" else model.distiller.loss.adapters
    assert len(parts) == len(cfg.DISTILL.LEVELS)
    trainable = [p for p in model.distiller.parameters() if p.requires_grad]
    assert {id(p) for p in parts.parameters()} <= {id(p) for p in trainable}
    in_optimizer = {id(p) for group in build_optimizer(cfg, model).param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in trainable)
    assert bool(model.distiller.connectors) == (method == "fgd")  # defeat's adapters map the width themselves
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("student")
    saved = torch.load(tmp_path / "student.pth", map_location="cpu", weights_only=False)["model"]
    for name, value in model.distiller.state_dict().items():
        assert torch.equal(saved[f"distiller.{name}"], value), name


@pytest.mark.parametrize("method", BOX_METHODS)
def test_two_training_iterations_from_the_store_log_a_finite_loss_kd(method, tiny_store, tiny_teacher, tmp_path):
    from detectron2.engine import default_argument_parser
    from pipeline.train_student import main

    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"],
                           "DISTILL.DISTILL", method, "SOLVER.MAX_ITER", 2)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(cfg.dump())
    main(default_argument_parser().parse_args(["--config-file", str(cfg_file)]))
    logged = [json.loads(line) for line in (Path(cfg.OUTPUT_DIR) / "metrics.json").read_text().splitlines()]
    kd = [row["loss_kd"] for row in logged if "loss_kd" in row]
    assert kd and all(math.isfinite(v) and v > 0 for v in kd)

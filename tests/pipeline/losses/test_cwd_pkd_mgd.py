"""Specification of the detection-distillation methods that need no ground-truth boxes: cwd, pkd and mgd.

Each method's value on tiny tensors is worked out by hand (mgd's generator set to known weights),
then each is held to what detection needs: whatever the padding holds (even inf or NaN) the value
does not change and the gradient is finite and zero there, a padded image scores like its crop,
and the method builds through the registry and the Distiller and trains from a tiny store. mgd's
random masks are checked for their rate and for depending only on (seed, step, row, level).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.losses import DEFAULT_WEIGHTS, METHODS, build_distill_loss, loss_class
from pipeline.losses.cwd import ChannelWiseDivergenceLoss
from pipeline.losses.mgd import MGDLoss, mixed_seed
from pipeline.losses.pkd import PKDLoss
from tests.conftest import REPO, make_student_cfg
from tests.pipeline.losses.test_losses import LEVEL_VALID, box_mask, fill_padding, two_level_batch

OURS = ("cwd", "pkd", "mgd")
SIZES = {"student_channels": 4, "teacher_channels": 4, "num_levels": 2, "num_images": 5}
CLASSES = {"cwd": ChannelWiseDivergenceLoss, "pkd": PKDLoss, "mgd": MGDLoss}


def build(method: str, device="cpu", **kwargs):
    torch.manual_seed(0)
    return build_distill_loss(method, **SIZES, **kwargs).to(device)


def score(loss, students, teachers, masks, rows=(3, 1)):
    """The loss, with the images' store rows (on the students' device) for the methods that take them (mgd)."""
    rows = torch.tensor(rows[: students[0].shape[0]], device=students[0].device)
    extra = {"rows": rows} if loss.needs_image_index else {}
    return loss(students, teachers, masks, **extra)


def one_map(*values, shape=None) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(shape or (1, 1, 1, len(values)))


def set_identity(conv: torch.nn.Conv2d) -> None:
    """A 3x3 conv that passes each channel through: centre tap 1, all else 0."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = torch.eye(conv.out_channels, conv.in_channels)
        conv.bias.zero_()


def with_padding(features: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(mask, features, torch.full_like(features, value))


# --------------------------------------------------------------------------- registry, weights, sizes


def test_cwd_pkd_and_mgd_are_registered_with_a_default_weight_and_a_docstring():
    for name in OURS:
        assert name in METHODS and loss_class(name) is CLASSES[name]
        assert loss_class(name).method == name and loss_class(name).__doc__
        assert DEFAULT_WEIGHTS[name] == loss_class(name).default_weight > 0
        assert isinstance(build(name), CLASSES[name])


def test_the_makefile_sweeps_the_three():
    methods_line = next(line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith("METHODS ?="))
    assert set(OURS) <= set(methods_line.split()[2:])


def test_only_mgd_has_trainable_parts_sized_by_the_teacher_width_and_the_levels():
    assert build("cwd").state_dict() == {} and build("pkd").state_dict() == {}
    mgd = build("mgd")
    assert len(mgd.generations) == 2 and mgd.generations[0].conv1.in_channels == 4
    with pytest.raises(ValueError, match="num_levels"):
        build_distill_loss("mgd", teacher_channels=4)


@pytest.mark.parametrize("method", OURS)
def test_different_widths_are_refused_naming_the_connector(method):
    s, t, m = two_level_batch(channels_student=3)
    with pytest.raises(ValueError, match="student 3 and teacher 4; put a 1x1 connector"):
        score(build(method), s, t, m)


def test_bad_hyper_parameters_are_refused_with_the_value():
    with pytest.raises(ValueError, match="positive temperature.*got 0"):
        ChannelWiseDivergenceLoss(temperature=0)
    with pytest.raises(ValueError, match=">= 0, got -1"):
        PKDLoss(eps=-1)
    with pytest.raises(ValueError, match=r"\[0, 1\].*got 1.5"):
        MGDLoss(4, 1, masked_ratio=1.5)


# --------------------------------------------------------------------------- cwd by hand


def test_cwd_is_t_squared_times_the_kl_of_spatial_softmaxes_over_valid_positions_per_channel():
    # One image, 2 channels, 3 positions of which the last is padding (holding inf).
    mask = torch.tensor([True, True, False]).reshape(1, 1, 1, 3)
    t = 2.0
    teacher = torch.tensor([[2 * math.log(3.0), 0.0, float("inf")], [1.0, 1.0, float("inf")]]).reshape(1, 2, 1, 3)
    student = torch.tensor([[0.0, 0.0, float("inf")], [7.0, 7.0, -float("inf")]]).reshape(1, 2, 1, 3)
    # Channel 0: softmax(t / 2) = (0.75, 0.25) against (0.5, 0.5); channel 1 agrees (KL 0).
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    value = ChannelWiseDivergenceLoss(temperature=t)([student], [teacher], [mask])
    assert value.item() == pytest.approx(t * t * kl / 2, rel=1e-6)  # mean over the 2 channels


def test_cwd_averages_over_images_and_ignores_constant_offsets_per_channel():
    mask = torch.ones(2, 1, 1, 2, dtype=torch.bool)
    teacher = torch.tensor([[[[math.log(3.0), 0.0]]], [[[0.0, 0.0]]]])
    student = torch.tensor([[[[5.0, 5.0]]], [[[-2.0, -2.0 + math.log(3.0)]]]])  # softmax is shift-invariant
    kl_a = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # (0.75, 0.25) against (0.5, 0.5)
    kl_b = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # (0.5, 0.5) against (0.25, 0.75)
    value = ChannelWiseDivergenceLoss()([student], [teacher], [mask])
    assert value.item() == pytest.approx((kl_a + kl_b) / 2, rel=1e-6)


# --------------------------------------------------------------------------- pkd by hand


def test_pkd_is_one_minus_pearson_r_per_channel_with_eps_on_the_variance():
    # One image, 2 channels, 3 valid positions and a padded one holding NaN.
    mask = torch.tensor([True, True, True, False]).reshape(1, 1, 1, 4)
    nan = float("nan")
    student = torch.tensor([[1.0, 2.0, 3.0, nan], [1.0, 2.0, 3.0, nan]]).reshape(1, 2, 1, 4)
    teacher = torch.tensor([[10.0, 30.0, 20.0, nan], [3.0, 2.0, 1.0, nan]]).reshape(1, 2, 1, 4)
    eps = 1e-6

    def half_mse_of_standardised(s, t):
        mean_s, mean_t = sum(s) / 3, sum(t) / 3
        var_s = sum((x - mean_s) ** 2 for x in s) / 3
        var_t = sum((x - mean_t) ** 2 for x in t) / 3
        zs = [(x - mean_s) / math.sqrt(var_s + eps) for x in s]
        zt = [(x - mean_t) / math.sqrt(var_t + eps) for x in t]
        return sum((a - b) ** 2 for a, b in zip(zs, zt)) / 3 / 2

    # r = 0.5 (channel 0, teacher 10x the scale) and r = -1 (channel 1): 1 - r = 0.5 and 2.
    expected = (half_mse_of_standardised([1, 2, 3], [10, 30, 20]) + half_mse_of_standardised([1, 2, 3], [3, 2, 1])) / 2
    assert expected == pytest.approx((0.5 + 2.0) / 2, rel=1e-5)
    assert PKDLoss(eps=eps)([student], [teacher], [mask]).item() == pytest.approx(expected, rel=1e-6)


def test_pkd_ignores_the_teachers_scale_and_offset_and_averages_over_images():
    s, t, m = two_level_batch()
    loss = PKDLoss()
    assert loss(s, [100 * f + 7 for f in t], m).item() == pytest.approx(loss(s, t, m).item(), rel=1e-5)
    per_image = [loss([f[b:b + 1] for f in s], [f[b:b + 1] for f in t], [x[b:b + 1] for x in m]) for b in range(2)]
    assert loss(s, t, m).item() == pytest.approx(sum(v.item() for v in per_image) / 2, rel=1e-6)


def test_pkd_stays_finite_on_a_constant_channel():
    mask = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    student = one_map(2.0, 2.0, 2.0).requires_grad_()
    value = PKDLoss()([student], [one_map(1.0, 2.0, 3.0)], [mask])
    value.backward()
    # The constant channel standardises to 0, the teacher's to unit variance (less eps): (0 + 1) / 2.
    assert value.item() == pytest.approx(0.5 * (2 / 3) / (2 / 3 + 1e-6), rel=1e-6)
    assert torch.isfinite(student.grad).all()


# --------------------------------------------------------------------------- mgd by hand


def mgd_with_known_generator(first: str = "identity", masked_ratio: float = 0.0) -> MGDLoss:
    """One channel, one level; conv1 identity or a 3x3 box sum, conv2 identity."""
    loss = MGDLoss(1, 1, masked_ratio=masked_ratio)
    set_identity(loss.generations[0].conv2)
    set_identity(loss.generations[0].conv1)
    if first == "box":
        with torch.no_grad():
            loss.generations[0].conv1.weight.fill_(1.0)
    return loss


def test_mgd_without_masking_and_an_identity_generator_is_the_masked_mse():
    mask = torch.tensor([True, True, False]).reshape(1, 1, 1, 3)
    value = mgd_with_known_generator()([one_map(1.0, 2.0, 99.0)], [one_map(3.0, 2.0, -99.0)], [mask],
                                       rows=torch.tensor([0]))
    assert value.item() == pytest.approx((2.0 ** 2 + 0.0) / 2)


def test_mgd_generator_sees_zeros_not_padding_beyond_the_image_border():
    # conv1 sums each 3x3 neighbourhood: positions 0 and 1 both see 1 + 2 (the padded 1e6 is zeroed first).
    mask = torch.tensor([True, True, False]).reshape(1, 1, 1, 3)
    value = mgd_with_known_generator("box")([one_map(1.0, 2.0, 1e6)], [one_map(3.0, 5.0, 0.0)], [mask],
                                            rows=torch.tensor([0]))
    assert value.item() == pytest.approx(((3 - 3) ** 2 + (5 - 3) ** 2) / 2)


def test_mgd_drops_the_masked_student_positions_before_generating():
    loss = mgd_with_known_generator(masked_ratio=0.5)
    mask = box_mask(1, 4, 4, [(3, 4)])
    student = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)  # positive: the identity generator's ReLU passes it
    teacher = torch.full((1, 1, 4, 4), 4.0)
    keep = loss.keep_masks(torch.tensor([2]), mask, 0)
    assert 0 < keep.sum() < mask.sum()  # this draw keeps some valid positions and drops others
    errors = [(4.0 - (student[0, 0, y, x].item() if keep[0, 0, y, x] else 0.0)) ** 2
              for y in range(3) for x in range(4)]
    value = loss([student], [teacher], [mask], rows=torch.tensor([2]))
    assert value.item() == pytest.approx(sum(errors) / 12, rel=1e-6)


def test_mgd_masks_drop_the_masked_ratio_of_positions():
    loss = MGDLoss(1, 1, masked_ratio=0.45)
    mask = torch.ones(4, 1, 64, 64, dtype=torch.bool)
    keep = loss.keep_masks(torch.tensor([0, 1, 2, 3]), mask, 0)
    dropped = 1 - keep.float().mean().item()
    assert abs(dropped - 0.45) < 0.02  # 16384 draws: one standard deviation is 0.004
    assert not torch.equal(keep[0], keep[1])
    rows = torch.tensor([0, 1, 2, 3])
    assert MGDLoss(1, 1, masked_ratio=0.0).keep_masks(rows, mask, 0).all()
    assert not MGDLoss(1, 1, masked_ratio=1.0).keep_masks(rows, mask, 0).any()


def test_mgd_masks_depend_only_on_seed_step_row_and_level():
    loss = MGDLoss(1, 2)
    mask = box_mask(2, 6, 8, [(6, 8), (4, 5)])
    rows = torch.tensor([7, 3])
    torch.manual_seed(123)
    first = loss.keep_masks(rows, mask, 0)
    torch.manual_seed(456)  # the global random state plays no part: a cached and a live run draw alike
    assert torch.equal(loss.keep_masks(rows, mask, 0), first)
    assert not (first & ~mask).any()  # padding is never kept
    # Image 1 (row 3) is padded; alone and cropped to its valid 4 x 5 it gets the same mask.
    crop = loss.keep_masks(torch.tensor([3]), torch.ones(1, 1, 4, 5, dtype=torch.bool), 0)
    assert torch.equal(first[1, :, :4, :5], crop[0])
    assert not torch.equal(loss.keep_masks(torch.tensor([7, 4]), mask, 0)[1], first[1])  # another row
    assert not torch.equal(loss.keep_masks(rows, mask, 1), first)  # another level
    loss.step += 1
    assert not torch.equal(loss.keep_masks(rows, mask, 0), first)  # the next step
    assert mixed_seed(0, 1, 2) == mixed_seed(0, 1, 2) != mixed_seed(0, 2, 1) and 0 <= mixed_seed(5, 9) < 2**63


def test_mgd_draws_new_masks_each_training_step_and_keeps_the_step_in_its_state(device):
    s, t, m = two_level_batch(device=device)
    loss = build("mgd", device).train()
    first = score(loss, s, t, m).item()
    assert int(loss.step) == 1
    assert score(loss, s, t, m).item() != first  # step 1: other masks
    restored = build("mgd", device)
    restored.load_state_dict({**loss.state_dict(), "step": torch.tensor(0)})
    assert score(restored, s, t, m).item() == pytest.approx(first, rel=1e-6)
    assert "step" in loss.state_dict() and int(loss.state_dict()["step"]) == 2
    loss.eval()
    before = score(loss, s, t, m).item()
    assert int(loss.step) == 2 and score(loss, s, t, m).item() == before  # evaluation does not advance it


def test_mgd_needs_one_row_per_image_and_its_level_count():
    s, t, m = two_level_batch()
    loss = build("mgd")
    with pytest.raises(ValueError, match="row in the store's image index"):
        loss(s, t, m)
    with pytest.raises(ValueError, match="one row per image"):
        loss(s, t, m, rows=torch.tensor([0]))
    with pytest.raises(ValueError, match="built for 2 levels, got 1"):
        loss(s[:1], t[:1], m[:1], rows=torch.tensor([0, 1]))


# --------------------------------------------------------------------------- properties of the three


@pytest.mark.parametrize("method", OURS)
@pytest.mark.parametrize("value", [1e30, float("inf"), float("nan")])
def test_padding_content_even_inf_or_nan_does_not_change_the_loss(method, value, device):
    s, t, m = two_level_batch(device=device)
    loss = build(method, device).eval()
    clean = score(loss, s, t, m)
    fill = with_padding if math.isnan(value) else fill_padding  # NaN has no sign to vary
    s, t = [fill(f, mask, value) for f, mask in zip(s, m)], [fill(f, mask, value) for f, mask in zip(t, m)]
    assert score(loss, s, t, m).item() == pytest.approx(clean.item(), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("method", OURS)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_gradients_are_finite_reach_the_student_and_are_zero_on_padding_holding_inf_or_nan(method, value, device):
    s, t, m = two_level_batch(device=device)
    s = [with_padding(f, mask, value).requires_grad_() for f, mask in zip(s, m)]
    t = [with_padding(f, mask, -value) for f, mask in zip(t, m)]
    loss = build(method, device).train()
    score(loss, s, t, m).backward()
    for f, mask in zip(s, m):
        assert torch.isfinite(f.grad).all()
        assert (f.grad[~mask.expand_as(f)] == 0).all()
        assert f.grad[mask.expand_as(f)].abs().sum() > 0
    for p in loss.parameters():  # mgd's generator trains
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("method", OURS)
def test_padded_image_scores_like_the_image_cropped_to_its_valid_region(method, device):
    s, t, m = two_level_batch(device=device)
    one = slice(1, 2)  # image 1 is the padded one
    loss = build(method, device).eval()
    padded = score(loss, [f[one] for f in s], [f[one] for f in t], [mask[one] for mask in m], rows=(4,))
    crops = [valid[1] for valid in LEVEL_VALID]
    cropped = score(loss, [f[one, :, :h, :w] for f, (h, w) in zip(s, crops)],
                    [f[one, :, :h, :w] for f, (h, w) in zip(t, crops)],
                    [mask[one, :, :h, :w] for mask, (h, w) in zip(m, crops)], rows=(4,))
    assert padded.item() == pytest.approx(cropped.item(), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("method", ["cwd", "pkd"])
def test_identical_student_and_teacher_give_zero(method, device):
    s, _, m = two_level_batch(device=device)
    assert abs(score(build(method, device), s, [f.clone() for f in s], m).item()) < 1e-6


@pytest.mark.parametrize("method", OURS)
def test_half_precision_inputs_give_a_float32_loss(method, device):
    s, t, m = two_level_batch(device=device)
    loss = build(method, device).eval()
    half = score(loss, [f.half() for f in s], [f.half() for f in t], m)
    assert half.dtype == torch.float32
    full = score(loss, [f.half().float() for f in s], [f.half().float() for f in t], m)
    assert half.item() == pytest.approx(full.item(), rel=1e-6, abs=1e-9)


# --------------------------------------------------------------------------- Distiller, optimizer, checkpoint


@pytest.mark.parametrize("method", OURS)
def test_the_distiller_builds_each_with_its_default_weight_and_connectors_for_other_widths(method, tiny_rpn_store,
                                                                                       tiny_teacher, tmp_path):
    from detectron2.modeling import build_model

    store = tiny_rpn_store["path"]
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", store, "DISTILL.DISTILL", method,
                           fpn_channels=32)  # the tiny teacher's FPN has 64 channels
    distiller = build_model(cfg).distiller
    assert isinstance(distiller.loss, CLASSES[method])
    assert distiller.weight == loss_class(method).default_weight
    assert sorted(distiller.connectors) == list(cfg.DISTILL.LEVELS)
    assert all(c.in_channels == 32 and c.out_channels == 64 for c in distiller.connectors.values())
    if method == "mgd":
        assert len(distiller.loss.generations) == len(cfg.DISTILL.LEVELS) and distiller.image_rows


def test_mgds_generator_and_step_are_in_the_students_optimizer_and_checkpoint(tiny_rpn_store, tiny_teacher,
                                                                             tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer

    store = tiny_rpn_store["path"]
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", store, "DISTILL.DISTILL", "mgd")
    model = build_model(cfg)
    generator = list(model.distiller.loss.generations.parameters())
    assert generator and all(p.requires_grad for p in generator)
    in_optimizer = {id(p) for group in build_optimizer(cfg, model).param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in generator)
    model.distiller.loss.step.fill_(5)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("student")
    saved = torch.load(tmp_path / "student.pth", map_location="cpu", weights_only=False)["model"]
    for name, value in model.distiller.state_dict().items():
        assert torch.equal(saved[f"distiller.{name}"], value), name
    assert int(saved["distiller.loss.step"]) == 5


@pytest.mark.parametrize("method", OURS)
def test_two_training_iterations_from_the_store_log_a_finite_loss_kd(method, tiny_rpn_store, tiny_teacher, tmp_path):
    from detectron2.engine import default_argument_parser
    from pipeline.train_student import main

    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_rpn_store["path"],
                           "DISTILL.DISTILL", method, "SOLVER.MAX_ITER", 2)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(cfg.dump())
    main(default_argument_parser().parse_args(["--config-file", str(cfg_file)]))
    out = Path(cfg.OUTPUT_DIR)
    logged = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    kd = [row["loss_kd"] for row in logged if "loss_kd" in row]
    assert kd and all(math.isfinite(v) and v > 0 for v in kd)
    if method == "mgd":  # two training steps drew two sets of masks, and the checkpoint says so
        saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
        assert int(saved["distiller.loss.step"]) == 2

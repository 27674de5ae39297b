"""Padding never reaches a loss: +inf in the student's padding and NaN in the teacher's change nothing.

docs/methods.md promises that whatever the padding holds, it changes neither the value nor the
gradients. Multiplying by a zero mask is not enough (inf * 0 is NaN), and neither is masking only
a loss's last step: a 1x1 conv or a BCE run on the unmasked map gives its weights NaN gradients
through the padded positions even when their loss terms are dropped. So every method, its init
stage and the Distiller's width connectors are checked on the values that break an unmasked
computation.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.distiller import Distiller
from pipeline.losses import METHODS, build_distill_loss, loss_class
from tests.pipeline.losses.test_losses import two_level_batch
from tests.pipeline.losses.test_losses_family import build, score

INIT_STAGE_METHODS = tuple(m for m in METHODS if loss_class(m).init_stage)


def poisoned(features: list[torch.Tensor], masks: list[torch.Tensor], value: float) -> list[torch.Tensor]:
    """The maps with `value` (inf, NaN) on every padded position, as leaves that collect gradients."""
    return [torch.where(m, f, torch.full((), value)).requires_grad_() for f, m in zip(features, masks)]


def assert_finite_and_zero_on_padding(maps: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    for level, (f, mask) in enumerate(zip(maps, masks)):
        assert torch.isfinite(f.grad).all(), f"level {level}: non-finite gradient"
        assert (f.grad[~mask.expand_as(f)] == 0).all(), f"level {level}: non-zero gradient on padding"
    assert any(f.grad.abs().sum() > 0 for f in maps), "no gradient reached the image positions"


def assert_finite_parameter_gradients(module: torch.nn.Module, trained: list[torch.nn.Parameter] | None = None) -> None:
    """Every trained parameter (default: those requiring grad) got a finite gradient."""
    trained_ids = {id(p) for p in trained} if trained is not None else None
    for name, p in module.named_parameters():
        if (p.requires_grad if trained_ids is None else id(p) in trained_ids):
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"non-finite gradient of {name}"


@pytest.mark.parametrize("method", METHODS)
def test_inf_student_padding_and_nan_teacher_padding_give_the_clean_loss_and_finite_gradients(method):
    s, t, m = two_level_batch()
    clean = score(build(method), s, t, m)
    loss = build(method)  # the same initial weights (build seeds)
    students = poisoned(s, m, float("inf"))
    value = score(loss, students, poisoned(t, m, float("nan")), m)
    assert value.item() == pytest.approx(clean.item(), rel=1e-5, abs=1e-9)
    value.backward()
    assert_finite_and_zero_on_padding(students, m)
    assert_finite_parameter_gradients(loss)


@pytest.mark.parametrize("method", INIT_STAGE_METHODS)
def test_the_init_stage_loss_ignores_non_finite_padding_too(method):
    s, t, m = two_level_batch()
    on_student = loss_class(method).init_stage == "student"
    clean = build(method).init_loss(s if on_student else None, t, m)
    loss = build(method)
    for p in loss.init_parameters():
        p.requires_grad_(True)  # the init stage trains parts the main training keeps frozen (factor's paraphraser)
    students, teachers = poisoned(s, m, float("inf")), poisoned(t, m, float("nan"))
    value = loss.init_loss(students if on_student else None, teachers, m)
    assert value.item() == pytest.approx(clean.item(), rel=1e-5, abs=1e-9)
    value.backward()
    assert_finite_and_zero_on_padding(students if on_student else teachers, m)
    assert_finite_parameter_gradients(loss, loss.init_parameters())


def test_the_distillers_width_connectors_see_no_padding_either():
    # A 6-channel student and a 4-channel teacher: the Distiller puts a learned 1x1 conv in front of the student.
    s, t, m = two_level_batch(channels_student=6)
    sizes = [(24, 32), (16, 20)]  # inputs whose p2 (stride 4) and p3 (stride 8) valid sizes are two_level_batch's
    teacher = [{"p2": t[0][i, :, :h, :w], "p3": t[1][i, :, :hh, :ww]}
               for i, ((h, w), (hh, ww)) in enumerate([((6, 8), (3, 4)), ((4, 5), (2, 3))])]

    def run(students):
        torch.manual_seed(0)
        distiller = Distiller(build_distill_loss("hint"), ["p2", "p3"], [4, 8], 6, 4, weight=1.0)
        return distiller, distiller(dict(zip(["p2", "p3"], students)), teacher, sizes)

    _, clean = run(s)
    students = poisoned(s, m, float("inf"))
    distiller, value = run(students)
    assert set(distiller.connectors) == {"p2", "p3"}
    assert value.item() == pytest.approx(clean.item(), rel=1e-6)
    value.backward()
    assert_finite_and_zero_on_padding(students, m)
    assert_finite_parameter_gradients(distiller)

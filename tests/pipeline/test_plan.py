"""The teacher plan: the student's config is resolved into the teacher's settings once, and passed down."""
import pytest

from pipeline import plan as plan_module
from pipeline.plan import TeacherPlan
from tests.conftest import make_student_cfg


def test_stage_one_resolves_the_teacher_config_once_and_hashes_the_weights_once(tiny_teacher, tmp_path, monkeypatch):
    from pipeline import teacher
    from pipeline.stage_one import cache_teacher

    calls = {"cfg": 0, "hash": 0}
    load, sha = plan_module.load_teacher_cfg, teacher.sha256_file

    def counted_load(cfg):
        calls["cfg"] += 1
        return load(cfg)

    def counted_sha(path):
        calls["hash"] += 1
        return sha(path)

    monkeypatch.setattr(plan_module, "load_teacher_cfg", counted_load)
    monkeypatch.setattr(teacher, "sha256_file", counted_sha)
    cache_teacher(make_student_cfg(tmp_path, tiny_teacher))
    assert calls == {"cfg": 1, "hash": 1}


def test_the_plan_holds_what_the_fingerprint_records(tiny_teacher, tmp_path):
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.CODEC", "int8", "DISTILL.CACHE.RPN", True)
    plan = TeacherPlan.from_config(cfg)
    fp = plan.fingerprint
    assert (plan.levels, plan.strides, plan.size_divisibility) == (("p2", "p3", "p4", "p5", "p6"), (4, 8, 16, 32, 64), 32)
    assert plan.codec == fp["codec"] == "int8" and plan.flip == fp["flip"] and plan.rpn
    assert fp["resize"] == plan.resize == {"type": "ResizeShortestEdge", "short_edge": 128, "max_size": 224,
                                           "interp": "bilinear"}
    assert plan.teacher_cfg.MODEL.WEIGHTS == plan.weights == tiny_teacher["weights"]
    assert plan.fingerprint is fp  # computed once per plan


def test_range_sampling_is_refused_and_choice_sizes_resolve_when_the_plan_is_resolved(tiny_teacher, tmp_path):
    cfg = make_student_cfg(tmp_path, tiny_teacher, "INPUT.MIN_SIZE_TRAIN", (112, 128),
                           "INPUT.MIN_SIZE_TRAIN_SAMPLING", "range")
    with pytest.raises(ValueError, match=r"'range' samples any short edge in \[112, 128\]"):
        TeacherPlan.from_config(cfg)
    plan = TeacherPlan.from_config(make_student_cfg(tmp_path, tiny_teacher, "INPUT.MIN_SIZE_TRAIN", (128, 112)))
    assert plan.store_sizes == (112, 128) and plan.resize["short_edges"] == [112, 128]

"""Stage two: a student trains from the store with loss_kd, never builds the teacher, and refuses bad settings."""
import json
from pathlib import Path

import pytest
import torch

from cache import StoreMismatchError
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from pipeline import distill_rcnn, teacher
from pipeline.stage_two import StudentTrainer, check_store
from tests.conftest import make_student_cfg


def _one_batch(cfg):
    return next(iter(StudentTrainer.build_train_loader(cfg)))


def test_cache_mode_never_builds_the_teacher(tiny_store, tiny_teacher, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the teacher was built in cache mode")

    monkeypatch.setattr(teacher, "build_teacher", forbidden)
    monkeypatch.setattr(distill_rcnn.TeacherFeatureExtractor, "from_config", forbidden)
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"])
    check_store(cfg)
    model = build_model(cfg).train()
    with EventStorage(0):
        losses = model(_one_batch(cfg))
    assert set(losses) >= {"loss_kd", "loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    assert torch.isfinite(losses["loss_kd"]) and losses["loss_kd"] > 0


def test_training_steps_from_the_store_reduce_the_total_loss(tiny_store, tiny_teacher, tmp_path, device):
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"],
                           "MODEL.DEVICE", device.type)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert model.device.type == device.type
    batch = _one_batch(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    totals, kd = [], []
    with EventStorage(0):
        for _ in range(8):
            losses = model(batch)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            totals.append(total.item())
            kd.append(losses["loss_kd"].item())
    assert totals[-1] < totals[0] and kd[-1] < kd[0], (totals, kd)


def test_a_live_teacher_on_the_device_gives_the_loss_kd_of_the_store_written_on_the_cpu(tiny_store, tiny_teacher,
                                                                                         tmp_path, device):
    # The store is fp16 of the CPU teacher; live, the teacher runs on the device under test. fp16 rounding
    # moves loss_kd by at most 1e-3 (tests/pipeline/test_parity.py); the devices' float32 differ far less.
    cfgs = {source: make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"],
                                     "DISTILL.SOURCE", source, "MODEL.DEVICE", device.type)
            for source in ("cache", "live")}
    batch = _one_batch(cfgs["cache"])  # the same images and flips for both
    values = {}
    for source, cfg in cfgs.items():
        torch.manual_seed(0)
        model = build_model(cfg).train()
        with EventStorage(0):
            losses = model(batch)
        assert all(v.device.type == device.type for v in losses.values())
        losses["loss_kd"].backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        values[source] = losses["loss_kd"].item()
    assert abs(values["cache"] - values["live"]) <= 1e-3 * abs(values["live"]), values


def test_train_student_logs_loss_kd_and_writes_metrics(tiny_store, tiny_teacher, tmp_path):
    from detectron2.engine import default_argument_parser
    from pipeline.train_student import main

    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"], "SOLVER.MAX_ITER", 3)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(cfg.dump())
    args = default_argument_parser().parse_args(["--config-file", str(cfg_file)])
    metrics = main(args)
    out = Path(cfg.OUTPUT_DIR)
    logged = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("loss_kd" in row for row in logged)
    assert "AP" in metrics["bbox"] and metrics["store"]["fingerprint_sha256"]
    assert json.loads((out / "student_metrics.json").read_text())["method"] == "hint"

    # --eval-only evaluates the given weights and trains nothing, as detectron2's train_net.py does.
    final = out / "model_final.pth"
    stamp = final.stat().st_mtime_ns
    (out / "metrics.json").unlink()
    evaluated = main(default_argument_parser().parse_args(
        ["--config-file", str(cfg_file), "--eval-only", "MODEL.WEIGHTS", str(final)]))
    assert evaluated["bbox"] == pytest.approx(metrics["bbox"], abs=1e-6, nan_ok=True)  # APl: no large objects
    assert final.stat().st_mtime_ns == stamp and not (out / "metrics.json").exists()


def test_a_different_student_resize_is_refused_naming_the_field(tiny_store, tiny_teacher, tmp_path):
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"], "INPUT.MAX_SIZE_TRAIN", 256)
    with pytest.raises(StoreMismatchError, match="resize"):
        check_store(cfg)


def test_an_unknown_method_fails_at_start_listing_the_methods(student_cfg):
    cfg = student_cfg("DISTILL.DISTILL", "hintt")
    with pytest.raises(ValueError, match="hint, kd, kdsvd"):
        build_model(cfg)


def test_a_connector_appears_only_where_widths_differ(student_cfg):
    narrow = build_model(student_cfg(fpn_channels=32))
    assert set(narrow.distiller.connectors) == set(narrow.distiller.levels)
    assert len(build_model(student_cfg()).distiller.connectors) == 0


def test_disabled_distillation_is_plain_detectron2(student_cfg):
    model = build_model(student_cfg("DISTILL.ENABLE", False))
    assert model.distiller is None

"""Configs build their models; a tiny teacher learns; COCOEvaluator runs without detectron2's C++ ops."""
from pathlib import Path

import pytest
import torch

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from pipeline import distill_rcnn as _  # noqa: F401  (registers DistillRCNN)
from pipeline.config import get_distill_cfg
from pipeline.trainer import Trainer
from tests.conftest import write_tiny_config

from tests.conftest import REPO  # noqa: E402
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml") if not p.name.startswith("Base"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_loads_and_builds_its_model(config, monkeypatch):
    monkeypatch.chdir(REPO)  # DISTILL.CFG_T paths are relative to the repository
    cfg = get_distill_cfg(config, ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    assert model.roi_heads.num_classes == cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if cfg.DISTILL.ENABLE:
        assert model.distiller is not None and model.teacher_source is not None


def test_a_few_teacher_iterations_reduce_the_loss(tmp_path, tiny_data):
    cfg = get_distill_cfg(str(write_tiny_config(tmp_path / "t.yaml")))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = next(iter(build_detection_train_loader(cfg)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    totals = []
    with EventStorage(0):
        for _step in range(10):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            totals.append(loss.item())
    assert totals[-1] < 0.8 * totals[0], totals


def test_coco_evaluator_runs_on_the_tiny_val_split(tmp_path, tiny_data):
    cfg = get_distill_cfg(str(write_tiny_config(tmp_path / "t.yaml")), ["OUTPUT_DIR", str(tmp_path)])
    model = build_model(cfg).eval()
    evaluator = Trainer.build_evaluator(cfg, "embedded_tiny_val")
    results = inference_on_dataset(model, build_detection_test_loader(cfg, "embedded_tiny_val"), evaluator)
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75"}

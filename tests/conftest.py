"""Shared fixtures: the tiny embedded dataset, a tiny random-weight teacher, student configs.

Tests that are not about the R101 use R18-FPN models at the embedded 128 px input, so the
suite stays within minutes on two CPU cores.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYTHONWARNINGS", "ignore")
torch.set_num_threads(2)

import pipeline  # noqa: E402,F401  (compat shims, registrations)
from pipeline import datasets  # noqa: E402,F401  (registers embedded_tiny_*)

BASE = REPO / "configs" / "embedded" / "Base-Embedded-FPN.yaml"
# R18-FPN at 64 channels: the smallest detectron2 ResNet, for tests that are not about the R101.
TINY_MODEL = """
MODEL:
  DEVICE: "cpu"
  META_ARCHITECTURE: "{meta}"
  RESNETS:
    DEPTH: 18
    RES2_OUT_CHANNELS: 64
  FPN:
    OUT_CHANNELS: {fpn}
  ROI_HEADS:
    BATCH_SIZE_PER_IMAGE: 32
  ROI_BOX_HEAD:
    FC_DIM: 128
DATASETS:
  TRAIN: ("embedded_tiny_train",)
  TEST: ("embedded_tiny_val",)
DATALOADER:
  NUM_WORKERS: 0
SOLVER:
  IMS_PER_BATCH: 2
  MAX_ITER: 4
  WARMUP_ITERS: 0
"""


# The devices a device-dependent test runs on: the CPU, and CUDA where torch finds it. On a machine
# without CUDA the cuda cases are reported as skipped; tools/device_check.sh runs them on a GPU (-k cuda).
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here (tools/device_check.sh runs these on a GPU)")))


@pytest.fixture(params=DEVICES)
def device(request):
    """The device under test; test ids name it (e.g. [hint-cuda]), so `pytest -k cuda` selects the GPU cases.

    On CUDA, TF32 is off while the test runs: cuDNN convolutions use it by default, which rounds inputs to
    10 mantissa bits (about 5e-4), and these tests hold values to float32 tolerances.
    """
    if request.param != "cuda":
        yield torch.device(request.param)
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="session")
def tiny_data() -> Path:
    from tools.embedded_data import generate
    from pipeline.datasets import embedded_root

    root = embedded_root("tiny")
    generate(root, "tiny", seed=0)
    return root


def write_tiny_config(path: Path, fpn_channels: int = 64, meta: str = "GeneralizedRCNN") -> Path:
    path.write_text(f'_BASE_: "{BASE}"\n' + TINY_MODEL.format(fpn=fpn_channels, meta=meta))
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_data) -> dict:
    """An R18-FPN teacher config and random weights saved as a detectron2 .pth checkpoint."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from pipeline.config import get_distill_cfg

    root = tmp_path_factory.mktemp("teacher")
    cfg_file = write_tiny_config(root / "teacher.yaml")
    torch.manual_seed(0)
    model = build_model(get_distill_cfg(str(cfg_file)))
    DetectionCheckpointer(model, save_dir=str(root)).save("model_final")
    return {"cfg": str(cfg_file), "weights": str(root / "model_final.pth"), "dir": root}


def make_student_cfg(root: Path, teacher: dict, *opts, fpn_channels: int = 64):
    """A student config (R18-FPN, DistillRCNN) distilling from `teacher`, its store and output under root."""
    from pipeline.config import get_distill_cfg

    root.mkdir(parents=True, exist_ok=True)
    cfg_file = write_tiny_config(root / f"student_{fpn_channels}.yaml", fpn_channels, "DistillRCNN")
    base = ["DISTILL.ENABLE", True, "DISTILL.CFG_T", teacher["cfg"], "DISTILL.PATH_T", teacher["weights"],
            "DISTILL.CACHE.PATH", str(root / "store.zarr"), "DISTILL.CACHE.SHARD_IMAGES", 4,
            "OUTPUT_DIR", str(root / "out")]
    return get_distill_cfg(str(cfg_file), base + list(opts))


@pytest.fixture()
def student_cfg(tmp_path, tiny_teacher):
    """make(*KEY VALUE overrides, fpn_channels=64) -> a student config under this test's tmp_path."""
    return lambda *opts, fpn_channels=64: make_student_cfg(tmp_path, tiny_teacher, *opts, fpn_channels=fpn_channels)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_teacher) -> dict:
    """An fp16 store of the tiny teacher over embedded_tiny_train, built once by stage one."""
    from pipeline.stage_one import cache_teacher

    root = tmp_path_factory.mktemp("store_fp16")
    cfg = make_student_cfg(root, tiny_teacher)
    summary = cache_teacher(cfg)
    return {"cfg": cfg, "path": cfg.DISTILL.CACHE.PATH, "summary": summary, "root": root}


@pytest.fixture(scope="session")
def tiny_rpn_store(tmp_path_factory, tiny_teacher) -> dict:
    """An fp16 store of the tiny teacher that also holds its RPN outputs (DISTILL.CACHE.RPN True), for kd."""
    from pipeline.stage_one import cache_teacher

    root = tmp_path_factory.mktemp("store_rpn")
    cfg = make_student_cfg(root, tiny_teacher, "DISTILL.CACHE.RPN", True)
    summary = cache_teacher(cfg)
    return {"cfg": cfg, "path": cfg.DISTILL.CACHE.PATH, "summary": summary, "root": root}


def crash_stage_one_at_row(monkeypatch, row: int):
    """Make stage one's image reader raise KeyboardInterrupt at `row` (a crash mid-run); returns the original."""
    from pipeline.stage_one import ResizedImages

    original = ResizedImages.__getitem__

    def crash(self, i):
        if self.rows[i] == row:
            raise KeyboardInterrupt("simulated crash")
        return original(self, i)

    monkeypatch.setattr(ResizedImages, "__getitem__", crash)
    return original

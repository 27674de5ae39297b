"""Start-up refusals: one clear line naming the value and the fix, exit status 1, never a traceback."""
import os
import subprocess
import sys

import pytest

from cache import StoreMismatchError
from pipeline.plan import TeacherPlan
from pipeline.stage_two import check_store
from tests.conftest import REPO, make_student_cfg


def _run(module: str, cfg, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    cfg_file = tmp_path / f"{module.rsplit('.', 1)[-1]}.yaml"
    cfg_file.write_text(cfg.dump())
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", module, "--config-file", str(cfg_file), *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_store_mismatch_from_the_command_line_names_the_cli_flag_not_the_python_argument(tiny_store, tiny_teacher,
                                                                                        tmp_path):
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"], "DISTILL.CACHE.CODEC", "int8")
    done = _run("pipeline.cache_teacher", cfg, tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "codec" in done.stderr and "--overwrite (make cache-teacher OVERWRITE=1)" in done.stderr
    assert "overwrite=True" not in done.stderr


def test_train_student_refuses_a_missing_store_in_one_line(tiny_teacher, tmp_path):
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", str(tmp_path / "absent.zarr"))
    done = _run("pipeline.train_student", cfg, tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{tmp_path / 'absent.zarr'} does not exist: build it first (make cache-teacher)" in done.stderr


@pytest.mark.parametrize("weights, message", [
    ("", "DISTILL.PATH_T is empty"),
    ("no/such/teacher.pth", "DISTILL.PATH_T='no/such/teacher.pth' does not exist: point it at the teacher's weights"),
    ("output/embedded/teacher/model_final.pth", "train the embedded teacher first (make teacher)")])
def test_missing_teacher_weights_get_their_message_before_any_hashing(tiny_teacher, tmp_path, monkeypatch, weights,
                                                                     message):
    monkeypatch.chdir(tmp_path)  # no embedded teacher here
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.PATH_T", weights)
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(")", r"\)")):
        TeacherPlan.from_config(cfg).fingerprint  # noqa: B018  (resolving needs no weights; hashing them does)


def test_a_store_without_a_flipped_view_is_refused_at_start_for_a_flipping_student(tiny_teacher, tmp_path):
    from pipeline.stage_one import cache_teacher

    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.FLIP", "none", "INPUT.RANDOM_FLIP", "none")
    cache_teacher(cfg)
    flipping = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.FLIP", "none", "INPUT.RANDOM_FLIP", "horizontal")
    with pytest.raises(StoreMismatchError, match="FLIP none .*INPUT.RANDOM_FLIP 'horizontal'"):
        check_store(flipping)
    check_store(cfg)  # the student it was built for is served


def test_a_cuda_config_without_cuda_is_an_error_naming_model_device(tiny_teacher, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = make_student_cfg(tmp_path, tiny_teacher, "MODEL.DEVICE", "cuda")
    done = _run("pipeline.train_student", cfg, tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "MODEL.DEVICE='cuda' but torch finds no CUDA device here; set MODEL.DEVICE cpu" in done.stderr


def test_the_default_device_is_cuda_where_there_is_one_and_cpu_elsewhere():
    import torch

    from pipeline.config import get_distill_cfg

    assert get_distill_cfg().MODEL.DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")
    assert get_distill_cfg(opts=["MODEL.DEVICE", "cpu"]).MODEL.DEVICE == "cpu"

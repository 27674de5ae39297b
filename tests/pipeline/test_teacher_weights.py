"""Teacher weights load as detectron2's DetectionCheckpointer loads them, but never run pickled code."""
import pickle

import pytest
import torch

from detectron2.modeling import build_model
from pipeline.config import get_distill_cfg
from pipeline.teacher import build_teacher
from tests.conftest import make_student_cfg


def _teacher_module(tiny_teacher) -> torch.nn.Module:
    """The tiny teacher as saved in its detectron2 checkpoint (the fixture's random weights)."""
    model = build_model(get_distill_cfg(tiny_teacher["cfg"]))
    model.load_state_dict(torch.load(tiny_teacher["weights"], weights_only=True)["model"])
    return model


def test_a_bare_state_dict_pth_teacher_loads_every_weight(tiny_teacher, tmp_path):
    # torch.save(model.state_dict(), path): no {"model": ...} wrapper, as many training scripts write it.
    reference = _teacher_module(tiny_teacher)
    bare = tmp_path / "bare_state_dict.pth"
    torch.save(reference.state_dict(), bare)
    teacher = build_teacher(make_student_cfg(tmp_path, dict(tiny_teacher, weights=str(bare))))
    loaded, expected = teacher.state_dict(), reference.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_a_bare_state_dict_holding_a_pickled_object_is_still_refused_without_running_it(tiny_teacher, tmp_path):
    marker = tmp_path / "code_ran"
    state = _teacher_module(tiny_teacher).state_dict()
    state["payload"] = _RunsCodeWhenUnpickled(str(marker))
    torch.save(state, tmp_path / "evil_bare.pth")
    cfg = make_student_cfg(tmp_path, dict(tiny_teacher, weights=str(tmp_path / "evil_bare.pth")))
    with pytest.raises(pickle.UnpicklingError, match=r"evil_bare\.pth hold Python objects beyond tensors"):
        build_teacher(cfg)
    assert not marker.exists()

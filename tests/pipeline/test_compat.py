"""pipeline.compat: each shim makes detectron2 v0.6 work here, and none touches what is already there."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from pipeline import compat


def test_numpy_aliases_of_builtins_exist():
    assert np.int is int and np.float is float and np.object is object
    # numpy 2 brought np.bool back as its own bool type; detectron2 only uses it as a dtype.
    assert np.zeros(2).astype(np.bool).dtype == bool


def test_pillow_linear_is_bilinear():
    assert Image.LINEAR == Image.Resampling.BILINEAR


def test_missing_compiled_ops_fail_with_a_clear_message():
    import detectron2._C as _C

    if "detectron2._C" not in compat.applied:
        pytest.skip("a compiled detectron2 is installed")
    with pytest.raises(RuntimeError, match="use_fast_impl=False"):
        _C.box_iou_rotated(None, None)


def test_model_zoo_configs_are_found():
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml")
    assert path.endswith("faster_rcnn_R_101_FPN_3x.yaml")


def test_detectron2_faster_rcnn_builds_and_runs_on_cpu():
    import torch
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 64, 96, dtype=torch.uint8), "height": 64, "width": 96}])
    assert "instances" in out[0]


def test_every_shim_is_a_no_op_where_the_real_thing_exists():
    """With the names already present (as on a full build and older libraries), compat patches nothing."""
    code = textwrap.dedent(
        """
        import sys, types
        import numpy as np
        from PIL import Image
        sentinel = object()
        for name in ("int", "bool", "float", "object", "str", "complex"):
            setattr(np, name, sentinel)
        Image.LINEAR = Image.CUBIC = Image.ANTIALIAS = sentinel
        sys.modules["pkg_resources"] = types.ModuleType("pkg_resources")
        real_c = types.ModuleType("detectron2._C")
        sys.modules["detectron2._C"] = real_c
        common = types.ModuleType("detectron2.data.common")  # a MapDataset that samples from a list
        common.MapDataset = type("MapDataset", (), {"__init__": lambda self, d, f: setattr(self, "_fallback_candidates", [0])})
        sys.modules["detectron2.data.common"] = common
        import importlib.util  # the shims module alone: `import pipeline` would import detectron2 itself
        spec = importlib.util.spec_from_file_location("compat_alone", "pipeline/compat.py")
        compat = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(compat)
        assert compat.applied == [], compat.applied
        assert np.int is sentinel and Image.LINEAR is sentinel
        assert sys.modules["detectron2._C"] is real_c
        print("untouched")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(compat.__file__).rsplit("/pipeline", 1)[0])
    assert out.returncode == 0, out.stderr
    assert "untouched" in out.stdout

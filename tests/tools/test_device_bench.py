"""tools/device_bench.py's pieces that decide its figures: FrozenBN calibration of random weights, merged results."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from pipeline.config import get_distill_cfg
from tools.device_bench import calibrate_frozen_bn, timed, write_merged


def frozen_bn_outputs(model, x) -> list[torch.Tensor]:
    outputs = []
    handles = [m.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))  # ReLUs run in place
               for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        features = model.backbone(x)
    for handle in handles:
        handle.remove()
    return outputs, features


def test_calibration_gives_every_frozen_bn_zero_mean_unit_variance_outputs_on_its_image(tmp_path):
    cfg = get_distill_cfg(None, ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.NORM", "FrozenBN",
                                 "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "image.jpg")
    stored = np.asarray(Image.open(tmp_path / "image.jpg"))[:, :, ::-1]  # BGR, as read_image gives it
    x = ((torch.as_tensor(stored.transpose(2, 0, 1).copy()).float() - model.pixel_mean) / model.pixel_std)[None]

    before, _ = frozen_bn_outputs(model, x)
    calibrate_frozen_bn(model, str(tmp_path / "image.jpg"))
    after, features = frozen_bn_outputs(model, x)
    assert len(after) == sum(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules()) > 10
    for out in after:
        mean, var = out.mean(dim=(0, 2, 3)), out.var(dim=(0, 2, 3))
        assert mean.abs().max() < 1e-3 and (var - 1).abs().max() < 1e-2
    # Identity statistics let the residual stages grow: the last block's output is far from unit scale.
    assert before[-1].std() > 10 * after[-1].std()
    assert all(torch.isfinite(f).all() for f in features.values())


def test_results_merge_part_by_part_and_keep_the_first_machine_description(tmp_path):
    path = tmp_path / "bench.json"
    write_merged(path, "teacher", {"runs": [1]}, {"gpu": "H200"})
    write_merged(path, "student", {"modes": {}}, {"gpu": "another"})
    write_merged(path, "teacher", {"runs": [2]}, {"gpu": "another"})
    assert json.loads(path.read_text()) == {"machine": {"gpu": "H200"}, "teacher": {"runs": [2]},
                                            "student": {"modes": {}}}


def test_timed_discards_the_warm_up_calls():
    calls = []
    seconds = timed(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5 and len(seconds) == 3 and all(s >= 0 for s in seconds)

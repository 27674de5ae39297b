"""Codes cross the DataLoader boundary, not floats: StoredMap.decode equals the numpy decoder bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cache.codecs import get_codec
from cache.stored_map import StoredMap, decode_maps
from tests.cache.test_codecs import features

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("codec_name", ["fp16", "int8", "int8-std0.2", "int8-std0.05"])
def test_decoding_on_the_device_is_bitwise_the_numpy_decoder(codec_name, device):
    codec = get_codec(codec_name)
    for seed, shape in enumerate([(16, 37, 53), (8, 1, 1), (256, 25, 34), (4, 200, 3)]):
        x = features(seed, shape)
        stored, params = codec.encode(x, step_scale=0.5 ** (seed % 3))
        reference = codec.decode(stored.copy(), params)
        m = StoredMap(torch.from_numpy(stored), None if params is None else torch.from_numpy(params.scale),
                      None if params is None else torch.from_numpy(params.offset), codec.predictor)
        got = m.decode(device).cpu().numpy()
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), reference.view(np.uint32)), codec_name


def test_int8_codes_cross_the_boundary_in_a_quarter_of_float32s_bytes():
    codec = get_codec("int8")
    x = features(0, (256, 200, 272))  # p2 of an 800x1088 input
    stored, params = codec.encode(x)
    m = StoredMap(torch.from_numpy(stored), torch.from_numpy(params.scale), torch.from_numpy(params.offset), "plane")
    assert m.nbytes <= x.nbytes / 4 * 1.001  # 1 byte per value, plus 8 bytes per channel


def test_a_mirrored_map_flips_after_decoding_and_negates_the_dx_deltas():
    codec = get_codec("int8")
    x = features(3, (8, 5, 7))
    stored, params = codec.encode(x)
    plain = codec.decode(stored.copy(), params)
    m = StoredMap(torch.from_numpy(stored), torch.from_numpy(params.scale), torch.from_numpy(params.offset), "plane",
                  mirror=True, dx_rows=slice(0, None, 4))
    expected = plain[:, :, ::-1].copy()
    expected[0::4] *= -1
    assert np.array_equal(m.decode().numpy(), expected)


def test_decode_maps_moves_float_maps_and_decodes_stored_ones():
    half = torch.randn(4, 3, 3).half()
    out = decode_maps({"p2": StoredMap(half), "p3": torch.ones(2, 2, 2)})
    assert torch.equal(out["p2"], half.float()) and torch.equal(out["p3"], torch.ones(2, 2, 2))


def test_the_mapper_sends_codes_and_the_student_gets_what_read_returns(tiny_teacher, tmp_path):
    """End to end: read_codes + decode on the student's side equals read, for every codec and both views."""
    from detectron2.data import DatasetCatalog

    from cache import TeacherFeatureStore
    from pipeline.mapper import DistillDatasetMapper
    from pipeline.stage_one import cache_teacher
    from pipeline.teacher_source import CachedTeacher
    from tests.conftest import make_student_cfg

    for codec, flip in (("int8-std0.2", "stored"), ("fp16", "mirror")):
        cfg = make_student_cfg(tmp_path / codec, tiny_teacher, "DISTILL.CACHE.CODEC", codec, "DISTILL.CACHE.FLIP", flip,
                               "DISTILL.CACHE.RPN", True, "DISTILL.DISTILL", "kd")
        cache_teacher(cfg)
        store = TeacherFeatureStore(cfg.DISTILL.CACHE.PATH)
        image = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[0]
        for hflip in (False, True):
            codes = store.read_codes(image["image_id"], flip=hflip)
            sent = sum(m.nbytes for m in codes.values())
            floats = store.read(image["image_id"], flip=hflip)
            float_bytes = sum(t.numel() * 4 for t in floats.values())
            # int8: 1 byte a value + 8 a channel (2.5 % of these tiny maps, 0.01 % at COCO size); fp16: 2 bytes
            assert sent <= float_bytes * (0.26 if codec == "int8-std0.2" else 0.5), (codec, sent / float_bytes)
            decoded = CachedTeacher()([{"teacher_features": codes}], torch.device("cpu"))[0]
            assert decoded.keys() == floats.keys()
            assert all(torch.equal(decoded[k], floats[k]) for k in floats), (codec, hflip)
        mapped = DistillDatasetMapper(cfg, True)(dict(image))
        assert all(isinstance(m, StoredMap) for m in mapped["teacher_features"].values())

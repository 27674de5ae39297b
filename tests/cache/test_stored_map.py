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

"""Specification of the int8 codecs (cache/codecs.py): int8-std<a>'s error bound, the plane predictor, the format.

int8-std<a> stores int8's codes (value = q * scale + offset per channel) with a step of `a` standard
deviations of the channel. Both store each code as its plane-predictor residual (code - left - up +
up-left, modulo 256) and compress the bytes with zstd unshuffled. Features are synthetic: smooth
maps plus noise, with per-channel scales and offsets and a few outliers, seeded by the image id.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cache import ImageEntry, StoreLayout, StoreMismatchError, TeacherFeatureStore, TeacherFeatureWriter, get_codec
from cache.codecs import LOSSY_DEFAULT, plane_residuals_, plane_restore

LEVELS = ("p2", "p3", "p4", "p5", "p6")
STRIDES = (4, 8, 16, 32, 64)
CHANNELS = 16
MAX_HW = (128, 128)
IDS = [3, 8, 21, 34]


def features(image_id: int, shape: tuple[int, int, int], noise: float = 0.3) -> np.ndarray:
    """Smooth signed maps plus noise, scaled and shifted per channel, with one large outlier per channel."""
    rng = np.random.default_rng(image_id)
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / 8.0
    phase = rng.uniform(0, 2 * np.pi, (c, 2, 1, 1))
    smooth = np.sin(yy + phase[:, 0]) + np.cos(0.7 * xx + phase[:, 1])
    x = (smooth + noise * rng.standard_normal((c, h, w))) * rng.lognormal(0.0, 1.0, (c, 1, 1)) + rng.normal(0, 2, (c, 1, 1))
    x[:, 0, 0] += 20 * x.std(axis=(1, 2))  # activations with a long tail, as FPN outputs have
    return x.astype(np.float32)


def layout_for(codec: str) -> StoreLayout:
    return StoreLayout(LEVELS, STRIDES, CHANNELS, codec, "stored", MAX_HW, shard_images=2, tile=16)


def entries(layout: StoreLayout, ids=IDS, noise: float = 0.3) -> list[ImageEntry]:
    out = []
    for image_id in ids:
        resized = (128, 96) if image_id % 2 else (96, 128)
        feats = {view: {level: features(image_id * 10 + v * 5 + i, (CHANNELS, *layout.valid_hw(level, resized)), noise)
                        for i, level in enumerate(layout.levels)} for v, view in enumerate(layout.views)}
        out.append(ImageEntry(image_id, resized, resized, MAX_HW, feats))
    return out


def build(path, codec: str) -> tuple[TeacherFeatureStore, list[ImageEntry]]:
    layout = layout_for(codec)
    writer = TeacherFeatureWriter.open(str(path), layout, IDS, "toy", {"teacher": "toy"})
    written = entries(layout)
    for shard in range(writer.num_shards):
        writer.write_shard(shard, written[2 * shard: 2 * shard + 2])
    writer.finalize()
    return TeacherFeatureStore(str(path)), written


def store_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def test_int8_std_error_is_at_most_half_a_step_of_a_std_fractions_per_channel_halving_per_level(tmp_path):
    a = 0.3
    store, written = build(tmp_path / "s", f"int8-std{a}")
    for entry in written:
        for view, flip in (("orig", False), ("hflip", True)):
            got = store.read(entry.image_id, flip=flip)
            for level, stride in zip(LEVELS, STRIDES):
                x = entry.features[view][level].reshape(CHANNELS, -1).astype(np.float64)
                err = got[level].numpy().reshape(CHANNELS, -1) - x
                a_level = a * STRIDES[0] / stride  # a at p2, a / 2 at p3, ...: each level a quarter of the positions
                step = np.maximum(a_level * x.std(axis=1), (x.max(axis=1) - x.min(axis=1)) / 255)
                # |error| <= step / 2, plus float32 rounding of the decode
                bound = step / 2 * (1 + 1e-4) + 1e-6 * np.abs(x).max(axis=1)
                assert np.all(np.abs(err).max(axis=1) <= bound), (entry.image_id, view, level)
                # so the RMS error of every channel is at most a / 2 of its standard deviation
                rms = np.sqrt((err ** 2).mean(axis=1))
                assert np.all(rms <= np.maximum(a_level / 2 * x.std(axis=1), bound)), (entry.image_id, view, level)


def test_int8_std_is_smaller_on_disk_than_int8_and_shrinks_as_its_step_grows(tmp_path):
    sizes = {}
    for codec in ("int8", LOSSY_DEFAULT, "int8-std0.3", "int8-std0.6"):
        build(tmp_path / codec, codec)
        sizes[codec] = store_bytes(tmp_path / codec)
    assert sizes["int8"] > sizes[LOSSY_DEFAULT] > sizes["int8-std0.3"] > sizes["int8-std0.6"], sizes


def test_int8_std_decodes_with_two_running_sums_and_int8s_formula(tmp_path):
    """A reader in another language needs two wrapping running sums, then codes * scale + offset, as for int8."""
    import zarr

    store, _ = build(tmp_path / "s", "int8-std0.5")
    group = zarr.open_group(str(tmp_path / "s"), mode="r")
    row, level = 1, "p3"
    h, w = store.layout.valid_hw(level, store.sizes(IDS[row])["resized_hw"])
    residuals = group[f"features/{level}"][row, 0, :, :h, :w]
    scale, offset = group[f"scale/{level}"][row, 0], group[f"offset/{level}"][row, 0]
    assert residuals.dtype == np.uint8
    q = np.cumsum(np.cumsum(residuals, axis=1, dtype=np.uint8), axis=2, dtype=np.uint8)
    by_hand = q.astype(np.float32) * scale[:, None, None] + offset[:, None, None]
    assert np.array_equal(by_hand, store.read(IDS[row])[level].numpy())
    meta = json.loads((tmp_path / "s" / "features" / level / "zarr.json").read_text())
    blosc = [c for c in meta["codecs"][0]["configuration"]["codecs"] if c["name"] == "blosc"][0]["configuration"]
    assert (blosc["cname"], blosc["shuffle"], blosc["typesize"]) == ("zstd", "noshuffle", 1)
    attrs = json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"]
    assert (attrs["codec"], attrs["predictor"], attrs["format_version"]) == ("int8-std0.5", "plane", 2)  # a layout without sizes: format 2


@pytest.mark.parametrize("shape", [(3, 1, 1), (2, 1, 9), (2, 7, 1), (4, 13, 17)])
def test_plane_residuals_restore_to_the_same_codes_including_wrap_around(shape):
    codes = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    residuals = codes.copy()
    plane_residuals_(residuals)
    assert np.array_equal(plane_restore(residuals), codes)
    # the residual is code - (left + up - up_left) modulo 256
    c = codes.astype(np.int64)
    if shape[1] > 1 and shape[2] > 1:
        assert np.array_equal(residuals[:, 1:, 1:], (c[:, 1:, 1:] - c[:, 1:, :-1] - c[:, :-1, 1:] + c[:, :-1, :-1]) % 256)


def test_the_plane_predictor_turns_a_linear_ramp_into_zeros_after_the_first_row_and_column():
    y, x = np.mgrid[0:20, 0:30]
    codes = np.stack([(3 * y + 2 * x) % 256, (7 * y + 250 * x) % 256]).astype(np.uint8)
    plane_residuals_(codes)
    assert not codes[:, 1:, 1:].any()


def test_on_smooth_maps_the_plane_predictor_makes_an_int8_store_smaller_and_reads_back_the_same(tmp_path):
    sizes, reads = {}, {}
    for predictor in ("none", "plane"):
        layout = StoreLayout(LEVELS, STRIDES, CHANNELS, "int8", "stored", MAX_HW, shard_images=2, tile=16,
                             predictor=predictor)
        writer = TeacherFeatureWriter.open(str(tmp_path / predictor), layout, IDS, "toy", {"teacher": "toy"})
        written = entries(layout, noise=0.02)
        for shard in range(writer.num_shards):
            writer.write_shard(shard, written[2 * shard: 2 * shard + 2])
        writer.finalize()
        sizes[predictor] = store_bytes(tmp_path / predictor)
        store = TeacherFeatureStore(str(tmp_path / predictor))
        assert store.codec.predictor == predictor
        reads[predictor] = store.read(IDS[1], flip=True)
    assert sizes["plane"] < 0.8 * sizes["none"], sizes
    for level in LEVELS:
        assert np.array_equal(reads["plane"][level].numpy(), reads["none"][level].numpy())


def test_a_store_without_predictor_attribute_is_read_without_one_and_refuses_to_resume_with_one(tmp_path):
    """Format version 1 had no predictor: its int8 stores stay readable; resuming one asks for a rebuild."""
    layout = StoreLayout(LEVELS, STRIDES, CHANNELS, "int8", "stored", MAX_HW, shard_images=2, tile=16, predictor="none")
    writer = TeacherFeatureWriter.open(str(tmp_path / "v1"), layout, IDS, "toy", {"teacher": "toy"})
    written = entries(layout)
    writer.write_shard(0, written[:2])
    meta_path = tmp_path / "v1" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    assert "predictor" not in meta["attributes"]
    meta["attributes"]["format_version"] = 1
    meta_path.write_text(json.dumps(meta))
    store = TeacherFeatureStore(str(tmp_path / "v1"))
    assert store.codec.predictor == "none"
    x = written[0].features["orig"]["p2"]
    assert np.abs(store.read(IDS[0])["p2"].numpy() - x).max() <= (x.max() - x.min()) / 255  # half a step, twice
    with pytest.raises(StoreMismatchError, match="predictor: store has <missing>, expected plane"):
        TeacherFeatureWriter.open(str(tmp_path / "v1"), layout_for("int8"), IDS, "toy", {"teacher": "toy"})


def test_a_store_refuses_to_resume_with_another_step(tmp_path):
    build(tmp_path / "s", "int8-std0.3")
    with pytest.raises(StoreMismatchError, match="codec: store has int8-std0.3, expected int8-std0.25"):
        TeacherFeatureWriter.open(str(tmp_path / "s"), layout_for("int8-std0.25"), IDS, "toy", {"teacher": "toy"})


@pytest.mark.parametrize("name", ["int8-std", "int8-std0", "int8-stdx", "int8-std-1", "int8-std9"])
def test_malformed_int8_std_names_are_refused_with_an_example(name):
    with pytest.raises(ValueError, match=LOSSY_DEFAULT.replace(".", r"\.")):
        get_codec(name)


def test_int8_std_decodes_a_constant_channel_exactly_and_refuses_nan():
    codec = get_codec(LOSSY_DEFAULT)
    x = np.stack([np.full((3, 5), 2.5, np.float32), np.linspace(-1, 1, 15, dtype=np.float32).reshape(3, 5)])
    stored, params = codec.encode(x)
    assert np.array_equal(codec.decode(stored, params)[0], x[0])
    x[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode(x)

"""Specification of the lossy codec int8-std<a> (cache/codecs.py): its error bound, its format, its name.

int8-std<a> stores int8's codes (value = q * scale + offset per channel) with a step of `a` standard
deviations of the channel, and compresses the bytes with zstd unshuffled. Features are synthetic: smooth
maps plus noise, with per-channel scales and offsets and a few outliers, seeded by the image id.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cache import ImageEntry, StoreLayout, StoreMismatchError, TeacherFeatureStore, TeacherFeatureWriter, get_codec
from cache.codecs import LOSSY_DEFAULT

LEVELS = ("p2", "p3", "p4", "p5", "p6")
STRIDES = (4, 8, 16, 32, 64)
CHANNELS = 16
MAX_HW = (128, 128)
IDS = [3, 8, 21, 34]


def features(image_id: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Smooth signed maps plus noise, scaled and shifted per channel, with one large outlier per channel."""
    rng = np.random.default_rng(image_id)
    c, h, w = shape
    coarse = rng.standard_normal((c, h // 4 + 1, w // 4 + 1))
    smooth = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :h, :w]
    x = (smooth + 0.3 * rng.standard_normal((c, h, w))) * rng.lognormal(0.0, 1.0, (c, 1, 1)) + rng.normal(0, 2, (c, 1, 1))
    x[:, 0, 0] += 20 * x.std(axis=(1, 2))  # activations with a long tail, as FPN outputs have
    return x.astype(np.float32)


def layout_for(codec: str) -> StoreLayout:
    return StoreLayout(LEVELS, STRIDES, CHANNELS, codec, "stored", MAX_HW, shard_images=2, tile=16)


def entries(layout: StoreLayout, ids=IDS) -> list[ImageEntry]:
    out = []
    for image_id in ids:
        resized = (128, 96) if image_id % 2 else (96, 128)
        feats = {view: {level: features(image_id * 10 + v * 5 + i, (CHANNELS, *layout.valid_hw(level, resized)))
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


def test_int8_std_error_is_at_most_half_a_step_of_a_std_fractions_per_channel(tmp_path):
    a = 0.3
    store, written = build(tmp_path / "s", f"int8-std{a}")
    for entry in written:
        for view, flip in (("orig", False), ("hflip", True)):
            got = store.read(entry.image_id, flip=flip)
            for level in LEVELS:
                x = entry.features[view][level].reshape(CHANNELS, -1).astype(np.float64)
                err = got[level].numpy().reshape(CHANNELS, -1) - x
                step = np.maximum(a * x.std(axis=1), (x.max(axis=1) - x.min(axis=1)) / 255)
                # |error| <= step / 2, plus float32 rounding of the decode
                bound = step / 2 * (1 + 1e-4) + 1e-6 * np.abs(x).max(axis=1)
                assert np.all(np.abs(err).max(axis=1) <= bound), (entry.image_id, view, level)
                # so the RMS error of every channel is at most a / 2 of its standard deviation
                rms = np.sqrt((err ** 2).mean(axis=1))
                assert np.all(rms <= np.maximum(a / 2 * x.std(axis=1), bound)), (entry.image_id, view, level)


def test_int8_std_is_smaller_on_disk_than_int8_and_shrinks_as_its_step_grows(tmp_path):
    sizes = {}
    for codec in ("int8", LOSSY_DEFAULT, "int8-std0.3", "int8-std0.6"):
        build(tmp_path / codec, codec)
        sizes[codec] = store_bytes(tmp_path / codec)
    assert sizes["int8"] > sizes[LOSSY_DEFAULT] > sizes["int8-std0.3"] > sizes["int8-std0.6"], sizes


def test_int8_std_decodes_with_int8s_formula_from_its_side_arrays(tmp_path):
    """A reader in another language needs nothing new: codes, scale and offset, as for int8."""
    import zarr

    store, _ = build(tmp_path / "s", "int8-std0.5")
    group = zarr.open_group(str(tmp_path / "s"), mode="r")
    row, level = 1, "p3"
    h, w = store.layout.valid_hw(level, store.sizes(IDS[row])["resized_hw"])
    q = group[f"features/{level}"][row, 0, :, :h, :w]
    scale, offset = group[f"scale/{level}"][row, 0], group[f"offset/{level}"][row, 0]
    assert q.dtype == np.uint8
    by_hand = q.astype(np.float32) * scale[:, None, None] + offset[:, None, None]
    assert np.array_equal(by_hand, store.read(IDS[row])[level].numpy())
    meta = json.loads((tmp_path / "s" / "features" / level / "zarr.json").read_text())
    blosc = [c for c in meta["codecs"][0]["configuration"]["codecs"] if c["name"] == "blosc"][0]["configuration"]
    assert (blosc["cname"], blosc["shuffle"], blosc["typesize"]) == ("zstd", "noshuffle", 1)
    assert json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"]["codec"] == "int8-std0.5"


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

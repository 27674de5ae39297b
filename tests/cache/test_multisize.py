"""Specification of multi-size stores (format 3): one (short edge, flip) view per size, read by (size, flip).

Synthetic features as in test_store.py; the resized size of an image depends on the short edge, as
ResizeShortestEdge's would.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import zarr

from cache import ImageEntry, StoreLayout, StoreMismatchError, TeacherFeatureStore, TeacherFeatureWriter, verify_store
from tests.cache.test_store import CHANNELS, FINGERPRINT, IDS, LEVELS, STRIDES, _crc_checked, _read_bytes, shard_file

SIZES = (64, 96, 128)
MAX_HW = (160, 192)


def ms_layout(codec: str = "fp16", flip: str = "stored", sizes=SIZES) -> StoreLayout:
    return StoreLayout(LEVELS, STRIDES, CHANNELS, codec, flip, MAX_HW, shard_images=2, tile=16, sizes=sizes)


def resized_at(image_id: int, size: int) -> tuple[int, int]:
    """A 2:3 (or 3:2) image with its short edge resized to `size`."""
    return (size, size * 3 // 2) if image_id % 2 else (size * 3 // 2, size)


def features_at(image_id: int, size: int, flip: str, layout: StoreLayout) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([image_id, size, flip == "hflip"])
    return {lv: (rng.standard_normal((CHANNELS, *layout.valid_hw(lv, resized_at(image_id, size)))) * 3 + 1)
            .astype(np.float32) for lv in LEVELS}


def ms_entry(image_id: int, layout: StoreLayout) -> ImageEntry:
    return ImageEntry(image_id, (300, 450), {s: resized_at(image_id, s) for s in layout.sizes},
                      {s: tuple(32 * math.ceil(v / 32) for v in resized_at(image_id, s)) for s in layout.sizes},
                      {(s, f): features_at(image_id, s, f, layout) for s in layout.sizes for f in layout.flip_views})


def build_ms(path, layout: StoreLayout, shards=None) -> TeacherFeatureWriter:
    writer = TeacherFeatureWriter.open(str(path), layout, IDS, "toy_train", FINGERPRINT)
    for shard in writer.pending_shards() if shards is None else shards:
        writer.write_shard(shard, [ms_entry(int(writer.image_ids[r]), layout) for r in writer.shard_rows(shard)])
    return writer


def test_layout_views_are_size_flip_pairs_and_the_store_is_format_3(tmp_path):
    layout = ms_layout()
    assert layout.views == ((64, "orig"), (64, "hflip"), (96, "orig"), (96, "hflip"), (128, "orig"), (128, "hflip"))
    assert layout.view_index("hflip", 96) == 3 and layout.view_name(3) == "96/hflip"
    assert StoreLayout.from_attrs(layout.to_attrs()) == layout
    build_ms(tmp_path / "s", layout)
    attrs = json.loads(_read_bytes(str(tmp_path / "s"), "zarr.json"))["attributes"]
    assert attrs["format_version"] == 3 and attrs["sizes"] == [64, 96, 128]
    assert attrs["views"] == [[64, "orig"], [64, "hflip"], [96, "orig"], [96, "hflip"], [128, "orig"], [128, "hflip"]]
    group = zarr.open_group(str(tmp_path / "s"), mode="r")
    assert group["resized_hw"].shape == (len(IDS), 3, 2) and group["features/p2"].shape[1] == 6


def test_a_layout_without_sizes_is_format_2_and_one_size_is_format_3_with_one_set_of_views():
    legacy = StoreLayout(LEVELS, STRIDES, CHANNELS, "fp16", "stored", MAX_HW)
    assert legacy.format_version == 2 and legacy.views == ("orig", "hflip") and "sizes" not in legacy.to_attrs()
    one = replace(legacy, sizes=(128,))
    assert one.format_version == 3 and one.views == ((128, "orig"), (128, "hflip")) and one.to_attrs()["sizes"] == [128]
    with pytest.raises(ValueError, match="ascending"):
        replace(legacy, sizes=(128, 96))


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_every_size_and_flip_reads_back_its_own_features_and_sizes(tmp_path, codec):
    layout = ms_layout(codec)
    build_ms(tmp_path / "s", layout)
    store = TeacherFeatureStore(str(tmp_path / "s"))
    for image_id in IDS:
        for size in SIZES:
            assert store.sizes(image_id, size)["resized_hw"] == resized_at(image_id, size)
            for flip in (False, True):
                got = store.read(image_id, flip=flip, size=size)
                codes = store.read_codes(image_id, flip=flip, size=size)
                for level, x in features_at(image_id, size, "hflip" if flip else "orig", layout).items():
                    assert tuple(got[level].shape) == x.shape
                    assert torch.equal(codes[level].decode(torch.device("cpu")), got[level])
                    if codec == "fp16":
                        assert np.array_equal(got[level].numpy(), x.astype(np.float16).astype(np.float32))
                    else:
                        flat = x.reshape(CHANNELS, -1)
                        half_step = (flat.max(1) - flat.min(1)) / 255 / 2
                        err = np.abs(got[level].numpy() - x).reshape(CHANNELS, -1).max(1)
                        assert np.all(err <= half_step * (1 + 1e-4) + 1e-6 * np.abs(flat).max(1)), (image_id, size, level)


def test_a_read_must_name_a_stored_size(tmp_path):
    build_ms(tmp_path / "s", ms_layout())
    store = TeacherFeatureStore(str(tmp_path / "s"))
    with pytest.raises(KeyError, match=r"holds short edges \[64, 96, 128\]; name the one to read"):
        store.read(IDS[0])
    with pytest.raises(KeyError, match=r"short edge 112 is not stored; this store holds \[64, 96, 128\]"):
        store.read(IDS[0], size=112)


def test_mirror_flip_serves_the_mirrored_orig_view_of_the_same_size(tmp_path):
    build_ms(tmp_path / "s", ms_layout("int8", "mirror"))
    store = TeacherFeatureStore(str(tmp_path / "s"))
    orig, flipped = store.read(307, size=96), store.read(307, flip=True, size=96)
    assert all(torch.equal(flipped[lv], torch.flip(orig[lv], dims=[-1])) for lv in LEVELS)


def test_an_interrupted_multi_size_store_resumes_bitwise_equal_and_verifies(tmp_path):
    layout = ms_layout("int8")
    build_ms(tmp_path / "full", layout)
    build_ms(tmp_path / "resumed", layout, shards=[1, 3])
    resumed = TeacherFeatureWriter.open(str(tmp_path / "resumed"), layout, IDS, "toy_train", FINGERPRINT)
    assert resumed.pending_shards() == [0, 2]
    build_ms(tmp_path / "resumed", layout)
    full, again = zarr.open_group(str(tmp_path / "full"), mode="r"), zarr.open_group(str(tmp_path / "resumed"), mode="r")
    for level in LEVELS:
        assert np.array_equal(full[f"features/{level}"][:], again[f"features/{level}"][:]), level
        assert np.array_equal(full[f"scale/{level}"][:], again[f"scale/{level}"][:]), level
    report = verify_store(str(tmp_path / "resumed"), progress=False)
    assert report.intact and report.ok == len(IDS)


def test_verify_and_the_reader_name_a_lost_object_of_one_size(tmp_path):
    layout = ms_layout("fp16")
    build_ms(tmp_path / "s", layout)
    os.remove(shard_file(tmp_path / "s", "p4", 1, view=layout.view_index("hflip", 128)))  # images 307, 409
    reasons = dict(verify_store(str(tmp_path / "s"), progress=False).bad)
    assert set(reasons) == {307, 409} and all("p4 (view 128/hflip)" in r for r in reasons.values())
    store = TeacherFeatureStore(str(tmp_path / "s"))
    store.read(307, flip=True, size=96)  # the other sizes are intact
    with pytest.raises(KeyError, match=r"image 307 .*p4 \(view 128/hflip\): shard object features/p4/c/1/5/0/0/0"):
        store.read(307, flip=True, size=128)


def test_a_resume_with_other_sizes_is_refused_naming_sizes_and_views(tmp_path):
    build_ms(tmp_path / "s", ms_layout(), shards=[0])
    with pytest.raises(StoreMismatchError) as info:
        TeacherFeatureWriter.open(str(tmp_path / "s"), ms_layout(sizes=(64, 128)), IDS, "toy_train", FINGERPRINT)
    assert [line.split(":")[0] for line in info.value.differences] == ["sizes", "views"]


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_a_format_2_store_is_read_and_resumed_by_a_one_size_request(tmp_path, codec):
    from tests.cache.test_store import entry_for, make_layout, synthetic_features, write_shards

    legacy = make_layout(codec, "stored")
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), legacy, IDS, "toy_train", FINGERPRINT)
    write_shards(writer, [0, 1])
    assert json.loads(_read_bytes(str(tmp_path / "s"), "zarr.json"))["attributes"]["format_version"] == 2
    resumed = TeacherFeatureWriter.open(str(tmp_path / "s"), replace(legacy, sizes=(128,)), IDS, "toy_train", FINGERPRINT)
    assert resumed.layout.sizes == () and resumed.pending_shards() == [2, 3]  # written as format 2, as it was
    for shard in resumed.pending_shards():  # stage one's entries name their size; one size fits format 2
        ids = [int(resumed.image_ids[r]) for r in resumed.shard_rows(shard)]
        entries = [entry_for(i, legacy) for i in ids]
        for e in entries:
            e.resized_hw, e.padded_hw = {128: e.resized_hw}, {128: e.padded_hw}
            e.features = {(128, view): maps for view, maps in e.features.items()}
        resumed.write_shard(shard, entries)
    store = TeacherFeatureStore(str(tmp_path / "s"))
    assert store.attrs["format_version"] == 2 and verify_store(str(tmp_path / "s"), progress=False).intact
    for image_id in IDS:
        got = store.read(image_id, flip=True, size=128)  # any size names the one a format 2 store holds
        want = synthetic_features(image_id, legacy)["hflip"]["p3"]
        assert got["p3"].shape == want.shape
        if codec == "fp16":
            assert np.array_equal(got["p3"].numpy(), want.astype(np.float16).astype(np.float32))


def test_info_counts_raw_bytes_at_every_size_and_reports_bytes_per_view(tmp_path):
    layout = ms_layout("int8")
    build_ms(tmp_path / "s", layout)
    info = TeacherFeatureStore(str(tmp_path / "s")).info(disk_usage=True)  # bytes on disk need a listing
    raw = sum(CHANNELS * math.ceil(resized_at(i, z)[0] / s) * math.ceil(resized_at(i, z)[1] / s) * 4 * 2
              for i in IDS for z in SIZES for s in STRIDES)
    assert info.raw_fp32_bytes == raw and info.sizes == list(SIZES) and len(info.views) == 6
    assert info.bytes_per_view == pytest.approx(info.bytes_on_disk / (len(IDS) * 6))
    by_view = info.feature_bytes_per_image_by_view
    assert list(by_view) == [layout.view_name(v) for v in range(6)]
    assert by_view["64/orig"] < by_view["96/orig"] < by_view["128/orig"]  # more positions, more bytes
    assert sum(by_view.values()) * len(IDS) < info.bytes_on_disk


def test_multi_size_store_decodes_by_hand_following_the_format_document(tmp_path):
    """Image 307, view (96, hflip), p3 of an fp16 store, with json, numpy, blosc and crc32c only."""
    from numcodecs import blosc

    build_ms(tmp_path / "s", ms_layout("fp16"))
    root = str(tmp_path / "s")
    attrs = json.loads(_read_bytes(root, "zarr.json"))["attributes"]
    s, channels, sizes = attrs["shard_images"], attrs["channels"], attrs["sizes"]
    image_ids = np.frombuffer(b"".join(_crc_checked(_read_bytes(root, "image_id", "c", str(k)))
                                       for k in range(len(IDS) // s)), "<i8")
    row = int(np.flatnonzero(image_ids == 307)[0])
    view = attrs["views"].index([96, "hflip"])
    z = sizes.index(96)
    level, stride = attrs["levels"][1], attrs["strides"][1]
    k, r = divmod(row, s)
    assert np.frombuffer(_crc_checked(_read_bytes(root, "status", "c", str(k))), "u1")[r] == 1
    resized = np.frombuffer(_crc_checked(_read_bytes(root, "resized_hw", "c", str(k), "0", "0")), "<i4")
    h, w = (math.ceil(int(v) / stride) for v in resized.reshape(s, len(sizes), 2)[r, z])
    max_h, max_w = (math.ceil(v / stride) for v in attrs["max_hw"])
    tile_h, tile_w = min(attrs["tile"], max_h), min(attrs["tile"], max_w)
    ny, nx = -(-max_h // tile_h), -(-max_w // tile_w)
    shard = _read_bytes(root, "features", level, "c", str(k), str(view), "0", "0", "0")
    index_size = 16 * s * ny * nx + 4
    index = np.frombuffer(_crc_checked(shard[-index_size:]), "<u8").reshape(s, 1, 1, ny, nx, 2)
    x = np.zeros((channels, ny * tile_h, nx * tile_w), np.float16)
    for ty in range(-(-h // tile_h)):
        for tx in range(-(-w // tile_w)):
            offset, nbytes = (int(v) for v in index[r, 0, 0, ty, tx])
            if offset != 2**64 - 1:
                tile = np.frombuffer(blosc.decompress(_crc_checked(shard[offset: offset + nbytes])), "<f2")
                x[:, ty * tile_h:(ty + 1) * tile_h, tx * tile_w:(tx + 1) * tile_w] = tile.reshape(channels, tile_h, tile_w)
    by_hand = x[:, :h, :w].astype(np.float32)
    assert np.array_equal(by_hand, TeacherFeatureStore(root).read(307, flip=True, size=96)[level].numpy())

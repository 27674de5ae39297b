"""Specification of the teacher feature store (cache/): round trips, cropping, resume, damage, workers.

Features are synthetic: per-channel scales and offsets, smooth signed signals plus noise, drawn from a
generator seeded by the image id, so any test can regenerate the exact input of any image.
"""

from __future__ import annotations

import json
import math
import re
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import zarr

from cache import (
    BackgroundShardWriter,
    ImageEntry,
    NotAFeatureStoreError,
    StoreEntryError,
    StoreInfo,
    StoreLayout,
    StoreMismatchError,
    TeacherFeatureStore,
    TeacherFeatureWriter,
    diff_fingerprints,
    fingerprint_sha256,
    get_codec,
    verify_store,
)

LEVELS = ("p2", "p3", "p4", "p5", "p6")
STRIDES = (4, 8, 16, 32, 64)
CHANNELS = 32  # 256 in the real model; fewer keeps the tests fast without changing any code path
MAX_HW = (160, 160)
FINGERPRINT = {"model": {"weights": "teacher_r101.pth", "config_sha256": "ab12"}, "input": {"min_size": 800}}
IDS = [101, 205, 307, 409, 511, 613, 715, 817]  # 4 shards of 2 images
from tests.conftest import REPO  # noqa: E402


def make_layout(codec: str = "fp16", flip: str = "stored", shard_images: int = 2, tile: int = 16,
                sizes: tuple[int, ...] = ()) -> StoreLayout:
    """sizes=(): a format 2 layout (one size, not recorded); a recorded size makes a format 3 store."""
    return StoreLayout(LEVELS, STRIDES, CHANNELS, codec, flip, MAX_HW, shard_images=shard_images, tile=tile, sizes=sizes)


def resized_hw_of(image_id: int) -> tuple[int, int]:
    return (100, 150) if image_id % 2 else (150, 100)


def synthetic_features(image_id: int, layout: StoreLayout) -> dict[str, dict[str, np.ndarray]]:
    """view -> level -> float32 (C, h_l, w_l): smooth signed maps with per-channel scale and offset."""
    rng = np.random.default_rng(image_id)
    out: dict[str, dict[str, np.ndarray]] = {}
    for view in layout.views:
        out[view] = {}
        for level in layout.levels:
            h, w = layout.valid_hw(level, resized_hw_of(image_id))
            coarse = rng.standard_normal((CHANNELS, h // 4 + 1, w // 4 + 1))
            smooth = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :h, :w]
            noise = 0.2 * rng.standard_normal((CHANNELS, h, w))
            scale = rng.lognormal(0.0, 1.0, size=(CHANNELS, 1, 1))
            offset = rng.normal(0.0, 2.0, size=(CHANNELS, 1, 1))
            out[view][level] = ((smooth + noise) * scale + offset).astype(np.float32)
    return out


def entry_for(image_id: int, layout: StoreLayout) -> ImageEntry:
    resized = resized_hw_of(image_id)
    return ImageEntry(image_id, (resized[0] * 3, resized[1] * 3), resized, MAX_HW, synthetic_features(image_id, layout))


def write_shards(writer: TeacherFeatureWriter, shards: list[int] | None = None) -> None:
    for shard in writer.pending_shards() if shards is None else shards:
        ids = [int(writer.image_ids[r]) for r in writer.shard_rows(shard)]
        writer.write_shard(shard, [entry_for(i, writer.layout) for i in ids])


def build_store(path, layout: StoreLayout, ids=IDS, fingerprint=FINGERPRINT, finalize: bool = True) -> TeacherFeatureWriter:
    """A store with every shard written; finalize=False leaves it as a run in progress (no consolidated rows)."""
    writer = TeacherFeatureWriter.open(str(path), layout, ids, "toy_train", fingerprint)
    write_shards(writer)
    if finalize:
        writer.finalize({"images_per_second": 1.0})
    return writer


def shard_file(store_path, level: str, shard: int, view: int = 0) -> str:
    return os.path.join(str(store_path), "features", level, "c", str(shard), str(view), "0", "0", "0")


# ---------------------------------------------------------------- round trips


def test_fp16_round_trip_equals_float16_cast_for_every_level_and_view(tmp_path):
    layout = make_layout("fp16", "stored")
    build_store(tmp_path / "s", layout)
    store = TeacherFeatureStore(str(tmp_path / "s"))
    for image_id in IDS:
        expected = synthetic_features(image_id, layout)
        for view, flip in (("orig", False), ("hflip", True)):
            got = store.read(image_id, flip=flip)
            assert sorted(got) == list(LEVELS)
            for level in LEVELS:
                want = expected[view][level].astype(np.float16).astype(np.float32)
                assert got[level].dtype == torch.float32
                assert np.array_equal(got[level].numpy(), want), (image_id, view, level)


def test_int8_round_trip_within_half_step_per_channel_and_relative_l2_below_1pct(tmp_path):
    layout = make_layout("int8", "stored")
    build_store(tmp_path / "s", layout)
    store = TeacherFeatureStore(str(tmp_path / "s"))
    worst_rel_l2 = 0.0
    for image_id in IDS:
        expected = synthetic_features(image_id, layout)
        for view, flip in (("orig", False), ("hflip", True)):
            got = store.read(image_id, flip=flip)
            for level in LEVELS:
                x = expected[view][level]
                err = np.abs(got[level].numpy() - x).reshape(CHANNELS, -1).max(axis=1)
                flat = x.reshape(CHANNELS, -1)
                half_step = (flat.max(axis=1) - flat.min(axis=1)) / 255 / 2
                # float32 rounding in decode adds ~1e-7 of the magnitude on top of the half step
                bound = half_step * (1 + 1e-4) + 1e-6 * np.abs(flat).max(axis=1)
                assert np.all(err <= bound), (image_id, view, level, float((err / bound).max()))
                rel = np.linalg.norm(got[level].numpy() - x) / np.linalg.norm(x)
                worst_rel_l2 = max(worst_rel_l2, float(rel))
    assert worst_rel_l2 < 0.01, f"relative L2 error {worst_rel_l2:.4%} >= 1%"


def test_int8_codec_constant_channel_decodes_exactly():
    codec = get_codec("int8")
    x = np.full((3, 4, 5), 2.5, dtype=np.float32)
    x[1] = -7.0
    stored, params = codec.encode(x)
    assert np.all(params.scale == 1.0)
    assert np.array_equal(codec.decode(stored, params), x)


def test_unknown_codec_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="fp16.*int8"):
        get_codec("bf16")
    with pytest.raises(ValueError, match="unknown codec 'bf16'"):
        make_layout("bf16")


def test_fp16_refuses_values_beyond_its_range():
    with pytest.raises(ValueError, match="int8"):
        get_codec("fp16").encode(np.full((1, 2, 2), 1e6, dtype=np.float32))


# ---------------------------------------------------------------- layout and cropping


def test_layout_level_shapes_are_whole_tiles_and_valid_size_is_ceil_of_resized_over_stride():
    layout = make_layout(tile=16)
    assert layout.level_shape("p2") == (48, 48)  # ceil(160/4)=40 rounded up to 16-tiles
    assert layout.tile_hw("p2") == (16, 16)
    assert layout.level_shape("p5") == (5, 5) and layout.tile_hw("p5") == (5, 5)  # smaller than a tile
    assert layout.valid_hw("p3", (100, 150)) == (13, 19)
    assert StoreLayout.from_attrs(layout.to_attrs()) == layout
    assert make_layout(flip="mirror").views == ("orig",) and make_layout(flip="stored").views == ("orig", "hflip")


@pytest.mark.parametrize("resized", [(100, 150), (150, 100), (97, 131)])
def test_read_is_cropped_to_ceil_of_resized_size_over_stride(tmp_path, resized):
    layout = make_layout("fp16", "mirror")
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, [1, 2], "toy", FINGERPRINT)
    entries = []
    for image_id in (1, 2):
        feats = {"orig": {}}
        for level, stride in zip(LEVELS, STRIDES):
            h, w = -(-resized[0] // stride), -(-resized[1] // stride)
            feats["orig"][level] = np.ones((CHANNELS, h, w), np.float32)
        entries.append(ImageEntry(image_id, resized, resized, MAX_HW, feats))
    writer.write_shard(0, entries)
    got = TeacherFeatureStore(str(tmp_path / "s")).read(2)
    for level, stride in zip(LEVELS, STRIDES):
        assert tuple(got[level].shape) == (CHANNELS, -(-resized[0] // stride), -(-resized[1] // stride))
        assert torch.all(got[level] == 1)


def test_write_shard_rejects_wrong_order_and_wrong_shapes_with_clear_errors(tmp_path):
    layout = make_layout()
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, IDS, "toy", FINGERPRINT)
    with pytest.raises(ValueError, match="row 0 holds image 101"):
        writer.write_shard(0, [entry_for(205, layout), entry_for(101, layout)])
    bad = entry_for(101, layout)
    bad.features["orig"]["p3"] = bad.features["orig"]["p3"][:, :-1]
    with pytest.raises(ValueError, match=r"orig/p3: expected float \(C, h, w\) = \(32, 13, 19\)"):
        writer.write_shard(0, [bad, entry_for(205, layout)])
    with pytest.raises(ValueError, match="2 rows"):
        writer.write_shard(0, [entry_for(101, layout)])


# ---------------------------------------------------------------- commit protocol and resume


def test_resume_lists_exactly_the_unwritten_shards_and_matches_an_uninterrupted_store(tmp_path):
    layout = make_layout("fp16", "stored")
    build_store(tmp_path / "full", layout)

    first = TeacherFeatureWriter.open(str(tmp_path / "resumed"), layout, IDS, "toy_train", FINGERPRINT)
    assert first.num_shards == 4 and first.pending_shards() == [0, 1, 2, 3]
    write_shards(first, [0, 2])
    del first  # the "kill"

    again = TeacherFeatureWriter.open(str(tmp_path / "resumed"), layout, IDS, "toy_train", FINGERPRINT)
    assert again.pending_shards() == [1, 3]
    assert again.pending_shards(rank=0, world_size=2) == [] and again.pending_shards(rank=1, world_size=2) == [1, 3]
    write_shards(again)
    again.finalize({"images_per_second": 1.0})
    assert again.pending_shards() == []

    full, resumed = zarr.open_group(str(tmp_path / "full"), mode="r"), zarr.open_group(str(tmp_path / "resumed"), mode="r")
    for level in LEVELS:
        a, b = full[f"features/{level}"][:], resumed[f"features/{level}"][:]
        assert np.array_equal(a.view(np.uint16), b.view(np.uint16)), level  # bitwise
    store_full, store_resumed = TeacherFeatureStore(str(tmp_path / "full")), TeacherFeatureStore(str(tmp_path / "resumed"))
    for image_id in IDS:
        for flip in (False, True):
            x, y = store_full.read(image_id, flip), store_resumed.read(image_id, flip)
            assert all(torch.equal(x[lv], y[lv]) for lv in LEVELS)


def test_shard_written_without_its_status_chunk_is_pending_and_not_served(tmp_path):
    layout = make_layout("fp16", "mirror")
    writer = build_store(tmp_path / "s", layout, finalize=False)  # a run in progress
    # A kill after the features but before the commit marker leaves exactly this: no status chunk.
    os.remove(os.path.join(str(tmp_path / "s"), "status", "c", "1"))
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, IDS, "toy_train", FINGERPRINT)
    assert writer.pending_shards() == [1]
    store = TeacherFeatureStore(str(tmp_path / "s"))
    assert 409 not in store and 101 in store
    with pytest.raises(StoreEntryError, match=r"image 409 .*not written"):
        store.read(409)
    assert store.sizes(409)["status"] == 0
    store.read(101)  # committed shards stay readable


def test_resume_rewrites_a_torn_shard_object_left_by_a_kill(tmp_path):
    layout = make_layout("fp16", "mirror")
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, IDS, "toy_train", FINGERPRINT)
    write_shards(writer, [0, 1])
    path = shard_file(tmp_path / "s", "p2", 1)
    with open(path, "r+b") as f:  # a torn object (a non-atomic store) and no commit marker
        f.truncate(os.path.getsize(path) // 3)
    os.remove(os.path.join(str(tmp_path / "s"), "status", "c", "1"))
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, IDS, "toy_train", FINGERPRINT)
    assert writer.pending_shards() == [1, 2, 3]
    write_shards(writer)
    assert verify_store(str(tmp_path / "s"), progress=False).intact


def test_torn_status_chunk_counts_as_pending_and_a_rewrite_repairs_it(tmp_path):
    layout = make_layout("fp16", "mirror")
    build_store(tmp_path / "s", layout, finalize=False)  # read shard by shard (a finalized store: below)
    with open(os.path.join(str(tmp_path / "s"), "status", "c", "1"), "r+b") as f:
        f.truncate(1)
    store = TeacherFeatureStore(str(tmp_path / "s"))
    with pytest.raises(StoreEntryError, match=r"image 307 .*damaged status chunk"):
        store.read(307)
    assert {i for i, _ in verify_store(str(tmp_path / "s"), progress=False).bad} == shard_ids(1)
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, IDS, "toy_train", FINGERPRINT)
    assert writer.pending_shards() == [1]
    write_shards(writer)
    assert verify_store(str(tmp_path / "s"), progress=False).intact


def test_damaged_size_chunk_is_refused_and_repaired_by_rewriting_its_shard(tmp_path):
    layout = make_layout("int8", "mirror")
    writer = build_store(tmp_path / "s", layout, finalize=False)  # read shard by shard (a finalized store: below)
    path = os.path.join(str(tmp_path / "s"), "resized_hw", "c", "2", "0")
    with open(path, "r+b") as f:
        f.write(b"\xff\xff")
    store = TeacherFeatureStore(str(tmp_path / "s"))
    assert 511 not in store
    with pytest.raises(StoreEntryError, match=r"image 511 .*damaged resized_hw chunk"):
        store.read(511)
    assert {i for i, _ in verify_store(str(tmp_path / "s"), progress=False).bad} == shard_ids(2)
    write_shards(writer, [2])
    assert verify_store(str(tmp_path / "s"), progress=False).intact


def test_rewriting_a_committed_shard_keeps_the_store_consistent(tmp_path):
    layout = make_layout("int8", "mirror")
    writer = build_store(tmp_path / "s", layout)
    write_shards(writer, [2])
    report = verify_store(str(tmp_path / "s"), progress=False)
    assert report.intact and report.ok == len(IDS)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"fingerprint": {**FINGERPRINT, "model": {"weights": "other.pth", "config_sha256": "ab12"}}}, "fingerprint.model.weights"),
        ({"fingerprint": {"model": FINGERPRINT["model"]}}, "fingerprint.input"),
        ({"layout": make_layout("int8", "mirror")}, "codec"),
        ({"layout": make_layout("fp16", "stored")}, "flip"),
        ({"image_ids": IDS[:-1] + [999]}, "image_ids"),
        ({"dataset": "toy_val"}, "dataset"),
    ],
)
def test_reopening_with_other_settings_names_the_differing_field(tmp_path, change, field):
    args = {"layout": make_layout("fp16", "mirror"), "image_ids": IDS, "dataset": "toy_train", "fingerprint": FINGERPRINT}
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), **args)
    write_shards(writer, [0])
    with pytest.raises(StoreMismatchError) as info:
        TeacherFeatureWriter.open(str(tmp_path / "s"), **{**args, **change})
    assert field in str(info.value) and str(tmp_path / "s") in str(info.value)
    # overwrite=True rebuilds it with the new settings
    rebuilt = TeacherFeatureWriter.open(str(tmp_path / "s"), **{**args, **change}, overwrite=True)
    assert rebuilt.pending_shards() == list(range(rebuilt.num_shards))


def _with(layout: StoreLayout, **changes) -> StoreLayout:
    from dataclasses import replace

    return replace(layout, **changes)


@pytest.mark.parametrize(
    "stored, requested, field",
    [
        # A store built with DISTILL.CACHE.RPN True, resumed under RPN False, and the other way round.
        (_with(make_layout("fp16", "mirror"), rpn_anchors=1), make_layout("fp16", "mirror"), "rpn_anchors"),
        (make_layout("fp16", "mirror"), _with(make_layout("fp16", "mirror"), rpn_anchors=1), "rpn_anchors"),
        # Plane-predicted codes resumed by a writer that would store plain codes, and the other way round.
        (make_layout("int8", "mirror"), _with(make_layout("int8", "mirror"), predictor="none"), "predictor"),
        (_with(make_layout("int8", "mirror"), predictor="none"), make_layout("int8", "mirror"), "predictor"),
    ],
)
def test_resume_refuses_an_optional_layout_attribute_present_on_one_side_only(tmp_path, stored, requested, field):
    args = {"image_ids": IDS, "dataset": "toy_train", "fingerprint": FINGERPRINT}
    TeacherFeatureWriter.open(str(tmp_path / "s"), stored, **args)
    with pytest.raises(StoreMismatchError) as info:
        TeacherFeatureWriter.open(str(tmp_path / "s"), requested, **args)
    assert [line.split(":")[0] for line in info.value.differences] == [field]


def test_resume_refuses_a_store_attribute_this_code_does_not_know_naming_it(tmp_path):
    """A layout attribute of a later writer (one to come) is a difference too, not something to ignore."""
    layout, args = make_layout("fp16", "mirror"), {"image_ids": IDS, "dataset": "toy_train", "fingerprint": FINGERPRINT}
    TeacherFeatureWriter.open(str(tmp_path / "s"), layout, **args)
    zarr.open_group(str(tmp_path / "s"), mode="r+").attrs["future_maps"] = ["boxes"]
    with pytest.raises(StoreMismatchError, match=r'future_maps: store has \["boxes"\], expected <missing>'):
        TeacherFeatureWriter.open(str(tmp_path / "s"), layout, **args)


def test_resume_refuses_a_fingerprint_field_present_on_one_side_only(tmp_path):
    layout, args = make_layout("fp16", "mirror"), {"image_ids": IDS, "dataset": "toy_train"}
    TeacherFeatureWriter.open(str(tmp_path / "s"), layout, **args, fingerprint={**FINGERPRINT, "rpn": {"anchors": 3}})
    with pytest.raises(StoreMismatchError, match=r"fingerprint\.rpn: store has .*expected <missing>"):
        TeacherFeatureWriter.open(str(tmp_path / "s"), layout, **args, fingerprint=FINGERPRINT)


def test_reader_check_fingerprint_lists_differences(tmp_path):
    build_store(tmp_path / "s", make_layout("fp16", "mirror"))
    store = TeacherFeatureStore(str(tmp_path / "s"))
    store.check_fingerprint(json.loads(json.dumps(FINGERPRINT)))
    with pytest.raises(StoreMismatchError, match=r"fingerprint\.input\.min_size: store has 800, expected 640"):
        store.check_fingerprint({**FINGERPRINT, "input": {"min_size": 640}})


def test_store_mismatch_error_also_takes_a_plain_message():
    assert str(StoreMismatchError("store /x was built for dataset 'a'")) == "store /x was built for dataset 'a'"
    error = StoreMismatchError("/x", ["codec: store has \"fp16\", expected \"int8\""])
    assert "/x" in str(error) and "codec" in str(error) and error.differences


def test_fingerprint_hash_is_canonical_and_diff_uses_dotted_names():
    assert fingerprint_sha256({"b": 1, "a": [1, 2]}) == fingerprint_sha256({"a": (1, 2), "b": 1})
    lines = diff_fingerprints({"a": {"x": 1, "y": 2}, "b": 3}, {"a": {"x": 1, "y": 5}, "c": 4})
    assert lines == [
        "a.y: store has 5, expected 2",
        "b: store has <missing>, expected 3",
        "c: store has 4, expected <missing>",
    ]


def test_writer_refuses_to_touch_a_directory_that_is_not_a_store(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("precious")
    with pytest.raises(NotAFeatureStoreError, match="refusing"):
        TeacherFeatureWriter.open(str(tmp_path / "data"), make_layout(), IDS, "toy", FINGERPRINT, overwrite=True)
    assert (tmp_path / "data" / "keep.txt").exists()
    with pytest.raises(NotAFeatureStoreError):
        TeacherFeatureStore(str(tmp_path / "data"))


# ---------------------------------------------------------------- consolidated row index


def _per_shard_rows(path) -> dict:
    store = TeacherFeatureStore(str(path))
    rows = store._load_per_shard_rows()
    return {"status": rows.status, "resized_hw": rows.resized_hw, "image_ids": rows.image_ids}


def test_a_finalized_store_is_opened_from_its_consolidated_row_index_equal_to_the_shards(tmp_path):
    build_store(tmp_path / "s", make_layout("fp16", "mirror", sizes=(100,)))
    store = TeacherFeatureStore(str(tmp_path / "s"))
    assert store.rows_source == "consolidated_rows"
    truth = _per_shard_rows(tmp_path / "s")
    assert np.array_equal(store.image_ids, truth["image_ids"]) and np.array_equal(store._status, truth["status"])
    assert np.array_equal(store._resized_hw, truth["resized_hw"])
    assert verify_store(str(tmp_path / "s"), progress=False).intact


def test_the_first_shard_write_after_finalize_drops_the_index_so_readers_see_the_shards_until_the_next(tmp_path):
    layout = make_layout("fp16", "mirror", sizes=(100,))
    build_store(tmp_path / "s", layout)
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, IDS, "toy_train", FINGERPRINT)
    assert TeacherFeatureStore(str(tmp_path / "s")).rows_source == "consolidated_rows"  # opening changes nothing
    entries = [entry_for(IDS[2], layout), ImageEntry(IDS[3], (0, 0), (0, 0), (0, 0), None, error="now unreadable")]
    writer.write_shard(1, entries)
    store = TeacherFeatureStore(str(tmp_path / "s"))
    assert store.rows_source == "per-shard arrays" and IDS[3] not in store and store.sizes(IDS[3])["status"] == 2
    writer.finalize({})
    store = TeacherFeatureStore(str(tmp_path / "s"))
    assert store.rows_source == "consolidated_rows" and store.sizes(IDS[3])["status"] == 2
    assert verify_store(str(tmp_path / "s"), progress=False).intact


def test_damage_to_a_finalized_stores_shard_rows_is_reported_by_verify_while_readers_serve_the_index(tmp_path):
    layout = make_layout("fp16", "mirror", sizes=(100,))
    writer = build_store(tmp_path / "s", layout)
    with open(os.path.join(str(tmp_path / "s"), "status", "c", "1"), "r+b") as f:
        f.truncate(1)
    store = TeacherFeatureStore(str(tmp_path / "s"))
    assert 307 in store  # the index holds its row, and its features are intact
    want = synthetic_features(307, layout)[layout.views[0]]
    assert all(np.array_equal(store.read(307)[lv].numpy(), want[lv].astype(np.float16).astype(np.float32)) for lv in LEVELS)
    report = verify_store(str(tmp_path / "s"), progress=False)
    assert {i for i, _ in report.bad} == shard_ids(1) and all("status" in reason for _, reason in report.bad)
    write_shards(writer, [1])
    writer.finalize({})
    assert verify_store(str(tmp_path / "s"), progress=False).intact


def test_a_damaged_consolidated_index_is_bypassed_by_readers_and_named_by_verify(tmp_path):
    build_store(tmp_path / "s", make_layout("fp16", "mirror", sizes=(100,)))
    with open(os.path.join(str(tmp_path / "s"), "consolidated_rows", "c", "0", "0"), "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xff")
    store = TeacherFeatureStore(str(tmp_path / "s"))
    assert store.rows_source == "per-shard arrays" and all(i in store for i in IDS)
    report = verify_store(str(tmp_path / "s"), progress=False)
    assert not report.intact and any("consolidated_rows is unreadable" in p for p in report.problems), report.problems


def test_verify_names_a_consolidated_index_that_differs_from_the_shards(tmp_path):
    build_store(tmp_path / "s", make_layout("fp16", "mirror", sizes=(100,)))
    index = zarr.open_group(str(tmp_path / "s"), mode="r+")["consolidated_rows"]
    index[3, 1] = 0  # image 409 "not written" in the index only
    assert 409 not in TeacherFeatureStore(str(tmp_path / "s"))
    report = verify_store(str(tmp_path / "s"), progress=False)
    assert any("consolidated_rows differs from the per-shard arrays in 1 rows (first: row 3, image 409)" in p
               for p in report.problems), report.problems


def test_a_format_2_store_gets_no_consolidated_index_and_is_read_shard_by_shard(tmp_path):
    """Code of format 2 would not drop an index before rewriting a shard, so none is written into its stores."""
    layout = make_layout("fp16", "mirror")
    writer = build_store(tmp_path / "s", layout, finalize=False)
    meta_path = tmp_path / "s" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["format_version"] = 2
    meta_path.write_text(json.dumps(meta))
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, IDS, "toy_train", FINGERPRINT)
    writer.finalize({})
    assert not (tmp_path / "s" / "consolidated_rows").exists()
    store = TeacherFeatureStore(str(tmp_path / "s"))
    assert store.rows_source == "per-shard arrays" and all(i in store for i in IDS)


# ---------------------------------------------------------------- RPN outputs


def _rpn_entry(image_id: int, layout: StoreLayout) -> ImageEntry:
    rng = np.random.default_rng(image_id)
    resized = resized_hw_of(image_id)
    maps = {view: {key: rng.standard_normal((layout.channels_of(key), *layout.valid_hw(key, resized))).astype(np.float32)
                   for key in layout.stored_keys} for view in layout.views}
    return ImageEntry(image_id, resized, resized, MAX_HW, maps)


def test_a_layout_stores_only_the_rpn_outputs_it_names_and_records_which(tmp_path):
    layout = _with(make_layout("fp16", "mirror"), rpn_anchors=2, rpn_outputs=("rpn_objectness",))
    assert layout.stored_keys == LEVELS + tuple(f"rpn_objectness/{lv}" for lv in LEVELS)
    assert layout.to_attrs()["rpn_outputs"] == ["rpn_objectness"]
    assert StoreLayout.from_attrs(layout.to_attrs()) == layout
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, IDS[:2], "toy_train", FINGERPRINT)
    entries = [_rpn_entry(i, layout) for i in IDS[:2]]
    writer.write_shard(0, entries)
    writer.finalize({})
    assert set(os.listdir(tmp_path / "s" / "features")) - {"zarr.json"} == {*LEVELS, "rpn_objectness"}
    store = TeacherFeatureStore(str(tmp_path / "s"))
    got = store.read(IDS[0], flip=True)
    assert sorted(got) == sorted(layout.stored_keys)
    want = np.flip(entries[0].features["orig"]["rpn_objectness/p3"], axis=-1).astype(np.float16).astype(np.float32)
    assert np.array_equal(got["rpn_objectness/p3"].numpy(), want)
    with pytest.raises(KeyError, match=r"holds no \['rpn_deltas/p2'\]"):
        store.read(IDS[0], keys=["rpn_deltas/p2"])
    assert verify_store(str(tmp_path / "s"), progress=False).intact


def test_a_store_without_the_rpn_outputs_attribute_holds_objectness_and_deltas(tmp_path):
    """Stores written before the attribute existed hold both, and stay readable with both."""
    layout = _with(make_layout("fp16", "mirror"), rpn_anchors=2)
    assert "rpn_outputs" not in layout.to_attrs() and layout.rpn_outputs == ("rpn_objectness", "rpn_deltas")
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, IDS[:2], "toy_train", FINGERPRINT)
    writer.write_shard(0, [_rpn_entry(i, layout) for i in IDS[:2]])
    store = TeacherFeatureStore(str(tmp_path / "s"))
    assert store.layout.rpn_outputs == ("rpn_objectness", "rpn_deltas")
    assert tuple(store.read(IDS[1]).keys()) == layout.stored_keys


def test_resume_refuses_a_store_holding_other_rpn_outputs_in_either_direction(tmp_path):
    both = _with(make_layout("fp16", "mirror"), rpn_anchors=2)
    objectness = _with(both, rpn_outputs=("rpn_objectness",))
    args = {"image_ids": IDS, "dataset": "toy_train", "fingerprint": FINGERPRINT}
    for stored, requested in ((both, objectness), (objectness, both)):
        path = str(tmp_path / f"s{len(stored.rpn_outputs)}")
        TeacherFeatureWriter.open(path, stored, **args)
        with pytest.raises(StoreMismatchError, match="rpn_outputs: store has"):
            TeacherFeatureWriter.open(path, requested, **args)


def test_rpn_outputs_are_checked_and_ignored_without_anchors():
    with pytest.raises(ValueError, match=r"rpn_outputs must be a non-empty subset of \('rpn_objectness', 'rpn_deltas'\)"):
        _with(make_layout(), rpn_anchors=2, rpn_outputs=("rpn_boxes",))
    with pytest.raises(ValueError, match="non-empty"):
        _with(make_layout(), rpn_anchors=2, rpn_outputs=())
    assert _with(make_layout(), rpn_outputs=("rpn_objectness",)) == make_layout()  # no anchors: nothing stored


# ---------------------------------------------------------------- flip


def test_flip_stored_serves_view_1(tmp_path):
    layout = make_layout("fp16", "stored")
    build_store(tmp_path / "s", layout)
    got = TeacherFeatureStore(str(tmp_path / "s")).read(307, flip=True)
    expected = synthetic_features(307, layout)["hflip"]
    assert all(np.array_equal(got[lv].numpy(), expected[lv].astype(np.float16).astype(np.float32)) for lv in LEVELS)


def test_flip_mirror_serves_the_mirrored_orig_view(tmp_path):
    build_store(tmp_path / "s", make_layout("int8", "mirror"))
    store = TeacherFeatureStore(str(tmp_path / "s"))
    orig, flipped = store.read(307), store.read(307, flip=True)
    assert all(torch.equal(flipped[lv], torch.flip(orig[lv], dims=[-1])) for lv in LEVELS)


def test_flip_none_refuses_flipped_reads(tmp_path):
    build_store(tmp_path / "s", make_layout("fp16", "none"))
    store = TeacherFeatureStore(str(tmp_path / "s"))
    store.read(307)
    with pytest.raises(ValueError, match="flip='none'.*holds no features of flipped images"):
        store.read(307, flip=True)


# ---------------------------------------------------------------- damage and unreadable images


def shard_ids(shard: int, shard_images: int = 2) -> set[int]:
    return set(IDS[shard * shard_images : (shard + 1) * shard_images])


def test_flipped_byte_in_a_shard_is_reported_by_verify_and_refused_by_the_reader(tmp_path):
    build_store(tmp_path / "s", make_layout("fp16", "mirror"))
    path = shard_file(tmp_path / "s", "p2", 2)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = verify_store(str(tmp_path / "s"), progress=False)
    bad_ids = {image_id for image_id, _ in report.bad}
    assert not report.intact and bad_ids and bad_ids <= shard_ids(2)
    assert report.ok == len(IDS) - len(bad_ids)
    store = TeacherFeatureStore(str(tmp_path / "s"))
    for image_id in bad_ids:
        with pytest.raises(StoreEntryError, match=rf"image {image_id} in feature store {tmp_path / 's'}.*features/p2"):
            store.read(image_id)
    for image_id in set(IDS) - bad_ids:
        store.read(image_id)


def test_truncated_shard_is_reported_by_verify_and_refused_by_the_reader(tmp_path):
    build_store(tmp_path / "s", make_layout("int8", "mirror"))
    path = shard_file(tmp_path / "s", "p3", 1)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    report = verify_store(str(tmp_path / "s"), progress=False)
    assert {image_id for image_id, _ in report.bad} == shard_ids(1)  # the shard index is gone
    with pytest.raises(StoreEntryError, match=r"image 307 in feature store .*features/p3"):
        TeacherFeatureStore(str(tmp_path / "s")).read(307)


def test_missing_shard_object_is_reported_by_verify(tmp_path):
    build_store(tmp_path / "s", make_layout("fp16", "mirror"))
    os.remove(shard_file(tmp_path / "s", "p4", 3))  # zarr alone would read zeros here
    report = verify_store(str(tmp_path / "s"), progress=False)
    assert {image_id for image_id, _ in report.bad} == shard_ids(3)
    assert all("missing" in reason for _, reason in report.bad)


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_a_committed_entry_whose_shard_object_is_missing_is_refused_naming_image_map_and_store(tmp_path, codec):
    build_store(tmp_path / "s", make_layout(codec, "mirror"))
    os.remove(shard_file(tmp_path / "s", "p4", 3))  # shard 3 holds images 715 and 817
    store = TeacherFeatureStore(str(tmp_path / "s"))
    for image_id in shard_ids(3):
        with pytest.raises(StoreEntryError, match=rf"image {image_id} in feature store {tmp_path / 's'}: "
                                                  r"p4 \(view orig\): shard object features/p4/c/3/0/0/0/0 is missing"):
            store.read(image_id)
        assert set(store.read(image_id, keys=["p2", "p3"])) == {"p2", "p3"}  # the maps still there are served
    store.read(IDS[0])  # other shards are untouched
    reasons = dict(verify_store(str(tmp_path / "s"), progress=False).bad)
    assert all("shard object features/p4/c/3/0/0/0/0 is missing" in reasons[i] for i in shard_ids(3))


@pytest.mark.parametrize("name", ["scale", "offset"])
def test_a_committed_entry_whose_scale_or_offset_object_is_missing_is_refused(tmp_path, name):
    build_store(tmp_path / "s", make_layout("int8", "mirror"))
    os.remove(os.path.join(str(tmp_path / "s"), name, "p3", "c", "1", "0", "0"))
    with pytest.raises(StoreEntryError, match=rf"image 307 .*p3 \(view orig\): {name} object {name}/p3/c/1/0/0 is missing"):
        TeacherFeatureStore(str(tmp_path / "s")).read(307)
    assert {i for i, _ in verify_store(str(tmp_path / "s"), progress=False).bad} == shard_ids(1)


@pytest.mark.parametrize("codec, value", [("fp16", 0.0), ("int8", 2.5), ("int8", 0.0)])
def test_a_shard_whose_stored_values_are_all_zero_is_written_so_it_is_told_apart_from_a_lost_one(tmp_path, codec, value):
    """Zarr stores no object for a shard of fill values; the writer stores one, so absent always means lost."""
    layout = make_layout(codec, "mirror")
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, IDS[:2], "toy_train", FINGERPRINT)
    entries = [entry_for(i, layout) for i in IDS[:2]]  # int8 codes of a constant channel are 0, fp16 of 0.0 too
    for entry in entries:
        entry.features = {"orig": {lv: np.full_like(x, value) for lv, x in entry.features["orig"].items()}}
    writer.write_shard(0, entries)
    assert os.path.exists(shard_file(tmp_path / "s", "p2", 0))
    assert verify_store(str(tmp_path / "s"), progress=False).intact
    store = TeacherFeatureStore(str(tmp_path / "s"))
    assert all(torch.all(x == value) for x in store.read(IDS[0]).values())
    os.remove(shard_file(tmp_path / "s", "p2", 0))
    with pytest.raises(StoreEntryError, match=r"p2 \(view orig\): shard object features/p2/c/0/0/0/0/0 is missing"):
        store.read(IDS[0])


def test_unreadable_image_is_committed_with_status_2_and_its_reason(tmp_path):
    layout = make_layout("int8", "stored")
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, IDS, "toy_train", FINGERPRINT)
    for shard in writer.pending_shards():
        entries = [entry_for(int(writer.image_ids[r]), layout) for r in writer.shard_rows(shard)]
        if shard == 1:
            entries[1] = ImageEntry(409, (0, 0), (0, 0), (0, 0), None, error="cannot identify image")
        writer.write_shard(shard, entries)
    writer.finalize({"note": "one broken file"})
    store = TeacherFeatureStore(str(tmp_path / "s"))
    assert store.attrs["failed"] == {"409": "cannot identify image"}
    assert store.attrs["summary"] == {"note": "one broken file"}
    assert store.sizes(409)["status"] == 2 and 409 not in store
    with pytest.raises(StoreEntryError, match=r"image 409 .*unreadable.*cannot identify image"):
        store.read(409)
    store.read(307)  # its shard neighbour is fine
    report = verify_store(str(tmp_path / "s"), progress=False)
    assert report.intact and report.failed == 1 and report.ok == len(IDS) - 1
    info = store.info()
    assert info.images_done == len(IDS) - 1 and info.images_failed == 1


# ---------------------------------------------------------------- DataLoader workers


class _StoreDataset(torch.utils.data.Dataset):
    def __init__(self, store: TeacherFeatureStore, ids: list[int]):
        self.store, self.ids = store, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pid": torch.tensor(os.getpid()), **self.store.read(self.ids[i], flip=bool(i % 2))}


def test_reader_in_dataloader_workers_returns_the_parents_tensors(tmp_path):
    build_store(tmp_path / "s", make_layout("int8", "stored"))
    store = TeacherFeatureStore(str(tmp_path / "s"))
    expected = [store.read(image_id, flip=bool(i % 2)) for i, image_id in enumerate(IDS)]  # parent uses zarr first
    loader = torch.utils.data.DataLoader(_StoreDataset(store, IDS), batch_size=None, num_workers=2)
    got = list(loader)
    assert len(got) == len(IDS)
    assert {int(item["pid"]) for item in got}.isdisjoint({os.getpid()})
    for item, want in zip(got, expected):
        assert all(torch.equal(item[lv], want[lv]) for lv in LEVELS)


# ---------------------------------------------------------------- background writing


def test_background_writer_writes_every_shard(tmp_path):
    layout = make_layout("fp16", "mirror")
    writer = TeacherFeatureWriter.open(str(tmp_path / "s"), layout, IDS, "toy_train", FINGERPRINT)
    with BackgroundShardWriter(writer, max_pending=2) as background:
        for shard in writer.pending_shards():
            background.submit(shard, [entry_for(int(writer.image_ids[r]), layout) for r in writer.shard_rows(shard)])
    assert writer.pending_shards() == [] and background.shards_written == 4 and background.bytes_written > 0
    assert verify_store(str(tmp_path / "s"), progress=False).intact


class _FailingWriter:
    def __init__(self) -> None:
        self.calls = 0
        self.failed = threading.Event()

    def write_shard(self, shard, entries) -> int:
        self.calls += 1
        if shard == 1:
            self.failed.set()
            raise OSError("disk full")
        return 10


def test_background_writer_error_surfaces_from_close():
    background = BackgroundShardWriter(_FailingWriter())
    background.submit(0, [])
    background.submit(1, [])
    with pytest.raises(OSError, match="disk full"):
        background.close()


def test_background_writer_error_makes_the_next_submit_raise():
    failing = _FailingWriter()
    background = BackgroundShardWriter(failing, max_pending=1)
    background.submit(1, [])
    assert failing.failed.wait(5)
    time.sleep(0.05)  # let the thread record the error
    with pytest.raises(OSError, match="disk full"):
        background.submit(2, [])
    with pytest.raises(OSError):
        background.close()
    assert failing.calls == 1


# ---------------------------------------------------------------- info


def test_info_is_a_store_info_with_counts_sizes_and_the_layout(tmp_path):
    build_store(tmp_path / "s", make_layout("int8", "mirror"))
    info = TeacherFeatureStore(str(tmp_path / "s")).info(disk_usage=True)
    assert isinstance(info, StoreInfo)
    assert info.images_total == info.images_done == len(IDS) and info.images_failed == info.images_pending == 0
    raw = sum(
        CHANNELS * -(-resized_hw_of(i)[0] // s) * -(-resized_hw_of(i)[1] // s) * 4 for i in IDS for s in STRIDES
    )
    assert info.raw_fp32_bytes == raw
    assert info.bytes_on_disk > 0 and info.ratio_vs_fp32 == pytest.approx(raw / info.bytes_on_disk)
    assert info.bytes_per_image == pytest.approx(info.bytes_on_disk / len(IDS))
    assert info.codec == "int8" and info.predictor == "plane" and info.levels == list(LEVELS) and info.flip == "mirror"
    assert info.fingerprint_sha256 == fingerprint_sha256(FINGERPRINT) and info.dataset == "toy_train"
    assert info.finalized and info.created and info.rpn_anchors == 0


# ---------------------------------------------------------------- command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cache", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_info_json_prints_the_summary_fields(tmp_path):
    build_store(tmp_path / "s", make_layout("fp16", "mirror"))
    result = run_cli("info", str(tmp_path / "s"), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert list(info) == [
        "path", "dataset", "codec", "predictor", "format_version", "levels", "rpn_anchors", "flip", "sizes", "views",
        "images_total", "images_done", "images_failed", "images_pending", "bytes_on_disk", "bytes_per_image",
        "bytes_per_view", "feature_bytes_per_image_by_view", "raw_fp32_bytes", "ratio_vs_fp32", "fingerprint_sha256",
        "created", "finalized",
    ]
    assert info["images_done"] == len(IDS) and info["bytes_on_disk"] > 0
    table = run_cli("info", str(tmp_path / "s"))
    assert table.returncode == 0 and "fp16" in table.stdout and "per done image" in table.stdout


def test_cli_verify_exits_0_when_intact_1_when_damaged_2_when_not_a_store(tmp_path):
    build_store(tmp_path / "s", make_layout("fp16", "mirror"))
    good = run_cli("verify", str(tmp_path / "s"), "--quiet")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "intact" in good.stdout

    with open(shard_file(tmp_path / "s", "p2", 0), "r+b") as f:
        f.truncate(100)
    damaged = run_cli("verify", str(tmp_path / "s"), "--quiet")
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    assert f"bad image {IDS[0]}" in damaged.stdout and f"bad image {IDS[1]}" in damaged.stdout

    (tmp_path / "empty").mkdir()
    not_store = run_cli("verify", str(tmp_path / "empty"))
    assert not_store.returncode == 2
    assert "not a teacher feature store" in not_store.stderr


def _damage_image_index(root: str) -> str:
    with open(os.path.join(root, "image_id", "c", "1"), "r+b") as f:
        f.write(b"\xff\xff\xff")
    return r"image_id array is damaged"


def _drop_array_metadata(root: str) -> str:
    os.remove(os.path.join(root, "features", "p3", "zarr.json"))
    return r"features/p3"


def _drop_layout_attribute(root: str) -> str:
    meta_path = os.path.join(root, "zarr.json")
    meta = json.loads(_read_bytes(root, "zarr.json"))
    del meta["attributes"]["levels"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return r"layout attributes.*levels"


@pytest.mark.parametrize("damage", [_damage_image_index, _drop_array_metadata, _drop_layout_attribute])
@pytest.mark.parametrize("command", ["info", "verify"])
def test_cli_exits_1_naming_damaged_store_metadata_without_a_traceback(tmp_path, capsys, damage, command):
    from cache.__main__ import main

    # Not finalized: opened from the per-shard arrays, as a store being written (or of format 2) always is.
    build_store(tmp_path / "s", make_layout("int8", "mirror"), finalize=False)
    named = damage(str(tmp_path / "s"))
    assert main([command, str(tmp_path / "s"), *(["--quiet"] if command == "verify" else [])]) == 1
    err = capsys.readouterr().err
    assert re.search(named, err) and str(tmp_path / "s") in err, err
    assert err.count("\n") == 1 and err.startswith("error: ")  # one line


@pytest.mark.parametrize("options", ['{"anon": tru', '["anon"]'])
@pytest.mark.parametrize("command", ["info", "verify"])
def test_cli_exits_2_naming_malformed_storage_options(tmp_path, capsys, command, options):
    from cache.__main__ import main

    assert main([command, "s3://bucket/store.zarr", "--storage-options", options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --storage-options") and "JSON object" in err and err.count("\n") == 1, err


def test_cli_exits_2_naming_malformed_storage_options_from_the_environment(capsys, monkeypatch):
    from cache.__main__ import main

    monkeypatch.setenv("CACHE_STORAGE_OPTIONS", "{not json")
    assert main(["info", "s3://bucket/store.zarr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: $CACHE_STORAGE_OPTIONS") and "JSON object" in err, err


def test_cli_exits_2_naming_storage_options_given_for_a_local_store(tmp_path, capsys):
    from cache.__main__ import main

    build_store(tmp_path / "s", make_layout("fp16", "mirror"))
    assert main(["info", str(tmp_path / "s"), "--storage-options", '{"anon": true}']) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --storage-options") and "local path" in err, err


# ---------------------------------------------------------------- the document


def _read_bytes(root: str, *key: str) -> bytes:
    with open(os.path.join(root, *key), "rb") as f:
        return f.read()


def _crc_checked(data: bytes) -> bytes:
    """Strip and check the trailing little-endian crc32c (docs/store-format.md, section 5)."""
    import google_crc32c

    body, crc = data[:-4], int.from_bytes(data[-4:], "little")
    assert google_crc32c.value(body) == crc
    return body


def test_store_decodes_by_hand_following_the_format_document(tmp_path):
    """Decode one int8 entry with only json, numpy, blosc and crc32c, as docs/store-format.md describes."""
    from numcodecs import blosc

    layout = make_layout("int8", "stored")
    build_store(tmp_path / "s", layout)
    root = str(tmp_path / "s")
    attrs = json.loads(_read_bytes(root, "zarr.json"))["attributes"]
    s, channels = attrs["shard_images"], attrs["channels"]
    image_ids = np.frombuffer(b"".join(
        _crc_checked(_read_bytes(root, "image_id", "c", str(k))) for k in range(len(IDS) // s)
    ), dtype="<i8")
    row, view, level_index = int(np.flatnonzero(image_ids == 307)[0]), 1, 1  # image 307, hflip, p3
    level, stride = attrs["levels"][level_index], attrs["strides"][level_index]
    k, r = divmod(row, s)
    status = np.frombuffer(_crc_checked(_read_bytes(root, "status", "c", str(k))), "u1")
    assert status[r] == 1
    resized = np.frombuffer(_crc_checked(_read_bytes(root, "resized_hw", "c", str(k), "0")), "<i4")
    h, w = (math.ceil(int(v) / stride) for v in resized.reshape(s, 2)[r])
    max_h, max_w = (math.ceil(v / stride) for v in attrs["max_hw"])
    tile_h, tile_w = min(attrs["tile"], max_h), min(attrs["tile"], max_w)
    ny, nx = -(-max_h // tile_h), -(-max_w // tile_w)
    shard = _read_bytes(root, "features", level, "c", str(k), str(view), "0", "0", "0")
    index_size = 16 * s * ny * nx + 4
    index = np.frombuffer(_crc_checked(shard[-index_size:]), "<u8").reshape(s, 1, 1, ny, nx, 2)
    q = np.zeros((channels, ny * tile_h, nx * tile_w), np.uint8)
    for ty in range(-(-h // tile_h)):
        for tx in range(-(-w // tile_w)):
            offset, nbytes = (int(v) for v in index[r, 0, 0, ty, tx])
            if offset == 2**64 - 1:
                continue
            tile = np.frombuffer(blosc.decompress(_crc_checked(shard[offset : offset + nbytes])), np.uint8)
            tile = tile.reshape(tile_h, tile_w, channels).transpose(2, 0, 1)  # int8 chunks are channels-last
            q[:, ty * tile_h : (ty + 1) * tile_h, tx * tile_w : (tx + 1) * tile_w] = tile
    side = {}
    for name in ("scale", "offset"):
        raw = _crc_checked(_read_bytes(root, name, level, "c", str(k), "0", "0"))
        side[name] = np.frombuffer(raw, "<f4").reshape(s, len(attrs["views"]), channels)[r, view]
    assert attrs["predictor"] == "plane"  # stored bytes are residuals: two wrapping running sums give the codes
    codes = np.cumsum(np.cumsum(q[:, :h, :w], axis=1, dtype=np.uint8), axis=2, dtype=np.uint8)
    by_hand = codes.astype(np.float32) * side["scale"][:, None, None] + side["offset"][:, None, None]
    assert np.array_equal(by_hand, TeacherFeatureStore(root).read(307, flip=True)[level].numpy())

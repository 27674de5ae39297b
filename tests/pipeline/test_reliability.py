"""Reliability: damaged entries, write failures, two writers, wrong stores, resumed training, untrusted files.

docs/reliability.md lists each fault with the test here that proves its behaviour. Bad input images are
in tests/test_bad_images.py; SIGKILL at random moments is tools/kill_loop.py (make kill-test).
"""
import errno
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cache import StoreEntryError, StoreLayout, StoreMismatchError, TeacherFeatureStore, verify_store
from cache.stored_map import decode_maps
from cache.lock import StoreLockedError, lock_path, writer_lock
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from pipeline.stage_one import cache_teacher
from pipeline.mapper import DistillDatasetMapper
from pipeline.teacher import build_teacher
from pipeline.stage_two import StudentTrainer, check_store
from tests.conftest import REPO, make_student_cfg

# ---------------------------------------------------------------- stage two: damaged entries


def _flip_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture()
def damaged_store(tiny_store, tmp_path) -> dict:
    """A copy of the tiny store with a flipped byte in shard 0's p2 object of the unflipped view; the damaged ids."""
    path = tmp_path / "damaged.zarr"
    shutil.copytree(tiny_store["path"], path)
    _flip_byte(path / "features" / "p2" / "c" / "0" / "0" / "0" / "0" / "0")
    bad = sorted({image_id for image_id, _ in verify_store(str(path), progress=False).bad})
    good = [int(i) for i in TeacherFeatureStore(str(path)).image_ids if int(i) not in bad]
    assert bad, "the flipped byte should damage at least one image"
    return {"path": str(path), "bad": bad, "good": good}


def _mapped(cfg, image_ids) -> list[dict]:
    """The student's mapper output for these training images, flips off so the views are known."""
    mapper = DistillDatasetMapper(cfg, True)
    dicts = {d["image_id"]: d for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])}
    return [mapper(dict(dicts[i])) for i in image_ids]


def test_fail_policy_stops_on_a_damaged_entry_naming_the_image_and_the_store(damaged_store, tiny_teacher, tmp_path):
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", damaged_store["path"], "INPUT.RANDOM_FLIP", "none")
    assert cfg.DISTILL.CACHE.ON_BAD_ENTRY == "fail"
    image_id = damaged_store["bad"][0]
    with pytest.raises(StoreEntryError, match=rf"image {image_id} in feature store {damaged_store['path']}.*features/p2"):
        _mapped(cfg, [image_id])


def test_skip_policy_gives_loss_kd_of_the_other_images_and_counts_the_skipped_one(damaged_store, tiny_teacher, tmp_path):
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", damaged_store["path"],
                           "DISTILL.CACHE.ON_BAD_ENTRY", "skip", "INPUT.RANDOM_FLIP", "none")
    bad, good = damaged_store["bad"][0], damaged_store["good"][0]
    batch = _mapped(cfg, [bad, good])
    assert batch[0]["teacher_features"] is None and f"image {bad}" in batch[0]["teacher_skip_reason"]
    assert batch[1]["teacher_features"] is not None
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with EventStorage(0) as storage:
        loss_kd = model(batch)["loss_kd"]
        skipped = storage.history("kd_skipped_images").latest()
    # The loss the good image alone gets from the same student features (batch-padded as in the step).
    with torch.no_grad():
        features = model.backbone(model.preprocess_image(batch).tensor)
        expected = model.distiller({k: v[[1]] for k, v in features.items()}, [decode_maps(batch[1]["teacher_features"])],
                                   [tuple(batch[1]["image"].shape[-2:])])
    assert skipped == 1
    assert loss_kd.item() > 0 and torch.allclose(loss_kd.detach(), expected, rtol=1e-5)


def test_a_batch_without_any_teacher_features_gives_zero_loss_kd_that_still_backpropagates(tiny_store, tiny_teacher, tmp_path):
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"],
                           "DISTILL.CACHE.ON_BAD_ENTRY", "skip", fpn_channels=32)
    batch = _mapped(cfg, [int(i) for i in TeacherFeatureStore(tiny_store["path"]).image_ids[:2]])
    for x in batch:
        x["teacher_features"], x["teacher_skip_reason"] = None, "damaged (simulated)"
    model = build_model(cfg).train()
    with EventStorage(0) as storage:
        losses = model(batch)
        sum(losses.values()).backward()
        assert storage.history("kd_skipped_images").latest() == 2
    assert losses["loss_kd"].item() == 0.0 and losses["loss_kd"].requires_grad
    connector = next(iter(model.distiller.connectors.values()))
    assert connector.weight.grad is not None and torch.count_nonzero(connector.weight.grad) == 0


def test_an_unknown_bad_entry_policy_is_refused_listing_the_choices(student_cfg):
    with pytest.raises(ValueError, match=r"ON_BAD_ENTRY='ignore'.*\('fail', 'skip'\)"):
        DistillDatasetMapper(student_cfg("DISTILL.CACHE.ON_BAD_ENTRY", "ignore"), True)


# ---------------------------------------------------------------- stage one: write failures


def test_disk_full_during_a_shard_write_stops_naming_the_store_and_a_resume_completes_it(
        tmp_path, tiny_teacher, tiny_store, monkeypatch):
    cfg = make_student_cfg(tmp_path, tiny_teacher)
    path = cfg.DISTILL.CACHE.PATH
    real_set = zarr.storage.LocalStore.set

    async def disk_full_at_shard_2(self, key, value):
        if key.startswith("features/p3/c/2/"):  # p2 of shard 2 is already on disk: a half-written shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", disk_full_at_shard_2)
    with pytest.raises(OSError, match=rf"shard 2 .*feature store {path} failed.*No space left.*run the same command again") as info:
        cache_teacher(cfg)
    assert info.value.errno == errno.ENOSPC
    assert not Path(lock_path(path)).exists()
    report = verify_store(path, progress=False)
    assert report.intact and report.ok == 8 and report.pending == 8  # shards 0-1 kept; 2 (torn) and 3 pending
    assert any((Path(path) / "features" / "p2" / "c" / "2").iterdir())  # the torn shard's first level exists

    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
    assert cache_teacher(cfg)["images_written"] == 8
    resumed, full = TeacherFeatureStore(path), TeacherFeatureStore(tiny_store["path"])
    assert verify_store(path, progress=False).complete
    for image_id in full.image_ids:
        a, b = resumed.read(int(image_id), flip=True), full.read(int(image_id), flip=True)
        assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- stage one: two writers


def test_a_second_writer_on_the_same_store_is_refused_naming_the_first(tmp_path, tiny_teacher):
    cfg = make_student_cfg(tmp_path, tiny_teacher)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from cache.lock import writer_lock\n"
         "with writer_lock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()", cfg.DISTILL.CACHE.PATH],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=rf"being written by another process \(pid {holder.pid} on host"):
            cache_teacher(cfg)
        assert not Path(cfg.DISTILL.CACHE.PATH).exists()  # refused before touching the store
    finally:
        holder.communicate("")
    assert not Path(lock_path(cfg.DISTILL.CACHE.PATH)).exists()


def test_the_stale_lock_of_a_dead_writer_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = tmp_path / "s.zarr"
    Path(lock_path(store)).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    with writer_lock(store) as lock:
        assert json.loads(Path(lock).read_text())["pid"] == os.getpid()
    assert "stale lock of a dead writer" in caplog.text and f"pid {dead.pid}" in caplog.text
    assert not Path(lock).exists()


def test_a_lock_held_on_another_host_is_refused_with_how_to_remove_it(tmp_path):
    store = tmp_path / "s.zarr"
    Path(lock_path(store)).write_text(json.dumps({"pid": 1, "host": "other-machine", "started": "then"}))
    with pytest.raises(StoreLockedError, match=r"pid 1 on host other-machine.*delete .*s\.zarr\.lock"):
        with writer_lock(store):
            pass


def test_remote_stores_are_not_locked_and_nothing_is_written_locally(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with writer_lock("s3://bucket/store.zarr") as lock:
        assert lock is None
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- stage two: the wrong store


def _teacher_variant(tmp_path, tiny_teacher, overrides: str) -> dict:
    """The tiny teacher's weights with its config changed by `overrides` (YAML merged over it)."""
    cfg_file = tmp_path / "teacher_variant.yaml"
    cfg_file.write_text(f'_BASE_: "{tiny_teacher["cfg"]}"\n{overrides}')
    return dict(tiny_teacher, cfg=str(cfg_file))


@pytest.mark.parametrize("opts, teacher_yaml, fields", [
    ((), "INPUT:\n  FORMAT: RGB\n", ["input_format"]),
    ((), "MODEL:\n  PIXEL_STD: [57.0, 57.0, 57.0]\n", ["pixel_std", "teacher_config_sha256"]),
    ((), "MODEL:\n  FPN:\n    FUSE_TYPE: avg\n", ["teacher_config_sha256"]),
    (("INPUT.MAX_SIZE_TRAIN", 256), "", ["resize"]),  # another short edge: refused as a lacking size (test_multiscale)
    (("DISTILL.LEVELS", ["p2", "p3"]), "", ["levels", "strides"]),
    (("DISTILL.CACHE.CODEC", "int8"), "", ["codec"]),
    (("DISTILL.CACHE.FLIP", "mirror"), "", ["flip"]),
    (("DATASETS.TRAIN", ("embedded_tiny_val",)), "", ["images_sha256"]),
], ids=["input_format", "pixel_std", "teacher_config", "resize", "levels", "codec", "flip", "dataset"])
def test_a_store_built_with_other_settings_is_refused_naming_each_differing_field(
        tiny_store, tiny_teacher, tmp_path, opts, teacher_yaml, fields):
    teacher = _teacher_variant(tmp_path, tiny_teacher, teacher_yaml) if teacher_yaml else tiny_teacher
    cfg = make_student_cfg(tmp_path, teacher, "DISTILL.CACHE.PATH", tiny_store["path"], *opts)
    with pytest.raises(StoreMismatchError) as info:
        check_store(cfg)
    named = {line.split(":")[0].split(".")[1] for line in info.value.differences}  # fingerprint.<field>[.sub]
    assert named == set(fields), str(info.value)


def test_a_store_for_other_teacher_weights_is_refused_by_the_student(tiny_store, tiny_teacher, tmp_path):
    state = torch.load(tiny_teacher["weights"], weights_only=True)
    state["model"]["backbone.fpn_output3.bias"] = state["model"]["backbone.fpn_output3.bias"] - 1
    torch.save(state, tmp_path / "other.pth")
    cfg = make_student_cfg(tmp_path, dict(tiny_teacher, weights=str(tmp_path / "other.pth")),
                           "DISTILL.CACHE.PATH", tiny_store["path"])
    with pytest.raises(StoreMismatchError, match=r"fingerprint\.teacher_weights_sha256: store has"):
        check_store(cfg)


# ---------------------------------------------------------------- stage two: resumed training


def test_an_interrupted_student_run_resumes_from_its_last_checkpoint_reading_the_same_store(
        tiny_store, tiny_teacher, tmp_path, monkeypatch):
    from detectron2.engine import default_argument_parser
    from detectron2.utils.events import get_event_storage
    from pipeline import distill_rcnn
    from pipeline.train_student import main

    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.PATH", tiny_store["path"], "SOLVER.MAX_ITER", 5,
                           "SOLVER.CHECKPOINT_PERIOD", 2, "TEST.EVAL_PERIOD", 0)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(cfg.dump())
    forward = distill_rcnn.DistillRCNN.forward

    def crash_at_iteration_3(self, batched_inputs):
        if self.training and get_event_storage().iter == 3:
            raise KeyboardInterrupt("simulated crash after the checkpoint of iteration 1")
        return forward(self, batched_inputs)

    monkeypatch.setattr(distill_rcnn.DistillRCNN, "forward", crash_at_iteration_3)
    parser = default_argument_parser()
    with pytest.raises(KeyboardInterrupt):
        main(parser.parse_args(["--config-file", str(cfg_file)]))
    out = Path(cfg.OUTPUT_DIR)
    assert (out / "last_checkpoint").read_text().strip() == "model_0000001.pth"

    monkeypatch.setattr(distill_rcnn.DistillRCNN, "forward", forward)
    starts, ends = [], []
    resume_or_load, train = StudentTrainer.resume_or_load, StudentTrainer.train

    def recording_resume(self, resume=True):
        resume_or_load(self, resume=resume)
        starts.append(self.start_iter)

    def recording_train(self):
        result = train(self)
        ends.append(self.iter)
        return result

    monkeypatch.setattr(StudentTrainer, "resume_or_load", recording_resume)
    monkeypatch.setattr(StudentTrainer, "train", recording_train)
    metrics = main(parser.parse_args(["--config-file", str(cfg_file), "--resume"]))
    assert starts == [2] and ends == [5]  # continues after iteration 1's checkpoint, up to MAX_ITER
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 4
    logged = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any(row.get("iteration") == 4 and "loss_kd" in row for row in logged)
    assert metrics["store"]["fingerprint_sha256"] == TeacherFeatureStore(tiny_store["path"]).info().fingerprint_sha256


# ---------------------------------------------------------------- untrusted files


ALLOWED_DTYPES = {"float16", "float32", "int8", "uint8", "int32", "int64", "string"}
ALLOWED_CODECS = {"bytes", "crc32c", "sharding_indexed", "zstd", "blosc", "gzip", "vlen-utf8", "transpose"}


def test_the_store_is_json_metadata_and_plain_arrays_never_pickle(tiny_store):
    root = Path(tiny_store["path"])
    metadata = sorted(root.rglob("zarr.json"))
    arrays = [json.loads(p.read_text()) for p in metadata]
    arrays = [m for m in arrays if m["node_type"] == "array"]
    assert len(arrays) >= 10
    for meta in arrays:
        assert meta["data_type"] in ALLOWED_DTYPES, meta["data_type"]

        def codec_names(codecs):
            for codec in codecs:
                yield codec["name"]
                yield from codec_names(codec.get("configuration", {}).get("codecs", []))
                yield from codec_names(codec.get("configuration", {}).get("index_codecs", []))
        assert set(codec_names(meta["codecs"])) <= ALLOWED_CODECS
    group = zarr.open_group(store=str(root), mode="r")
    names = [name for name, _ in group.arrays()] + [f"{g}/{n}" for g, sub in group.groups() for n, _ in sub.arrays()]
    assert len(names) == len(arrays)
    for name in names:  # every object decodes as the declared plain dtype: nothing is an object array
        assert np.asarray(group[name][:]).dtype.kind in "fiuUT", name  # T: numpy StringDType (UTF-8 strings)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_teacher_weights_with_a_pickled_object_are_refused_without_running_it(tiny_teacher, tmp_path):
    marker = tmp_path / "code_ran"
    state = torch.load(tiny_teacher["weights"], weights_only=True)
    state["payload"] = _RunsCodeWhenUnpickled(str(marker))
    torch.save(state, tmp_path / "evil.pth")
    cfg = make_student_cfg(tmp_path, dict(tiny_teacher, weights=str(tmp_path / "evil.pth")))
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.pth hold Python objects beyond tensors.*weights_only"):
        build_teacher(cfg)
    assert not marker.exists()
    build_teacher(make_student_cfg(tmp_path, tiny_teacher))  # a plain checkpoint loads


@pytest.mark.parametrize("level", ["..", ".", "p2/../../x", "p2\\x", ""])
def test_level_names_that_could_leave_the_store_are_refused(level):
    with pytest.raises(ValueError, match="level names must be unique and contain no '/'"):
        StoreLayout(levels=(level,), strides=(4,), channels=8, codec="fp16", flip="none", max_hw=(64, 64))


def test_stage_one_writes_only_inside_the_store_directory(tmp_path, tiny_teacher):
    cfg = make_student_cfg(tmp_path / "run", tiny_teacher, "DISTILL.CACHE.PATH", str(tmp_path / "stores" / "a.zarr"))
    cache_teacher(cfg)
    assert [p.name for p in (tmp_path / "stores").iterdir()] == ["a.zarr"]  # the lock beside it is gone
    assert np.all(TeacherFeatureStore(cfg.DISTILL.CACHE.PATH)._status == 1)

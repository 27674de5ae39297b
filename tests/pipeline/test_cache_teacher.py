"""Stage one: the store holds the teacher's own per-image features, resumes, and refuses other settings."""
import pytest
import torch

from cache import StoreMismatchError, TeacherFeatureStore, verify_store
from pipeline.stage_one import ResizedImages, cache_teacher, training_images
from pipeline.teacher import TeacherFeatureExtractor, store_resize
from tests.conftest import crash_stage_one_at_row, make_student_cfg


def _teacher_outputs(cfg, image_ids):
    """The teacher's features, computed now, of the given training images (orig and flipped views)."""
    extractor = TeacherFeatureExtractor.from_config(cfg)
    dicts = training_images(cfg.DATASETS.TRAIN)
    rows = [i for i, d in enumerate(dicts) if d["image_id"] in image_ids]
    images = ResizedImages(dicts, rows, store_resize(cfg), extractor.input_format)
    return {item["image_id"]: {"orig": extractor(item["image"]), "hflip": extractor(item["image_hflip"])}
            for item in (images[i] for i in range(len(rows)))}


def test_fp16_store_equals_the_teachers_output_rounded_to_fp16(tiny_store):
    store = TeacherFeatureStore(tiny_store["path"])
    ids = [int(i) for i in store.image_ids[:3]]
    expected = _teacher_outputs(tiny_store["cfg"], ids)
    for image_id in ids:
        for view, flip in (("orig", False), ("hflip", True)):
            got = store.read(image_id, flip=flip)
            for level, t in expected[image_id][view].items():
                assert got[level].dtype == torch.float32
                assert torch.equal(got[level], t.half().float()), (image_id, view, level)


def test_int8_store_is_within_half_a_quantisation_step_of_the_teacher(tmp_path, tiny_teacher):
    cfg = make_student_cfg(tmp_path, tiny_teacher, "DISTILL.CACHE.CODEC", "int8")
    cache_teacher(cfg)
    store = TeacherFeatureStore(cfg.DISTILL.CACHE.PATH)
    image_id = int(store.image_ids[0])
    expected = _teacher_outputs(cfg, [image_id])[image_id]["orig"]
    got = store.read(image_id)
    for level, t in expected.items():
        step = (t.flatten(1).max(1).values - t.flatten(1).min(1).values) / 255
        err = (got[level] - t).abs().flatten(1).max(1).values
        assert torch.all(err <= step / 2 + 1e-5), level
        assert (got[level] - t).norm() / t.norm() < 0.01, level


def test_store_records_sizes_and_verifies(tiny_store):
    store = TeacherFeatureStore(tiny_store["path"])
    dicts = {d["image_id"]: d for d in training_images(tiny_store["cfg"].DATASETS.TRAIN)}
    for image_id in store.image_ids:
        sizes = store.sizes(int(image_id))
        d = dicts[int(image_id)]
        assert tuple(sizes["orig_hw"]) == (d["height"], d["width"])
        assert min(sizes["resized_hw"]) == 128 or max(sizes["resized_hw"]) == 224
        assert all(p % 32 == 0 and p >= r for p, r in zip(sizes["padded_hw"], sizes["resized_hw"]))
    report = verify_store(tiny_store["path"], progress=False)
    assert not report.bad and report.ok == len(dicts)
    assert tiny_store["summary"]["images_total"] == len(dicts)


def test_an_interrupted_run_resumes_to_the_same_store(tmp_path, tiny_teacher, tiny_store, monkeypatch):
    cfg = make_student_cfg(tmp_path, tiny_teacher)
    original = crash_stage_one_at_row(monkeypatch, 9)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(cfg)
    partial = TeacherFeatureStore(cfg.DISTILL.CACHE.PATH).info()
    assert 0 < partial.images_done < partial.images_total
    monkeypatch.setattr(ResizedImages, "__getitem__", original)
    summary = cache_teacher(cfg)
    assert summary["images_written"] == partial.images_total - partial.images_done
    resumed, full = TeacherFeatureStore(cfg.DISTILL.CACHE.PATH), TeacherFeatureStore(tiny_store["path"])
    for image_id in full.image_ids:
        for flip in (False, True):
            a, b = resumed.read(int(image_id), flip=flip), full.read(int(image_id), flip=flip)
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_rpn_store_holds_only_the_rpn_outputs_a_method_reads(tiny_rpn_store):
    """kd distils the RPN's objectness logits; no method reads its box deltas, so stage one stores none."""
    from pathlib import Path

    from pipeline.losses import DISTILL_LOSS_REGISTRY

    read = {cls.source for _, cls in DISTILL_LOSS_REGISTRY} - {"features"}
    store = TeacherFeatureStore(tiny_rpn_store["path"])
    assert read == {"rpn_objectness"} and store.layout.rpn_outputs == ("rpn_objectness",)
    assert store.attrs["rpn_outputs"] == ["rpn_objectness"] and store.layout.rpn_anchors == 3
    assert not (Path(tiny_rpn_store["path"]) / "features" / "rpn_deltas").exists()
    image_id = int(store.image_ids[0])
    extractor = TeacherFeatureExtractor.from_config(tiny_rpn_store["cfg"], rpn=True, rpn_outputs=("rpn_objectness",))
    dicts = training_images(tiny_rpn_store["cfg"].DATASETS.TRAIN)
    row = [i for i, d in enumerate(dicts) if d["image_id"] == image_id]
    item = ResizedImages(dicts, row, store_resize(tiny_rpn_store["cfg"]), extractor.input_format)[0]
    expected = extractor(item["image"])
    assert sorted(expected) == sorted(store.layout.stored_keys)
    got = store.read(image_id)
    for key, value in expected.items():  # fp16 store: the teacher's output rounded to fp16
        assert torch.equal(got[key], value.half().float()), key


def test_a_store_for_other_teacher_weights_is_refused_naming_the_field(tmp_path, tiny_teacher, tiny_store):
    other = dict(tiny_teacher, weights=str(tmp_path / "other.pth"))
    state = torch.load(tiny_teacher["weights"], weights_only=True)
    state["model"]["backbone.fpn_output2.bias"] = state["model"]["backbone.fpn_output2.bias"] + 1
    torch.save(state, other["weights"])
    cfg = make_student_cfg(tmp_path, other, "DISTILL.CACHE.PATH", tiny_store["path"])
    with pytest.raises(StoreMismatchError, match="teacher_weights_sha256"):
        cache_teacher(cfg)

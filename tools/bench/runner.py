"""Runs the chosen sections in order, writes the JSON first, then the report from it."""
from __future__ import annotations

import gc
import importlib
import json
import os
from pathlib import Path

from pipeline.losses import METHODS

from pipeline.config import get_distill_cfg

from tools.bench.context import (BENCH_DIR, STORES, STUDENT_CFG, TEACHER_WEIGHTS, elapsed, log, machine_info,
                                 make_coco_size_dataset, register_embedded_subset, wait_for_teacher)
from tools.bench.render import render
from tools.bench.spec import CODEC_NAMES, DEFAULT_SECTIONS, PLANS, TARGETS, selected_sections

# What sections leave in ctx for others, and the sections that use it: freed once none of those is left to run
# (float32 features at COCO size are gigabytes).
_USED_BY = {"fp32": {"codecs", "codec_candidates", "flip"}, "loss_batches": {"codecs", "codec_candidates"},
            "photos": {"photos", "padded_batch"}}


def json_path(sections: list[str]) -> Path:
    """output/bench/bench.json for the default run, bench-<sections>.json for another choice."""
    return BENCH_DIR / ("bench.json" if sections == list(DEFAULT_SECTIONS) else "bench-" + "-".join(sections) + ".json")


def teacher_config_for(weights: str, given: str | None = None) -> str | None:
    """The teacher's config: the one given, else the config.yaml detectron2 wrote beside the weights, else None
    (the student config's DISTILL.CFG_T). Weights loaded into another architecture (GN vs BN) would only warn."""
    if given:
        return given
    beside = Path(weights).parent / "config.yaml"
    return str(beside) if beside.is_file() else None


def run(quick: bool, out_md: str, command: str, sections=None, teacher: str = TEACHER_WEIGHTS,
        plan_overrides: dict | None = None, teacher_cfg: str | None = None) -> dict:
    plan = {**PLANS[quick], **(plan_overrides or {})}
    sections = selected_sections(sections)
    wait_for_teacher(teacher)
    teacher_cfg = teacher_config_for(teacher, teacher_cfg)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    STORES.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine['gpu']}")
    log(f"sections: {', '.join(sections)}; teacher {teacher} (config {teacher_cfg or 'DISTILL.CFG_T'})")
    ctx = {"plan": plan, "teacher_weights": teacher, "teacher_cfg": teacher_cfg, "datasets": {}}
    emb_ids = register_embedded_subset(f"bench_embedded_train_{plan['embedded_every']}", plan["embedded_every"])
    ctx["datasets"]["embedded"] = f"bench_embedded_train_{plan['embedded_every']}"
    ctx["datasets"]["coco"] = make_coco_size_dataset(plan["coco_images"])
    plan.update(embedded_images=len(emb_ids), quick=quick, sections=sections)
    results = {"command": command, "plan": plan, "machine": machine, "targets": TARGETS, "teacher_weights": teacher,
               "teacher_cfg": teacher_cfg or get_distill_cfg(STUDENT_CFG).DISTILL.CFG_T, "codec_names": list(CODEC_NAMES), "methods": list(METHODS)}
    for i, name in enumerate(sections):
        importlib.import_module(f"tools.bench.{name}").run(ctx, results)
        for key, users in _USED_BY.items():
            if not users & set(sections[i + 1:]):
                ctx.pop(key, None)
        gc.collect()
    machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    results["wall_s"] = elapsed()
    path = json_path(sections)
    # The JSON first: a figure measured is never lost to a rendering error.
    path.write_text(json.dumps(results, indent=2, sort_keys=True, default=float))
    Path(out_md).write_text(render(results))
    log(f"wrote {out_md} and {path} ({results['wall_s'] / 60:.1f} min)")
    return results

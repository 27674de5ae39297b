"""`make demo`: the whole main job on the embedded default, stage by stage, then a summary.

data -> teacher (trained once, skipped when present) -> cache-teacher (stage one) ->
baseline student -> distilled student from the store (stage two) -> summary with
teacher AP, student AP with and without distillation, store size and time per stage.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from pipeline.trainer import write_json

TEACHER_CFG = "configs/embedded/teacher_R101_FPN.yaml"
STUDENT_CFG = "configs/embedded/student_R50_FPN.yaml"
OUT = Path("output/embedded")


def _stage(name: str, args: list[str], times: dict) -> None:
    print(f"\n=== demo: {name} ===", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", *args], check=True)
    times[name] = round(time.perf_counter() - start, 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="hint")
    parser.add_argument("--b", type=float, default=-1.0, help="loss_kd weight; < 0: the method's default")
    parser.add_argument("--iters", type=int, default=None, help="student iterations (default: the config's)")
    args = parser.parse_args(argv)
    iters = ["SOLVER.MAX_ITER", str(args.iters)] if args.iters else []
    times: dict[str, float] = {}
    _stage("data", ["tools.embedded_data"], times)
    _stage("teacher", ["pipeline.train_teacher", "--config-file", TEACHER_CFG], times)
    _stage("cache-teacher", ["pipeline.cache_teacher", "--config-file", STUDENT_CFG], times)
    _stage("baseline student", ["pipeline.train_student", "--config-file", STUDENT_CFG, "DISTILL.ENABLE", "False",
                                "OUTPUT_DIR", str(OUT / "student" / "baseline"), *iters], times)
    _stage(f"{args.method} student", ["pipeline.train_student", "--config-file", STUDENT_CFG, "DISTILL.DISTILL", args.method,
                                      "DISTILL.B", str(args.b), "OUTPUT_DIR", str(OUT / "student" / args.method), *iters], times)

    teacher = json.loads((OUT / "teacher" / "teacher_metrics.json").read_text())
    store = json.loads((OUT / "teacher_store.zarr.summary.json").read_text())
    baseline = json.loads((OUT / "student" / "baseline" / "student_metrics.json").read_text())
    student = json.loads((OUT / "student" / args.method / "student_metrics.json").read_text())
    summary = {"teacher": teacher, "store": store, "baseline": baseline, "student": student, "stage_seconds": times}
    lines = [
        "| | box AP | AP50 | AP75 |", "|---|---|---|---|",
        *(f"| {name} | {m['bbox'].get('AP', float('nan')):.2f} | {m['bbox'].get('AP50', float('nan')):.2f} | "
          f"{m['bbox'].get('AP75', float('nan')):.2f} |"
          for name, m in (("teacher R101-FPN", teacher), ("student R50-FPN alone", baseline),
                          (f"student R50-FPN + {args.method} (B={student['B']:g}) from the store", student))),
        "",
        f"Store: {store['images_total']} images, {store['bytes_on_disk'] / 2**20:.1f} MB on disk, "
        f"{store['bytes_per_image'] / 2**10:.0f} KiB/image ({store['ratio_vs_fp32']:.1f}x smaller than fp32), codec {store['codec']}, flip {store['flip']}.",
        "",
        "| stage | seconds |", "|---|---|", *(f"| {k} | {v:.0f} |" for k, v in times.items()),
        f"\nTeacher training (when it ran): {teacher['train_seconds']:.0f} s for {teacher['iterations']} iterations.",
    ]
    text = "\n".join(lines) + "\n"
    (OUT / "demo_summary.md").write_text(text)
    write_json(OUT / "demo_summary.json", summary)
    print("\n=== demo: summary ===\n" + text + f"(written to {OUT / 'demo_summary.md'})")
    return summary


if __name__ == "__main__":
    main()

"""`make sweep`: the baseline and each distillation method trained from one store, then a table and a plot.

The teacher runs once (stage one); every method reads the same store. Results go to
output/embedded/student/: results.md, results.csv, results.png, beside one folder per run.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from pipeline.losses import DEFAULT_WEIGHTS, METHODS, loss_class


def run_student(config: str, out_dir: Path, method: str | None, b: float, iters: int | None, opts: list[str],
                reuse: bool = True) -> dict:
    """Train one student in a fresh process (clean detectron2 state) and return its student_metrics.json.

    With reuse, a finished run of the same method, weight and iterations in out_dir (e.g. the
    demo's) is read instead of trained again.
    """
    done = out_dir / "student_metrics.json"
    if reuse and done.exists() and not opts:
        m = json.loads(done.read_text())
        if m["method"] == (method or "baseline") and (method is None or m["B"] == b) and (iters is None or m["iterations"] == iters):
            print(f"sweep: reusing {done}")
            return m
    cmd = [sys.executable, "-m", "pipeline.train_student", "--config-file", config, "OUTPUT_DIR", str(out_dir)]
    cmd += ["DISTILL.ENABLE", "False"] if method is None else ["DISTILL.DISTILL", method, "DISTILL.B", str(b)]
    if iters:
        cmd += ["SOLVER.MAX_ITER", str(iters)]
    subprocess.run(cmd + list(opts), check=True)
    return json.loads((out_dir / "student_metrics.json").read_text())


def check_store_serves(config: str, methods: list[str], opts: list[str]) -> None:
    """Stop before any training when a method needs what the config's store will not hold (kd: RPN outputs)."""
    from pipeline.config import get_distill_cfg

    cfg = get_distill_cfg(config, opts)
    needs_rpn = [m for m in methods if loss_class(m).source != "features"]
    if needs_rpn and not cfg.DISTILL.CACHE.RPN:
        raise SystemExit(f"{needs_rpn} distil the teacher's RPN outputs, but {config} builds its store without them "
                         "(DISTILL.CACHE.RPN False): set it True and rebuild the store (make cache-teacher OVERWRITE=1), "
                         f"or leave {needs_rpn} out of --methods")


def write_results(rows: list[dict], teacher_ap: float | None, out: Path) -> None:
    """results.csv, results.md and results.png (box AP per method against the baseline and the teacher)."""
    out.mkdir(parents=True, exist_ok=True)
    fields = ["method", "B", "AP", "AP50", "AP75", "wall_seconds", "seconds_per_iter"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in fields} for r in rows)
    lines = ["| method | B | box AP | AP50 | AP75 | wall (s) | s/iter |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['B']:g} | {r['AP']:.2f} | {r['AP50']:.2f} | {r['AP75']:.2f} | "
                     f"{r['wall_seconds']:.0f} | {r['seconds_per_iter'] or float('nan'):.2f} |")
    if teacher_ap is not None:
        lines.append(f"\nTeacher (R101-FPN) box AP: {teacher_ap:.2f}")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["method"] for r in rows]
    ax.bar(names, [r["AP"] for r in rows], color=["#888" if n == "baseline" else "#3a7" for n in names])
    baseline = next((r["AP"] for r in rows if r["method"] == "baseline"), None)
    if baseline is not None:
        ax.axhline(baseline, color="#888", linestyle="--", label=f"baseline {baseline:.1f}")
    if teacher_ap is not None:
        ax.axhline(teacher_ap, color="#c33", linestyle=":", label=f"teacher {teacher_ap:.1f}")
    ax.set_ylabel("val box AP")
    ax.set_title("Student R50-FPN: distillation methods from one teacher-feature store")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config-file", default="configs/embedded/student_R50_FPN.yaml")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--b", nargs="*", default=[], help="METHOD=WEIGHT overrides of losses.DEFAULT_WEIGHTS")
    parser.add_argument("--out", default="output/embedded/student", help="one folder per run, and the results")
    parser.add_argument("--no-reuse", action="store_true", help="retrain runs that already finished in --out")
    parser.add_argument("--teacher-metrics", default="output/embedded/teacher/teacher_metrics.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for every run")
    args = parser.parse_args(argv)
    weights = dict(DEFAULT_WEIGHTS, **{k: float(v) for k, v in (item.split("=", 1) for item in args.b)})
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    check_store_serves(args.config_file, args.methods, args.opts)
    out = Path(args.out)
    rows = []
    for method in [None] + args.methods:
        name = method or "baseline"
        m = run_student(args.config_file, out / name, method, weights.get(method, 0.0), args.iters, args.opts,
                        reuse=not args.no_reuse)
        rows.append({"method": name, "B": m["B"], **{k: m["bbox"].get(k, float("nan")) for k in ("AP", "AP50", "AP75")},
                     "wall_seconds": m["wall_seconds"], "seconds_per_iter": m["seconds_per_iter"]})
        write_results(rows, None, out)  # partial results survive an interrupted sweep
    teacher = Path(args.teacher_metrics)
    teacher_ap = json.loads(teacher.read_text())["bbox"].get("AP") if teacher.exists() else None
    write_results(rows, teacher_ap, out)
    print((out / "results.md").read_text())
    return rows


if __name__ == "__main__":
    main()

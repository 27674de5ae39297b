"""`make sweep [SEEDS=N]`: the baseline and each distillation method trained from one store, N seeds each,
then a table with mean ± std, a 95 % interval and Welch's t-test against the baseline, and a plot.

The teacher runs once (stage one); every run reads the same store. Seed i of a method trains with
detectron2's `SEED` = base + i and `DISTILL.TRIAL` = i (base: the config's SEED when >= 0, else 0),
in output/embedded/student/<method>/seed<i>/; a finished run with the same command is reused.
Results: results.md, results.csv (one row per method), results_runs.csv (one row per run), results.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.losses import DEFAULT_WEIGHTS, METHODS, loss_class

ALPHA = 0.05  # one-sided level of "beats the baseline"
RUN_FILE = "sweep_run.json"  # the command a run folder was trained with: reused only when it matches


# ------------------------------------------------------------------------------------------ statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use symmetry on the other
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df > 0 degrees of freedom (df need not be an integer: Welch's is not)."""
    if not df > 0:
        raise ValueError(f"t distribution needs df > 0, got df={df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on t_cdf), e.g. t_ppf(0.975, 2) = 4.3027."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile q must be in (0, 1), got q={q}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Summary:
    """Sample mean, sample standard deviation (n - 1) and the t-based 95 % interval of the mean."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


def summarize(values: list[float], level: float = 0.95) -> Summary:
    n = len(values)
    if n == 0:
        raise ValueError("summarize needs at least one value, got none")
    mean = sum(values) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class WelchResult:
    """Welch's unequal-variance t-test of mean(a) > mean(b): statistic, Welch-Satterthwaite df, one-sided p."""

    t: float
    df: float
    p: float


def welch_t_test(a: list[float], b: list[float]) -> WelchResult:
    """One-sided Welch t-test that a's mean exceeds b's; needs at least two values in each."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's t-test needs >= 2 runs per group, got {len(a)} and {len(b)}: run more seeds (SEEDS=3)")
    sa, sb = summarize(a), summarize(b)
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    diff = sa.mean - sb.mean
    if va + vb == 0.0:  # no spread at all: the sign of the difference decides
        return WelchResult(math.copysign(math.inf, diff) if diff else 0.0, float(sa.n + sb.n - 2),
                           0.0 if diff > 0 else (0.5 if diff == 0 else 1.0))
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    return WelchResult(t, df, 1.0 - t_cdf(t, df))


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone): control the chance of any false 'beats'."""
    order = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted


# ------------------------------------------------------------------------------------------ runs


def seed_opts(config: str, opts: list[str], trial: int) -> list[str]:
    """KEY VALUE overrides of trial `trial`: SEED = base + trial (base: the config's SEED if >= 0, else 0)."""
    from pipeline.config import get_distill_cfg

    base = get_distill_cfg(config, opts).SEED
    return ["SEED", str(max(base, 0) + trial), "DISTILL.TRIAL", str(trial)]


def student_command(config: str, out_dir: Path, method: str | None, b: float, iters: int | None,
                    opts: list[str], trial: int) -> list[str]:
    """The train_student arguments of one run (everything after `python -m`)."""
    cmd = ["pipeline.train_student", "--config-file", config, "OUTPUT_DIR", str(out_dir)]
    cmd += ["DISTILL.ENABLE", "False"] if method is None else ["DISTILL.DISTILL", method, "DISTILL.B", str(b)]
    if iters:
        cmd += ["SOLVER.MAX_ITER", str(iters)]
    return cmd + list(opts) + seed_opts(config, opts, trial)


def run_student(cmd: list[str], out_dir: Path, reuse: bool = True) -> dict:
    """Train one student in a fresh process (clean detectron2 state) and return its student_metrics.json.

    With reuse, a finished run in out_dir trained with exactly this command is read instead of trained again.
    """
    done, record = out_dir / "student_metrics.json", out_dir / RUN_FILE
    if reuse and done.exists() and record.exists() and json.loads(record.read_text()).get("command") == cmd:
        print(f"sweep: reusing {done}")
        return json.loads(done.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    record.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", *cmd], check=True)
    record.write_text(json.dumps({"command": cmd}, indent=1))  # only after success: a crashed run is retrained
    return json.loads(done.read_text())


def check_store_serves(config: str, methods: list[str], opts: list[str]) -> None:
    """Stop before any training when a method needs what the config's store will not hold (kd: RPN outputs)."""
    from pipeline.config import get_distill_cfg

    cfg = get_distill_cfg(config, opts)
    needs_rpn = [m for m in methods if loss_class(m).source != "features"]
    if needs_rpn and not cfg.DISTILL.CACHE.RPN:
        raise SystemExit(f"{needs_rpn} distil the teacher's RPN outputs, but {config} builds its store without them "
                         "(DISTILL.CACHE.RPN False): set it True and rebuild the store (make cache-teacher OVERWRITE=1), "
                         f"or leave {needs_rpn} out of --methods")


# ------------------------------------------------------------------------------------------ results

RUN_FIELDS = ["method", "trial", "seed", "B", "AP", "AP50", "AP75", "wall_seconds", "seconds_per_iter"]
METHOD_FIELDS = ["method", "B", "n", "AP_mean", "AP_std", "AP_ci95_low", "AP_ci95_high", "AP50_mean", "AP75_mean",
                 "welch_t", "welch_df", "p_one_sided", "p_holm", "beats_baseline", "seconds_per_iter_mean"]


def method_table(runs: list[dict]) -> list[dict]:
    """One row per method (in first-seen order): AP summary and Welch's test against the baseline's runs.

    beats_baseline is "yes" when the one-sided p < ALPHA, "yes (Holm)" when it stays below ALPHA after
    Holm's correction over all methods compared, "no" otherwise, "n/a" with fewer than 2 runs.
    """
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    base = [r["AP"] for r in by_method.get("baseline", [])]
    rows, p_values = [], {}
    for name, rs in by_method.items():
        ap = summarize([r["AP"] for r in rs])
        spi = [r["seconds_per_iter"] for r in rs if r.get("seconds_per_iter") is not None]
        row = {"method": name, "B": rs[0]["B"], "n": ap.n, "AP_mean": ap.mean, "AP_std": ap.std,
               "AP_ci95_low": ap.ci_low, "AP_ci95_high": ap.ci_high,
               "AP50_mean": summarize([r["AP50"] for r in rs]).mean, "AP75_mean": summarize([r["AP75"] for r in rs]).mean,
               "welch_t": math.nan, "welch_df": math.nan, "p_one_sided": math.nan, "p_holm": math.nan,
               "beats_baseline": "", "seconds_per_iter_mean": sum(spi) / len(spi) if spi else math.nan}
        if name != "baseline":
            if len(rs) >= 2 and len(base) >= 2:
                w = welch_t_test([r["AP"] for r in rs], base)
                row.update(welch_t=w.t, welch_df=w.df, p_one_sided=w.p)
                p_values[name] = w.p
            else:
                row["beats_baseline"] = "n/a"
        rows.append(row)
    adjusted = holm(p_values)
    for row in rows:
        if row["method"] in adjusted:
            row["p_holm"] = adjusted[row["method"]]
            row["beats_baseline"] = ("yes (Holm)" if row["p_holm"] < ALPHA else "yes") if row["p_one_sided"] < ALPHA else "no"
    return rows


def _fmt(v: float, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def write_results(runs: list[dict], teacher_ap: float | None, out: Path, command: str | None = None) -> list[dict]:
    """results_runs.csv, results.csv, results.md and results.png; return the per-method rows."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results_runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RUN_FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in RUN_FIELDS} for r in runs)
    rows = method_table(runs)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METHOD_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| method | B | n | box AP mean ± std | 95 % interval | AP50 | AP75 | Welch t (df) | p | beats baseline | s/iter |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        welch = "" if math.isnan(r["welch_t"]) else f"{r['welch_t']:.2f} ({r['welch_df']:.1f})"
        lines.append(f"| {r['method']} | {r['B']:g} | {r['n']} | {_fmt(r['AP_mean'])} ± {_fmt(r['AP_std'])} | "
                     f"[{_fmt(r['AP_ci95_low'])}, {_fmt(r['AP_ci95_high'])}] | {_fmt(r['AP50_mean'])} | "
                     f"{_fmt(r['AP75_mean'])} | {welch} | {_fmt(r['p_one_sided'], 3)} | {r['beats_baseline']} | "
                     f"{_fmt(r['seconds_per_iter_mean'])} |")
    lines.append(f"\nmean ± sample std over n seeds; 95 % interval of the mean from Student's t (n - 1 df). "
                 f"'beats baseline': one-sided Welch's t-test of the method's box AP against the baseline's, "
                 f"p < {ALPHA}; '(Holm)': still below {ALPHA} after Holm's correction over the {sum(r['method'] != 'baseline' for r in rows)} "
                 "methods compared.")
    if teacher_ap is not None:
        lines.append(f"\nTeacher (R101-FPN) box AP: {teacher_ap:.2f}")
    if command:
        lines.append(f"\nCommand: `{command}`")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(runs, rows, teacher_ap, out / "results.png")
    return rows


def _plot(runs: list[dict], rows: list[dict], teacher_ap: float | None, path: Path) -> None:
    """Mean box AP per method with 95 % interval error bars, each run as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(rows) + 2), 3.8))
    names = [r["method"] for r in rows]
    means = [r["AP_mean"] for r in rows]
    err = [[0.0 if math.isnan(r["AP_ci95_low"]) else r["AP_mean"] - r["AP_ci95_low"] for r in rows],
           [0.0 if math.isnan(r["AP_ci95_high"]) else r["AP_ci95_high"] - r["AP_mean"] for r in rows]]
    colours = ["#888" if n == "baseline" else ("#2a6" if r["beats_baseline"].startswith("yes") else "#7bd")
               for n, r in zip(names, rows)]
    ax.bar(names, means, yerr=err, capsize=4, color=colours, ecolor="#222")
    for i, name in enumerate(names):
        pts = [r["AP"] for r in runs if r["method"] == name]
        ax.scatter([i] * len(pts), pts, color="#222", s=10, zorder=3)
    base = next((r for r in rows if r["method"] == "baseline"), None)
    if base is not None:
        ax.axhline(base["AP_mean"], color="#888", linestyle="--", label=f"baseline {base['AP_mean']:.1f}")
    if teacher_ap is not None:
        ax.axhline(teacher_ap, color="#c33", linestyle=":", label=f"teacher {teacher_ap:.1f}")
    n = sorted({r["n"] for r in rows})
    ax.set_ylabel("val box AP")
    ax.set_title(f"Student R50-FPN from one teacher-feature store: mean, 95 % interval, runs (n = {'/'.join(map(str, n))})",
                 fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config-file", default="configs/embedded/student_R50_FPN.yaml")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="distillation methods besides the baseline (none: the baseline alone)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per method (seed index 0..N-1)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--b", nargs="*", default=[], help="METHOD=WEIGHT overrides of losses.DEFAULT_WEIGHTS")
    parser.add_argument("--out", default="output/embedded/student", help="one folder per run, and the results")
    parser.add_argument("--no-reuse", action="store_true", help="retrain runs that already finished in --out")
    parser.add_argument("--teacher-metrics", default="output/embedded/teacher/teacher_metrics.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for every run")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise SystemExit(f"--seeds {args.seeds}: give at least 1 (3 or more for intervals and Welch's test)")
    weights = dict(DEFAULT_WEIGHTS, **{k: float(v) for k, v in (item.split("=", 1) for item in args.b)})
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    check_store_serves(args.config_file, args.methods, args.opts)
    out = Path(args.out)
    command = "python -m tools.sweep " + shlex.join(sys.argv[1:] if argv is None else argv)
    teacher = Path(args.teacher_metrics)
    teacher_ap = json.loads(teacher.read_text())["bbox"].get("AP") if teacher.exists() else None
    runs: list[dict] = []
    for trial in range(args.seeds):  # seed-major: an interrupted sweep has every method at equal n
        for method in [None] + args.methods:
            name = method or "baseline"
            run_dir = out / name / f"seed{trial}"
            cmd = student_command(args.config_file, run_dir, method, weights.get(method, 0.0), args.iters, args.opts, trial)
            m = run_student(cmd, run_dir, reuse=not args.no_reuse)
            runs.append({"method": name, "trial": m.get("trial", trial), "seed": m.get("seed"), "B": m["B"],
                         **{k: m["bbox"].get(k, math.nan) for k in ("AP", "AP50", "AP75")},
                         "wall_seconds": m["wall_seconds"], "seconds_per_iter": m["seconds_per_iter"]})
            write_results(runs, teacher_ap, out, command)  # partial results survive an interrupted sweep
    print((out / "results.md").read_text())
    return runs


if __name__ == "__main__":
    main()

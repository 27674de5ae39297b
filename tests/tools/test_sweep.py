"""The sweep's statistics and results: seeds per method, mean ± std, 95 % intervals, Welch's t-test, plot."""
import csv
import json
import math
from pathlib import Path

import pytest

from tools.sweep import holm, method_table, run_student, seed_opts, student_command, summarize, t_cdf, t_ppf, welch_t_test, write_results


def _run(method, trial, ap, b=0.0):
    return {"method": method, "trial": trial, "seed": trial, "B": b, "AP": ap, "AP50": 2 * ap, "AP75": ap / 2,
            "wall_seconds": 300.0, "seconds_per_iter": 2.0}


# ------------------------------------------------------------------------------------- t distribution


def test_t_cdf_matches_the_closed_forms_for_one_and_two_degrees_of_freedom():
    for t in (-3.0, -0.4, 0.0, 1.0, 2.5, 40.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_t_quantiles_match_the_printed_tables():
    # Two-sided 95 % critical values (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
    for df, value in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert t_ppf(0.975, df) == pytest.approx(value, abs=5e-4)
    assert t_ppf(0.95, 4) == pytest.approx(2.132, abs=5e-4)
    assert t_ppf(0.025, 10) == pytest.approx(-t_ppf(0.975, 10), abs=1e-9)


def test_t_cdf_accepts_a_fractional_df_and_refuses_a_non_positive_one():
    assert t_cdf(2.0, 4.5) > t_cdf(2.0, 4) and t_cdf(2.0, 4.5) < t_cdf(2.0, 5)
    with pytest.raises(ValueError, match="df > 0"):
        t_cdf(1.0, 0)


# ------------------------------------------------------------------------------------- summaries, Welch


def test_summary_is_mean_sample_std_and_the_t_interval():
    s = summarize([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    half = 4.302653 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n)
    assert (s.ci_low, s.ci_high) == (pytest.approx(2.0 - half, abs=1e-5), pytest.approx(2.0 + half, abs=1e-5))
    one = summarize([4.0])
    assert one.mean == 4.0 and math.isnan(one.std) and math.isnan(one.ci_low)


def test_welch_t_and_df_match_the_hand_computed_values():
    # a = 4, 5, 6, 7: mean 5.5, s^2 = 5/3; b = 1, 2, 3: mean 2, s^2 = 1.
    # se^2 = (5/3)/4 + 1/3 = 3/4, t = 3.5 / sqrt(0.75) = 4.04145;
    # df = 0.75^2 / ((5/12)^2 / 3 + (1/3)^2 / 2) = 0.5625 / 0.113426 = 4.95918.
    w = welch_t_test([4.0, 5.0, 6.0, 7.0], [1.0, 2.0, 3.0])
    assert w.t == pytest.approx(3.5 / math.sqrt(0.75), abs=1e-9)
    assert w.df == pytest.approx(0.5625 / ((5 / 12) ** 2 / 3 + (1 / 3) ** 2 / 2), abs=1e-9)
    assert w.p == pytest.approx(1 - t_cdf(w.t, w.df)) and 0.004 < w.p < 0.006  # one-sided; t_{0.995, 5} = 4.032
    assert welch_t_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]).p > 0.99


def test_welch_refuses_single_runs_with_the_fix():
    with pytest.raises(ValueError, match="SEEDS=3"):
        welch_t_test([1.0], [1.0, 2.0])


def test_holm_multiplies_by_the_remaining_count_and_stays_monotone():
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == {"a": 0.03, "c": pytest.approx(0.06), "b": pytest.approx(0.06)}


# ------------------------------------------------------------------------------------- the table


def test_a_method_beats_the_baseline_only_beyond_the_seed_noise():
    runs = [_run("baseline", i, ap) for i, ap in enumerate((3.0, 3.4, 2.8))]
    runs += [_run("hint", i, ap, 0.05) for i, ap in enumerate((6.0, 6.3, 5.9))]  # far above the spread
    runs += [_run("nst", i, ap, 10) for i, ap in enumerate((2.6, 3.9, 3.5))]  # within it
    rows = {r["method"]: r for r in method_table(runs)}
    assert rows["hint"]["beats_baseline"] == "yes (Holm)" and rows["hint"]["p_one_sided"] < 0.001
    assert rows["nst"]["beats_baseline"] == "no" and rows["nst"]["p_one_sided"] > 0.2
    assert rows["baseline"]["beats_baseline"] == "" and rows["baseline"]["AP_mean"] == pytest.approx(9.2 / 3)
    assert rows["hint"]["p_holm"] == pytest.approx(2 * rows["hint"]["p_one_sided"])


def test_with_one_seed_there_is_no_test_and_the_table_says_so():
    rows = {r["method"]: r for r in method_table([_run("baseline", 0, 3.0), _run("hint", 0, 4.0, 0.05)])}
    assert rows["hint"]["beats_baseline"] == "n/a" and math.isnan(rows["hint"]["AP_std"])


def test_results_files_hold_every_run_the_method_summary_the_command_and_a_plot(tmp_path):
    runs = [_run("baseline", i, ap) for i, ap in enumerate((3.0, 3.4, 2.8))]
    runs += [_run("hint", i, ap, 0.05) for i, ap in enumerate((6.0, 6.3, 5.9))]
    write_results(runs, teacher_ap=30.2, out=tmp_path, command="python -m tools.sweep --seeds 3 --methods hint")
    with open(tmp_path / "results_runs.csv") as f:
        assert [(r["method"], r["trial"]) for r in csv.DictReader(f)] == [(m, str(i)) for m in ("baseline", "hint") for i in range(3)]
    with open(tmp_path / "results.csv") as f:
        table = {r["method"]: r for r in csv.DictReader(f)}
    assert float(table["hint"]["AP_mean"]) == pytest.approx(6.0667, abs=1e-4) and table["hint"]["n"] == "3"
    md = (tmp_path / "results.md").read_text()
    assert "| hint | 0.05 | 3 | 6.07 ± 0.21 |" in md and "Welch" in md
    assert "Teacher (R101-FPN) box AP: 30.20" in md and "Command: `python -m tools.sweep --seeds 3 --methods hint`" in md
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------- runs and reuse


def test_each_trial_gets_its_own_seed_and_trial_index():
    config = "configs/embedded/student_R50_FPN.yaml"
    assert seed_opts(config, [], 2) == ["SEED", "2", "DISTILL.TRIAL", "2"]
    assert seed_opts(config, ["SEED", "10"], 1) == ["SEED", "11", "DISTILL.TRIAL", "1"]
    cmd = student_command(config, Path("out/hint/seed1"), "hint", 0.05, 20, [], 1)
    assert cmd[:5] == ["pipeline.train_student", "--config-file", config, "OUTPUT_DIR", "out/hint/seed1"]
    assert cmd[-4:] == ["SEED", "1", "DISTILL.TRIAL", "1"] and ["SOLVER.MAX_ITER", "20"] == cmd[9:11]


def test_a_finished_run_is_reused_only_when_its_command_matches(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        (tmp_path / "student_metrics.json").write_text(json.dumps({"method": "hint", "bbox": {"AP": 1.0}}))

    monkeypatch.setattr("tools.sweep.subprocess.run", fake_run)
    cmd = ["pipeline.train_student", "SEED", "0"]
    run_student(cmd, tmp_path)
    run_student(cmd, tmp_path)  # reused
    assert len(calls) == 1
    run_student(["pipeline.train_student", "SEED", "1"], tmp_path)  # another seed: retrained
    assert len(calls) == 2
    run_student(["pipeline.train_student", "SEED", "1"], tmp_path, reuse=False)
    assert len(calls) == 3


def test_the_sweep_trains_every_method_once_per_seed_seed_major_in_its_own_folder(tmp_path, monkeypatch):
    config = str(Path(__file__).resolve().parents[2] / "configs" / "embedded" / "student_R50_FPN.yaml")
    trained = []

    def fake_run(cmd, out_dir, reuse=True):
        trained.append((out_dir.relative_to(tmp_path).as_posix(), cmd[cmd.index("SEED") + 1]))
        name = out_dir.parent.name
        return {"method": name, "trial": int(cmd[-1]), "seed": int(cmd[cmd.index("SEED") + 1]), "B": 0.0 if name == "baseline" else 0.05,
                "bbox": {"AP": 3.0 + len(trained) % 3, "AP50": 9.0, "AP75": 1.0}, "wall_seconds": 1.0, "seconds_per_iter": 0.5}

    monkeypatch.setattr("tools.sweep.run_student", fake_run)
    from tools.sweep import main

    runs = main(["--config-file", config, "--methods", "hint", "--seeds", "2", "--out", str(tmp_path), "--teacher-metrics", "/none"])
    assert trained == [("baseline/seed0", "0"), ("hint/seed0", "0"), ("baseline/seed1", "1"), ("hint/seed1", "1")]
    assert [(r["method"], r["trial"]) for r in runs] == [("baseline", 0), ("hint", 0), ("baseline", 1), ("hint", 1)]
    assert "| hint | 0.05 | 2 |" in (tmp_path / "results.md").read_text()
    trained.clear()
    main(["--config-file", config, "--methods", "--seeds", "1", "--out", str(tmp_path), "--teacher-metrics", "/none"])
    assert trained == [("baseline/seed0", "0")]  # no methods: the baseline alone

"""The sweep's results: one row per run in CSV and markdown, and a plot against baseline and teacher."""
import csv

from tools.sweep import write_results


def test_results_table_csv_and_plot_hold_every_run(tmp_path):
    rows = [
        {"method": "baseline", "B": 0.0, "AP": 1.5, "AP50": 4.0, "AP75": 0.5, "wall_seconds": 300.0, "seconds_per_iter": 1.9},
        {"method": "hint", "B": 0.05, "AP": 2.0, "AP50": 5.0, "AP75": 0.7, "wall_seconds": 320.0, "seconds_per_iter": 2.0},
    ]
    write_results(rows, teacher_ap=4.2, out=tmp_path)
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["baseline", "hint"] and float(table[1]["AP"]) == 2.0
    md = (tmp_path / "results.md").read_text()
    assert "| hint | 0.05 | 2.00 |" in md and "Teacher (R101-FPN) box AP: 4.20" in md
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

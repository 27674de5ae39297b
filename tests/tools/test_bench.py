"""The bench: sections are chosen by name, the report is rendered from the JSON alone, and its targets are
named by what they bound."""
import json
import math
import zipfile

import pytest
import torch

from tools.bench.__main__ import main
from tools.bench.render import render
from tools.bench.spec import DEFAULT_SECTIONS, SECTIONS, TARGETS, selected_sections


def small_results() -> dict:
    """A bench JSON holding one section: codecs at both sizes."""
    levels = {"p2": 0.01, "p3": 0.02}
    codec = lambda ratio, dev: {  # noqa: E731
        "bytes_per_image": 1000.0, "raw_fp32_bytes_per_image": 1000.0 * ratio, "ratio_vs_fp32": ratio,
        "views_stored": 2, "images": 4, "levels": {lv: {"rel_l2": v, "max_abs": 0.5} for lv, v in levels.items()},
        "loss_kd_rel_dev": {"hint": dev, "pkt": 2 * dev}}
    codecs = {size: {"fp16": codec(1.9, 1e-5), "int8": codec(7.7, 6e-4), "int8-std0.2": codec(11.0, 0.0085),
                     "loss_batch": {"image_ids": [1, 2], "batches": [], "loss_kd_fp32": {}}}
              for size in ("embedded", "coco")}
    codecs["coco"]["fp16"]["projected_coco_train2017_bytes"] = 7.6e12

    return {"command": "python -m tools.bench --sections codecs", "wall_s": 90.0,
            "machine": {"date_utc": "today", "cpu": "cpu", "cores": 2, "ram_gib": 8, "torch": "2", "torch_threads": 2,
                        "gpu": "no GPU", "python": "3.11", "loadavg_start": [1, 1, 1], "loadavg_end": [2, 2, 2]},
            "plan": {"embedded_images": 16, "embedded_every": 15, "coco_images": 2},
            "targets": TARGETS, "methods": ["hint", "pkt"], "codec_names": ["fp16", "int8", "int8-std0.2"],
            "codecs": codecs}


def test_the_default_run_leaves_out_the_codec_candidate_study_which_stays_selectable():
    assert "codec_candidates" in SECTIONS and "codec_candidates" not in DEFAULT_SECTIONS
    assert selected_sections() == list(DEFAULT_SECTIONS)
    assert selected_sections(["codec_candidates"]) == ["codec_candidates"]


def test_a_section_brings_the_sections_it_reports_from_in_run_order():
    assert selected_sections(["sweep"]) == ["stage_one", "student_step", "sweep"]
    assert selected_sections(["reader", "flip"]) == ["codecs", "flip", "reader"]


def test_an_unknown_section_is_one_line_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--sections", "codecs,fastest"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'fastest'" in err and "parity" in err and "codec_candidates" in err


def test_target_names_say_what_they_bound_without_issue_numbers():
    assert all("issue" not in name for name in TARGETS)
    report = render(small_results())
    assert "issue" not in report.lower()


def test_the_report_renders_the_sections_of_the_json_and_only_those(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(small_results(), sort_keys=True))
    out = tmp_path / "BENCHMARKS.md"
    main(["--render", str(path), "--out", str(out)])
    report = out.read_text()
    assert "## 4. Codecs" in report
    assert "## 1. Student step" not in report and "## 6. Parity" not in report
    # codecs: the worst method of the lossy codec with its verdict against the 1% target
    assert "| COCO size (800x1088) | int8 | 7.700 | **missed** (7.700 vs >= 8" in report
    assert "|  | int8-std0.2 | 11.000 | met (>= 8) | 0.017 (pkt) | **missed** (0.017 vs <= 0.01" in report


def test_render_of_an_unreadable_json_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bench.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as exit_:
        main(["--render", str(bad), "--out", str(tmp_path / "B.md")])
    assert exit_.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1

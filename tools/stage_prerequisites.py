"""Which Make targets a student config needs before its stage runs: `data`, `teacher`, both or neither.

    python -m tools.stage_prerequisites --config-file STUDENT_CFG [KEY VALUE ...]   (prints e.g. "data teacher")

`make cache-teacher` and `make train-student` run what this prints, so the embedded teacher is trained
only when the student's DISTILL.PATH_T is that checkpoint and it is missing, and the embedded dataset is
generated only when the student (or that teacher) trains on it. The student's OPTS never reach the teacher.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import get_distill_cfg
from pipeline.plan import EMBEDDED_TEACHER


def prerequisites(config_file: str, opts: list[str]) -> list[str]:
    """The targets to make first, in order."""
    cfg = get_distill_cfg(config_file, opts)
    needs_teacher = bool(cfg.DISTILL.ENABLE) and bool(cfg.DISTILL.PATH_T) and (
        Path(cfg.DISTILL.PATH_T).resolve() == Path(EMBEDDED_TEACHER).resolve()) and not Path(EMBEDDED_TEACHER).exists()
    embedded = any(name.startswith("embedded_") for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST))
    return (["data"] if embedded or needs_teacher else []) + (["teacher"] if needs_teacher else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, as the stage gets them")
    args = parser.parse_args()
    print(" ".join(prerequisites(args.config_file, args.opts)))


if __name__ == "__main__":
    main()

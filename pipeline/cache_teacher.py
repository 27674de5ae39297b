"""Stage one's entry point: run the teacher once over the training set and write its features to a store.

    python -m pipeline.cache_teacher --config-file configs/embedded/student_R50_FPN.yaml [--overwrite] [KEY VALUE ...]

The config is the *student's*; see pipeline/stage_one.py for what is read from it.
"""
from __future__ import annotations

import json

from pipeline.plan import TeacherPlan
from pipeline.refusals import STORE_REFUSALS, refusals_as_one_line
from pipeline.stage_one import cache_teacher
from pipeline.trainer import setup, write_json
from cache.storage import is_url, storage_options_for, write_url_text
from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm


def main(args) -> dict:
    cfg = setup(args)
    with refusals_as_one_line("cache-teacher", STORE_REFUSALS + (ValueError,)):
        plan = TeacherPlan.from_config(cfg)  # a config the store cannot serve is refused here, in one line
        plan.fingerprint  # noqa: B018  (missing teacher weights: one line, before any work)
    with refusals_as_one_line("cache-teacher"):
        summary = cache_teacher(cfg, overwrite=args.overwrite, plan=plan)
    if comm.is_main_process():
        target = f"{cfg.DISTILL.CACHE.PATH.rstrip('/')}.summary.json"
        if is_url(target):
            write_url_text(target, json.dumps(summary, indent=2, sort_keys=True),
                           storage_options_for(target, cfg.DISTILL.CACHE.STORAGE_OPTIONS))
        else:
            write_json(target, summary)
    return summary


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument("--overwrite", action="store_true", help="delete an existing store and rebuild it")
    args = parser.parse_args()
    # One process per GPU with --num-gpus N (CUDA only); on CPU, or several machines, use torchrun (docs/scale-out.md).
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))

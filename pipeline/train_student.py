"""Stage two's entry point: train a detectron2 student with `loss_kd` from the store (or a live teacher).

    python -m pipeline.train_student --config-file configs/embedded/student_R50_FPN.yaml [--resume] [KEY VALUE ...]
    python -m pipeline.train_student --config-file ... --eval-only MODEL.WEIGHTS path/to/model_final.pth

DISTILL.ENABLE False trains the plain detectron2 baseline. At the end the student is evaluated on
DATASETS.TEST and `student_metrics.json` is written to OUTPUT_DIR. `--eval-only` only evaluates the
given weights, as detectron2's tools/train_net.py does.
"""
from __future__ import annotations

from pipeline.losses import loss_class
from pipeline.plan import TeacherPlan, check_teacher_weights
from pipeline.refusals import STORE_REFUSALS, refusals_as_one_line
from pipeline.stage_two import StudentTrainer, check_store, train_student
from pipeline.trainer import setup
from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm


def main(args) -> dict:
    cfg = setup(args)
    if args.eval_only:
        bbox = StudentTrainer.evaluate_weights(cfg, resume=args.resume)
        if comm.is_main_process():
            print(f"train-student --eval-only: {cfg.MODEL.WEIGHTS or cfg.OUTPUT_DIR}: val box AP "
                  f"{bbox.get('AP', float('nan')):.2f} AP50 {bbox.get('AP50', float('nan')):.2f}")
        return {"bbox": bbox}
    store_info = None
    if cfg.DISTILL.ENABLE:
        with refusals_as_one_line("train-student", STORE_REFUSALS + (ValueError,)):
            loss_class(cfg.DISTILL.DISTILL)  # an unknown method: one line listing the methods
            plan = TeacherPlan.from_config(cfg)  # a teacher or config the store cannot serve: one line
            check_teacher_weights(plan.weights)
            if cfg.DISTILL.SOURCE == "cache":
                store_info = check_store(cfg, plan)
    metrics = train_student(cfg, resume=args.resume, store_info=store_info)
    if comm.is_main_process():
        bbox = metrics["bbox"]
        print(f"train-student: {metrics['method']} (B={metrics['B']}) {cfg.SOLVER.MAX_ITER} iterations in "
              f"{metrics['wall_seconds'] / 60:.1f} min; val box AP {bbox.get('AP', float('nan')):.2f} "
              f"AP50 {bbox.get('AP50', float('nan')):.2f} -> {cfg.OUTPUT_DIR}")
    return metrics


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    # One process per GPU with --num-gpus N (CUDA only); on CPU, or several machines, use torchrun (docs/scale-out.md).
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))

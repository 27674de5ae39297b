"""`python -m tools.bench`: measure the chosen sections (default: all but codec_candidates), or --render a JSON."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tools.bench.spec import DEFAULT_SECTIONS, SECTIONS, selected_sections


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer images and steps, for trying it out")
    parser.add_argument("--sections", default="", help=f"comma-separated subset of {','.join(SECTIONS)} (default: "
                        f"{','.join(DEFAULT_SECTIONS)}); another choice writes output/bench/BENCHMARKS-<sections>.md "
                        "unless --out is given")
    parser.add_argument("--teacher", default=None, help="the trained teacher's weights "
                        "(default output/embedded/teacher/model_final.pth, which make bench trains)")
    parser.add_argument("--teacher-cfg", default=None, help="the teacher's config (default: the config.yaml beside "
                        "--teacher's weights, else the student config's DISTILL.CFG_T)")
    parser.add_argument("--photo-loss-batches", type=int, default=None, metavar="N",
                        help="photos: measure loss_kd and gradients on the first N batches of pairs (default 10: "
                        "every photograph in both views; 5: each once, views alternating between pairs)")
    parser.add_argument("--out", default=None, help="the Markdown report to write (default BENCHMARKS.md for the "
                        "default sections)")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="measure nothing: write the Markdown report (--out, default BENCHMARKS.md) of a bench JSON")
    args = parser.parse_args(argv)
    if args.render:
        from tools.bench.render import render  # no torch: rendering is instant

        out = args.out or "BENCHMARKS.md"
        try:
            results = json.loads(Path(args.render).read_text())
        except (OSError, json.JSONDecodeError) as e:
            parser.exit(2, f"--render {args.render}: not a readable bench JSON ({e}); give output/bench/bench.json "
                        "or another file a bench run wrote\n")
        Path(out).write_text(render(results))
        print(f"wrote {out} from {args.render}")
        return results
    try:
        sections = selected_sections([x for x in args.sections.replace(" ", ",").split(",") if x])
    except ValueError as e:
        parser.exit(2, f"--sections: {e}\n")
    import torch

    from tools.bench.context import BENCH_DIR, TEACHER_WEIGHTS
    from tools.bench.runner import run

    torch.set_num_threads(2)
    default = sections == list(DEFAULT_SECTIONS)
    out = args.out or ("BENCHMARKS.md" if default else str(BENCH_DIR / ("BENCHMARKS-" + "-".join(sections) + ".md")))
    command = " ".join(["python -m tools.bench"] + sys.argv[1:]) if argv is None else \
        " ".join(["python -m tools.bench"] + list(argv))
    plan = {} if args.photo_loss_batches is None else {"photo_loss_batches": args.photo_loss_batches}
    return run(args.quick, out, command, sections, teacher=args.teacher or TEACHER_WEIGHTS, plan_overrides=plan,
               teacher_cfg=args.teacher_cfg)


if __name__ == "__main__":
    main()

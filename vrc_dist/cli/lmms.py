"""`vrc lmms-eval ARGS...` (lmms-eval's own command line, with `vrc_llava` registered) and `vrc lmms-task`."""
from __future__ import annotations

import sys

from vrc_dist.data.shards import SHARDS_HELP


def _lmms_eval(args) -> int:
    try:
        from vrc_dist.lmms.launch import run_lmms_eval

        return run_lmms_eval(args.lmms_args)
    except ModuleNotFoundError as e:
        print(f"vrc lmms-eval: error: {e}", file=sys.stderr)
        return 2


def _lmms_task(args) -> int:
    from vrc_dist.lmms.task import write_task

    info = write_task(args.shards, args.out)
    print(f"wrote lmms-eval task vrc_toy to {info['dir']}: {info['images']} images, {info['questions']} questions "
          f"({', '.join(info['types'])}); run it with --tasks vrc_toy --include_path {info['dir']}")
    return 0


def register(sub) -> None:
    # prefix_chars="\0": no argument is an option of `vrc lmms-eval` itself, so --model etc. reach lmms-eval.
    p = sub.add_parser("lmms-eval", add_help=False, prefix_chars="\0",
                       help="lmms-eval's own command line with the vrc_llava model registered (needs the lmms extra)")
    p.add_argument("lmms_args", nargs="...", help="every argument goes to lmms-eval unchanged")
    p.set_defaults(func=_lmms_eval)

    p = sub.add_parser("lmms-task", help="toy eval shards as the offline lmms-eval task vrc_toy (Parquet + YAML)")
    p.add_argument("--shards", action="append", required=True, help=f"{SHARDS_HELP}; toy samples (the eval split)")
    p.add_argument("--out", required=True, help="task directory to write (give it to lmms-eval's --include_path)")
    p.set_defaults(func=_lmms_task)

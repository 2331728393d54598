"""`vrc eval`: pruning methods on the toy eval split, as a table and a plot (vrc_dist/eval)."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from vrc_dist.codebook.format import version_dir_name
from vrc_dist.config import FASTV_LAYER
from vrc_dist.data.shards import SHARDS_HELP

# The paper's rule, this project's extension, each with its null control, and the baselines.
DEFAULT_METHODS = "codebook,codebook-null,codebook-diverse,codebook-diverse-null,divprune,random,cls,fastv,pool"
# Options that change the numbers, with their defaults: the table's command names them when not default.
NUMBER_OPTIONS = {"limit": 0, "fastv_layer": FASTV_LAYER, "group_sim": None}
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _eval(args) -> int:
    from vrc_dist.codebook.store import Codebook
    from vrc_dist.eval.harness import evaluate
    from vrc_dist.eval.records import records_from_samples
    from vrc_dist.eval.tables import write_plot, write_table
    from vrc_dist.model.loading import load_checkpoint
    from vrc_dist.prune.baselines import CODEBOOK_METHODS
    from vrc_dist.prune.methods import GROUP_SIM
    from vrc_dist.toy.data import load_toy_samples
    from vrc_dist.toy.world import QUESTION_TYPES

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    samples = load_toy_samples(args.shards)
    if args.limit:
        samples = samples[: args.limit]
    model, processor = load_checkpoint(args.model)
    codebook = None
    if set(methods) & set(CODEBOOK_METHODS):
        codebook = Codebook.open(args.codebook, version=args.codebook_version,
                                 expected_dim=model.config.text_config.hidden_size)
    group_sim = GROUP_SIM if args.group_sim is None else args.group_sim
    torch_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = evaluate(model, processor, records_from_samples(samples), methods, _floats(args.keep), codebook=codebook,
                    batch_size=args.batch_size, seed=args.seed, fastv_layer=args.fastv_layer, group_sim=group_sim,
                    repeats=args.repeats,
                    progress=lambda r: print(f"{r['method']:>9} keep {r['keep']:<6} acc {r['accuracy']:.3f} "
                                             f"kept {r['kept_tokens']:.1f}", file=sys.stderr))
    # The codebook as the user named it, not its resolved path: a shipped table carries no machine path.
    cb = "" if codebook is None else (f", codebook `{args.codebook}` ({codebook.name} "
                                      f"{version_dir_name(codebook.version)}, {len(codebook.vectors)} prototypes)")
    shards = " ".join(f"--shards {shlex.quote(s)}" for s in args.shards)
    command = (f"vrc eval --model {args.model} --codebook {args.codebook} {shards} --keep {args.keep} "
               f"--methods {args.methods} --out {args.out}")
    for flag in NUMBER_OPTIONS:
        if getattr(args, flag) != NUMBER_OPTIONS[flag]:
            command += f" --{flag.replace('_', '-')} {getattr(args, flag)}"
    header = (f"# Pruning on the toy eval split\n\nmodel `{args.model}`{cb}; shards `{' '.join(args.shards)}` "
              f"({len(samples)} images, {rows[0]['questions']} questions); FastV K={args.fastv_layer}; "
              f"codebook group_sim {group_sim}; command: `{command}`\n\n"
              "acc_lo / acc_hi: bootstrap 95% interval over questions; vs_null: accuracy minus the same rule's "
              "with a random codebook (codebook-null / codebook-diverse-null), paired, with its interval; "
              "relative = accuracy / unpruned accuracy; prefill_gflops: language model, analytic "
              "(see vrc_dist/eval/flops.py); llm_prefill_ms includes select_ms, the pruner's own work before "
              "the first layer; times are per question, batch " + str(args.batch_size)
              + f", fastest of {args.repeats} runs.")
    write_table(rows, out, header, QUESTION_TYPES)
    write_plot(rows, out, "toy eval: accuracy vs kept visual tokens")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print((out / "results.md").read_text())
    return 0


def torch_threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def register(sub) -> None:
    p = sub.add_parser("eval", help="accuracy, FLOPs and time of visual token pruning methods on toy shards")
    p.add_argument("--model", default="toy", help="toy, or a LLaVA checkpoint directory")
    p.add_argument("--codebook", default="toy", help="toy, or a codebook directory")
    p.add_argument("--codebook-version", default=None)
    p.add_argument("--shards", action="append", required=True, help=f"{SHARDS_HELP}; toy samples (the eval split)")
    p.add_argument("--keep", default="1.0,0.5,0.25,0.111,0.056", help="comma-separated keep ratios")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated; also codebook-plain (the former name of codebook), oracle and "
                        "anti-oracle (toy shards only)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline, the null codebooks and the intervals")
    p.add_argument("--fastv-layer", type=int, default=NUMBER_OPTIONS["fastv_layer"], help="FastV's K")
    p.add_argument("--group-sim", type=float, default=NUMBER_OPTIONS["group_sim"],
                   help="codebook-diverse keep rule: cosine above which two visual tokens are alike "
                        "(default: vrc_dist.prune.GROUP_SIM)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch; the fastest counts")
    p.add_argument("--limit", type=int, default=NUMBER_OPTIONS["limit"], help="use only the first N images")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=_eval)

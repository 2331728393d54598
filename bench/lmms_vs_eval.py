"""lmms-eval's accuracy for vrc_llava beside `vrc eval`'s, on the same toy questions (the README's table).

    vrc toy make-shards --out /tmp/lmms/eval --split eval --seed 100 --shards 1 --per-shard 40
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv-lmms/bin/python bench/lmms_vs_eval.py --shards /tmp/lmms/eval

Runs in .venv-lmms (`make lmms-venv`). `vrc eval` with its defaults (seed 0, batch 64, one timed repeat) and
lmms-eval's simple_evaluate on the vrc_toy task written from the same shards, at batch sizes 1 and 4.
"""
from __future__ import annotations

import argparse
import tempfile

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", action="append", required=True)
    p.add_argument("--methods", default="codebook,random")
    p.add_argument("--keep", default="1.0,0.111")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vrc_dist.codebook import Codebook
    from vrc_dist.eval import evaluate, records_from_samples
    from vrc_dist.lmms.launch import register_model
    from vrc_dist.lmms.task import write_task
    from vrc_dist.model import load_checkpoint
    from vrc_dist.toy.data import load_toy_samples

    methods = args.methods.split(",")
    keeps = [float(k) for k in args.keep.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    model, processor = load_checkpoint("toy")
    rows = evaluate(model, processor, records_from_samples(load_toy_samples(args.shards)), methods, keeps, repeats=1,
                    codebook=Codebook.open("toy", expected_dim=model.config.text_config.hidden_size))
    ref = {(r["method"], r["keep"]): r for r in rows}
    task = tempfile.mkdtemp(prefix="vrc_toy_")
    write_task(args.shards, task)
    register_model()
    manager = TaskManager("WARNING", include_path=task, include_defaults=False)
    print("| method | keep | visual tokens | `vrc eval` accuracy | " +
          " | ".join(f"lmms-eval exact_match (batch {b})" for b in batches) + " | same answers across batches |")
    print("|---|---|---|---|" + "---|" * len(batches) + "---|")
    for method in methods:
        for keep in keeps:
            accs, answers = [], []
            for b in batches:
                out = simple_evaluate(model="vrc_llava", model_args=f"pretrained=toy,codebook=toy,keep={keep},method={method}",
                                      tasks=["vrc_toy"], batch_size=b, task_manager=manager, log_samples=True,
                                      bootstrap_iters=0, verbosity="WARNING")
                accs.append(out["results"]["vrc_toy"]["exact_match,none"])
                answers.append([s["filtered_resps"] for s in sorted(out["samples"]["vrc_toy"], key=lambda s: s["doc_id"])])
            r = ref[(method, keep)]
            print(f"| {method} | {keep} | {r['kept_tokens']:g} | {r['accuracy']:.4f} | " +
                  " | ".join(f"{a:.4f}" for a in accs) + f" | {all(a == answers[0] for a in answers)} |", flush=True)


if __name__ == "__main__":
    main()

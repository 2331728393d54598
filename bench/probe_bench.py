"""Images/s of the batched probe engine vs the reference scripts' procedure, same model, same images.

The reference-style loop runs every variant (single, region A and B, global) as its own `generate`
call of 8 new tokens at batch size 1, as the reference scripts do, and reads the first step's logits.
Both engines must produce the same flags; the table reports the speed ratio.

    .venv/bin/python bench/probe_bench.py                 # toy model, 3 toy eval images
    .venv/bin/python bench/probe_bench.py --model PATH --images 2 --threads 2
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from vrc_dist.config import load_probe_config
from vrc_dist.probe.prober import Prober
from vrc_dist.toy.world import render


def timed(prober: Prober, images) -> tuple[float, list]:
    start = time.perf_counter()
    results = [prober.probe(img, f"img-{i}") for i, img in enumerate(images)]
    return time.perf_counter() - start, results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy")
    p.add_argument("--config", help="ProbeConfig YAML (thresholds do not change the cost)")
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=8, help="tokens the reference loop generates per variant")
    # One thread by default: on a shared CPU, oversubscribed threads make both timings noise.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_probe_config(args.config, [f"model={args.model}"])
    images = [render("eval", 0, 0, i)[0] for i in range(args.images)]

    batched = Prober(cfg)
    reference = Prober(cfg, engine="reference", generate_tokens=args.new_tokens, adapter=batched.adapter)
    batched.probe(images[0], "warm-up")
    t_batched, fast = timed(batched, images)
    t_reference, slow = timed(reference, images)

    same_flags = all(
        np.array_equal(a.tokens[c], b.tokens[c]) for a, b in zip(fast, slow) for c in ("low_info", "candidate")
    )
    # On the sqrt scale, as the tests compare them: float32 rounding moves a divergence D by ~sqrt(D) * 1e-6.
    worst = max(
        float(np.max(np.abs(np.sqrt(a.tokens[c]) - np.sqrt(b.tokens[c]))))
        for a, b in zip(fast, slow) for c in ("jsd_region", "jsd_global", "score")
    )  # fmt: skip
    info = batched.model_info
    L = len(fast[0].tokens["score"])
    print(f"model {info['model_id']} ({info['model_type']}, {info['dtype']} on {info['device']}), "
          f"L = {L}, {args.images} images, torch threads {torch.get_num_threads()}\n")
    print("| engine | seconds | images/s | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| reference loop (batch 1, generate {args.new_tokens} tokens per variant) | {t_reference:.2f} "
          f"| {args.images / t_reference:.3f} | 1.0x |")
    print(f"| batched (prefix/intact KV reuse, token budget {cfg.token_budget}) | {t_batched:.2f} "
          f"| {args.images / t_batched:.3f} | **{t_reference / t_batched:.1f}x** |")
    print(f"\nsame low_info/candidate flags: {same_flags}; worst |sqrt(D) difference| of the divergences: {worst:.1e}")


if __name__ == "__main__":
    main()

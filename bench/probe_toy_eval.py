"""Does the probe find background on the toy world? Precision of candidates and object-vs-background means.

A token is background when its patch has no object (mask == 0 in the sample's JSON). Reports, like
the paper's Figure 4 in miniature, the mean top1_prob and score of object and background tokens,
and the precision of candidate tokens being background. `--calibrate` instead searches thresholds
(jsd, top1, cluster size; on train images, not the eval ones you report on) that keep precision
>= a target while flagging as many tokens as possible.

    vrc toy make-shards --split eval --shards 1 --per-shard 60 --out out/toy/eval
    .venv/bin/python bench/probe_toy_eval.py --shards out/toy/eval --config vrc_dist/configs/toy.yaml
    .venv/bin/python bench/probe_toy_eval.py --render train:60 --calibrate
"""
from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from vrc_dist.config import load_probe_config
from vrc_dist.data.shards import SHARDS_HELP
from vrc_dist.probe.prober import Prober


def samples_from(args):
    """(image, mask [gh, gw]) pairs, from shards or rendered directly (the same samples either way)."""
    if args.shards:
        from vrc_dist.data.shards import expand_shards
        from vrc_dist.toy.data import load_toy_samples

        urls = [spec.url for spec in expand_shards(args.shards)][: args.max_shards]
        for s in load_toy_samples(urls)[: args.limit]:
            yield Image.fromarray(s["image"]), np.asarray(s["meta"]["mask"])
    else:
        from vrc_dist.toy.world import render

        split, count = args.render.split(":")
        for i in range(int(count)):
            img, meta = render(split, 0, 0, i)
            yield img, np.asarray(meta["mask"])


def probe_all(prober: Prober, samples) -> dict[str, np.ndarray]:
    columns: dict[str, list] = {}
    for i, (image, mask) in enumerate(samples):
        r = prober.probe(image, f"img-{i}")
        if mask.shape != r.grid:
            raise ValueError(f"mask {mask.shape} does not match the model's grid {r.grid}")
        for name, values in {**r.tokens, "background": mask.reshape(-1) == 0, "image": np.full(mask.size, i)}.items():
            columns.setdefault(name, []).append(values)
    return {k: np.concatenate(v) for k, v in columns.items()}


def summary(t: dict[str, np.ndarray]) -> dict:
    bg, cand = t["background"], t["candidate"]
    return {
        "images": int(t["image"].max()) + 1,
        "tokens": len(bg),
        "background_share": float(bg.mean()),
        "candidates": int(cand.sum()),
        "precision": float(bg[cand].mean()) if cand.any() else float("nan"),
        "background_recall": float(cand[bg].mean()),
        "mean_top1_object": float(t["top1_prob"][~bg].mean()),
        "mean_top1_background": float(t["top1_prob"][bg].mean()),
        "mean_score_object": float(t["score"][~bg].mean()),
        "mean_score_background": float(t["score"][bg].mean()),
    }


def calibrate(t: dict[str, np.ndarray], target: float) -> dict:
    """Thresholds flagging the most candidates at precision >= target: jsd_thres, top1_thres and
    cluster_size_thres searched over quantiles of the observed values."""
    best = {"candidates": 0}
    for size in sorted(set(np.quantile(t["image_cluster_size"], [0.1, 0.25, 0.5, 0.75, 1.0]).astype(int))):
        for jsd in np.quantile(t["score"], np.linspace(0.02, 0.9, 45)):
            for top1 in np.quantile(t["top1_prob"], np.linspace(0.02, 1.0, 50)):
                cand = (t["score"] < jsd) & (t["top1_prob"] < top1) & (t["image_cluster_size"] <= size)
                if cand.sum() > best["candidates"] and t["background"][cand].mean() >= target:
                    best = {"jsd_thres": float(jsd), "top1_thres": float(top1), "cluster_size_thres": int(size),
                            "precision": float(t["background"][cand].mean()), "candidates": int(cand.sum())}
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", action="append", help=SHARDS_HELP)
    source.add_argument("--render", help="SPLIT:COUNT, rendered directly from the toy world")
    p.add_argument("--limit", type=int, default=60, help="images taken from the shards")
    p.add_argument("--max-shards", type=int, default=100)
    p.add_argument("--config", help="ProbeConfig YAML (default: vrc_dist/configs/toy.yaml's probe section)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--calibrate", action="store_true")
    p.add_argument("--target", type=float, default=0.95, help="precision the calibration must keep")
    args = p.parse_args(argv)

    cfg = load_probe_config(args.config, args.set)
    t = probe_all(Prober(cfg), samples_from(args))
    if args.calibrate:
        best = calibrate(t, args.target)
        if best["candidates"] == 0:
            print(f"no thresholds reach precision {args.target}")
            return
        print(f"jsd_thres: {best['jsd_thres']:.4g}\ntop1_thres: {best['top1_thres']:.4g}\n"
              f"cluster_size_thres: {best['cluster_size_thres']}\n# precision {best['precision']:.3f} with "
              f"{best['candidates']} candidates of {len(t['score'])} tokens ({t['background'].mean():.0%} background)")
        return
    s = summary(t)
    print(f"{s['images']} images, {s['tokens']} tokens ({s['background_share']:.0%} background); "
          f"{s['candidates']} candidates, precision {s['precision']:.3f}, background recall {s['background_recall']:.3f}\n")
    print("| tokens | mean top1_prob | mean score |")
    print("|---|---:|---:|")
    print(f"| object | {s['mean_top1_object']:.4f} | {s['mean_score_object']:.3e} |")
    print(f"| background | {s['mean_top1_background']:.4f} | {s['mean_score_background']:.3e} |")


if __name__ == "__main__":
    main()

"""Prefill time of a video prompt against the kept fraction: per-frame codebook pruning on LLaVA-OneVision.

A random-weight OneVision (SigLIP 112 px / 8 px patches: 14x14 per frame, 7x7 = 49 tokens after the 2x2
pooling; a Qwen2 LM of --layers x --hidden) reads one video of --frames frames; the codebook is seeded
noise of 1,000 prototypes (only the cost matters here). Each row is the median of --repeats forwards at
batch 1: the whole prefill (vision tower, pruning, LM) and the LM's part of it, and their ratio to keep
1.0, all measured in one run.

    .venv/bin/python bench/prune_video_bench.py --frames 32 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from vrc_dist.codebook.store import Codebook
from vrc_dist.prune import prune_visual_tokens

VIDEO_TOKEN, IMAGE_TOKEN, VOCAB = 5, 4, 1000


def build(layers: int, hidden: int) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                                image_size=112, patch_size=8)
    text = Qwen2Config(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=4096)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                                  video_token_id=VIDEO_TOKEN, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full")
    return LlavaOnevisionForConditionalGeneration(config).eval()


def noise_codebook(path: Path, dim: int) -> Codebook:
    vectors = np.random.default_rng(0).standard_normal((1000, dim)).astype(np.float32)
    zeros = pa.array(np.zeros(len(vectors), np.int32))
    provenance = pa.table({"key": [f"k{i}" for i in range(len(vectors))], "shard": ["s"] * len(vectors),
                           "token_index": zeros, "cluster": zeros, "support": zeros, "cluster_size": zeros})
    codebook = Codebook.create(path, "bench", "noise", dim)
    codebook.commit(vectors, provenance, {})
    return Codebook.open(path)


def timed_prefill(model, inputs, repeats: int) -> tuple[float, float, int]:
    """(median prefill s, median LM s, tokens the LM saw) over `repeats` forwards after one warm-up."""
    lm, marks = model.model.language_model, {}
    seen = []
    hooks = [lm.register_forward_pre_hook(lambda m, a, kw: marks.update(start=time.perf_counter()) or
                                          seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True),
             lm.register_forward_hook(lambda m, a, o: marks.update(end=time.perf_counter()))]
    totals, lms = [], []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            if i:
                totals.append(time.perf_counter() - t0)
                lms.append(marks["end"] - marks["start"])
    for h in hooks:
        h.remove()
    return statistics.median(totals), statistics.median(lms), seen[-1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--keep", default="1.0,0.5,0.25,0.111,0.056")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.layers, args.hidden)
    pixels = torch.randn(1, args.frames, 3, 112, 112)
    with torch.no_grad():
        per_video = model.model.get_video_features(pixels).pooler_output.shape[1]
    ids = torch.tensor([[1, 7, 8] + [VIDEO_TOKEN] * per_video + [9, 10, 11, 12]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        codebook = noise_codebook(Path(tmp) / "cb", args.hidden)
        for keep in [float(k) for k in args.keep.split(",")]:
            with prune_visual_tokens(model, codebook, keep=keep) as pruner:
                total, lm, length = timed_prefill(model, inputs, args.repeats)
            rows.append((keep, sum(pruner.kept), length, total, lm))
    base = next(r for r in rows if r[0] == 1.0) if any(r[0] == 1.0 for r in rows) else rows[0]
    print(f"OneVision, random weights: {args.frames} frames x 49 tokens, LM {args.layers} x {args.hidden}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| keep | visual tokens kept | LLM sequence | prefill ms | ratio | LM ms | LM ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for keep, kept, length, total, lm in rows:
        print(f"| {keep:g} | {kept} | {length} | {total * 1e3:.1f} | {total / base[3]:.2f} | {lm * 1e3:.1f} | "
              f"{lm / base[4]:.2f} |")


if __name__ == "__main__":
    main()

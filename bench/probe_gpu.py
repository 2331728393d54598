"""Probe throughput on a GPU for a random-weight LLaVA sized like LLaVA-1.5-7B, and its FLOP efficiency.

Shape: CLIP ViT-L/14 at 336 px (24x24 grid, L = 576, feature layer -2), 2-layer projector, a Llama
with D = 4096, 32 layers (`--layers` fewer), FFN 11008, vocabulary 32064, bf16. Weights are random:
the cost of the probe does not depend on them.

Two efficiency figures per image (docs/METHOD.md, Cost):
- floor: the method's work counted as docs/METHOD.md (Cost) does, every variant a full sequence through the LM
  (single L x (P+1+S), region 2L x (P+9+S), global (L+1) x (P+L+S)); `floor fraction` = the time that
  work takes at the GPU's peak / the measured time. Above 1 is possible: the engine skips work by
  caching the prompt prefix and the intact image's prefix and by sharing windows.
- MFU: FLOPs the engine actually computes / measured time / peak.

    python bench/probe_gpu.py                       # on an H100/H200
    python bench/probe_gpu.py --layers 8 --images 3
    python bench/probe_gpu.py --device cpu --dtype float32 --layers 1 --hidden 256 --ffn 512 \\
        --vision-layers 2 --vision-hidden 128 --images 1  # smoke test of the script itself
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from vrc_dist.config import ProbeConfig
from vrc_dist.eval.flops import forward_flops
from vrc_dist.model.adapter import LlavaAdapter
from vrc_dist.model.loading import resolve_device_dtype
from vrc_dist.probe.prober import Prober, batches, windows
from vrc_dist.toy.tokenizer import CHAT_TEMPLATE, build_tokenizer

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16


def build_adapter(args) -> LlavaAdapter:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    vision = CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                              num_hidden_layers=args.vision_layers, num_attention_heads=max(1, args.vision_hidden // 64),
                              image_size=336, patch_size=14)
    text = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                       num_attention_heads=max(1, args.hidden // 128), num_key_value_heads=max(1, args.hidden // 128),
                       vocab_size=32064, max_position_embeddings=4096, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaAdapter(model, processor, tokenizer, model_id=f"random-llava-1.5-{args.layers}L", token_budget=args.token_budget)


def lm_flops(adapter: LlavaAdapter, new_tokens: int, context: int) -> float:
    """FLOPs for `new_tokens` appended after `context` cached tokens, logits at the last position only
    (the project's one FLOP model, vrc_dist/eval/flops.py)."""
    return forward_flops(adapter.config.text_config, new_tokens, context)


def image_flops(adapter: LlavaAdapter, cfg: ProbeConfig, grid) -> tuple[float, float]:
    """(floor, actually computed) LM FLOPs for one image; see the module docstring."""
    P, S = len(adapter.prefix_embeddings), len(adapter.suffix_embeddings)
    L, n = grid[0] * grid[1], cfg.window**2
    floor = (
        L * lm_flops(adapter, P + cfg.dup + S, 0)
        + 2 * L * lm_flops(adapter, P + n + S, 0)
        + (L + 1) * lm_flops(adapter, P + L + S, 0)
    )
    starts = np.unique(windows(grid, cfg.window), axis=0).min(1)  # one per distinct window, ascending
    # Each global variant recomputes from its batch's first start, batched as the probe batches them.
    shared = [starts[ix[0]] for ix in batches(starts, adapter.batch_size(L), slack=grid[1]) for _ in ix]
    done = (
        lm_flops(adapter, P, 0) + L * lm_flops(adapter, cfg.dup + S, P)
        + len(starts) * lm_flops(adapter, n + S, P) + L * lm_flops(adapter, n + S, P)
        + lm_flops(adapter, L, P) + lm_flops(adapter, S, P + L)
        + sum(lm_flops(adapter, L - s + S, P + s) for s in shared)
    )  # fmt: skip
    return floor, done


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vision-layers", type=int, default=24)
    p.add_argument("--vision-hidden", type=int, default=1024)
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--token-budget", type=int, default=32768)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on cuda")
    p.add_argument("--peak-tflops", type=float, help="dense peak of this device (default: from its name)")
    args = p.parse_args(argv)

    adapter = build_adapter(args)
    cfg = ProbeConfig(token_budget=args.token_budget)
    prober = Prober(cfg, adapter=adapter)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(args.images + 1)]

    def sync():
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()

    prober.probe(images[0], "warm-up")
    sync()
    start = time.perf_counter()
    for i, img in enumerate(images[1:]):
        result = prober.probe(img, f"img-{i}")
    sync()
    seconds = (time.perf_counter() - start) / args.images

    name = torch.cuda.get_device_name() if adapter.device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    floor, done = image_flops(adapter, cfg, result.grid)
    print(f"device {name}, {adapter.dtype}, LM {args.layers} layers x D {args.hidden} ({sum(p.numel() for p in adapter.language_model.layers.parameters()) / 1e9:.3g} B "
          f"linear params), grid {result.grid[0]}x{result.grid[1]}, prompt {len(adapter.prefix_embeddings)} + "
          f"{len(adapter.suffix_embeddings)} tokens, token budget {args.token_budget}\n")
    print("| images/s | s/image | floor PFLOP/image | computed PFLOP/image | floor fraction | MFU |")
    print("|---:|---:|---:|---:|---:|---:|")
    fraction = f"{floor / (peak * 1e12) / seconds:.2f}" if peak else "n/a"
    mfu = f"{done / (peak * 1e12) / seconds:.1%}" if peak else "n/a"
    print(f"| {1 / seconds:.3f} | {seconds:.2f} | {floor / 1e15:.3g} | {done / 1e15:.3g} | {fraction} | {mfu} |")
    if not peak:
        print("\n(no peak known for this device: pass --peak-tflops for the fractions)")


if __name__ == "__main__":
    main()

"""Train the tiny LLaVA on toy train shards, on the CPU, in minutes.

Large LLaVA models keep most of their answers when most visual tokens are dropped (the premise of
token pruning). A tiny model trained only on full grids would not, so training randomly drops
visual tokens (log-uniform keep counts, down to a single token) half of the time. The same choice
makes the single-token pass of the probe meaningful: the model has learned to read one token.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vrc_dist.toy import TOY_MODEL_DIR
from vrc_dist.toy.data import encode_samples, load_shard_samples
from vrc_dist.toy.model import TinyLlavaSpec, build_model


@dataclass
class TrainConfig:
    shards: str = "out/toy/train"
    out: str = str(TOY_MODEL_DIR)
    steps: int = 2400
    batch_size: int = 48
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 150
    full_image_prob: float = 0.5
    seed: int = 0
    max_minutes: float = 14.0
    threads: int = 2
    log_every: int = 100


def visual_tokens(model, pixels: torch.Tensor) -> torch.Tensor:
    """Projected patch tokens at LLaVA's feature layer (-2, CLS dropped): what the LLM sees."""
    cfg = model.config
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
    return model.model.multi_modal_projector(hidden[:, 1:])


def _keep_count(rng: np.random.Generator, n_tokens: int, full_prob: float) -> int:
    if rng.random() < full_prob:
        return n_tokens
    return int(round(math.exp(rng.uniform(0, math.log(n_tokens)))))


def _batch_loss(model, pixels, prefix, suffixes, answers, keep, rng):
    """Next-token loss on the answer word and the end-of-sequence after it."""
    embed = model.get_input_embeddings()
    tokens = visual_tokens(model, pixels)
    n = tokens.shape[1]
    eos = model.config.text_config.eos_token_id
    seqs, targets = [], []
    for b in range(len(suffixes)):
        idx = torch.as_tensor(np.sort(rng.choice(n, size=keep, replace=False)))
        text_after = torch.tensor(list(suffixes[b]) + [answers[b]])
        seqs.append(torch.cat([embed(prefix), tokens[b, idx], embed(text_after)]))
        targets.append(len(seqs[-1]) - 2)  # position that predicts the answer
    length = max(len(s) for s in seqs)
    pad = embed(torch.tensor([model.config.text_config.pad_token_id]))
    # Right padding: under a causal mask, real positions never see the padding after them.
    batch = torch.stack([torch.cat([s, pad.expand(length - len(s), -1)]) for s in seqs])
    hidden = model.model.language_model(inputs_embeds=batch).last_hidden_state
    pos = torch.tensor(targets)
    rows = torch.arange(len(seqs))
    logits = model.lm_head(torch.stack([hidden[rows, pos], hidden[rows, pos + 1]], 1))
    labels = torch.stack([torch.tensor(answers), torch.full((len(seqs),), eos)], 1)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def train(cfg: TrainConfig, spec: TinyLlavaSpec = TinyLlavaSpec(), progress=print) -> dict:
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    model, processor = build_model(spec, seed=cfg.seed)
    samples = load_shard_samples(sorted(Path(cfg.shards).glob("*.tar")))
    if not samples:
        raise FileNotFoundError(f"no training shards (*.tar) in {cfg.shards}")
    pixels, items = encode_samples(samples, processor)
    prefix = torch.tensor(items.prefix)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    start, n_tokens, losses = time.time(), spec_tokens(spec), []
    for step in range(cfg.steps):
        # Cosine decay over whichever budget runs out first, steps or wall time: on a busy machine
        # the run still ends annealed instead of being cut off at a high learning rate.
        done = max(step / cfg.steps, (time.time() - start) / (cfg.max_minutes * 60))
        if done >= 1.0:
            progress(f"budget reached after {step} steps")
            break
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * done))
        for group in opt.param_groups:
            group["lr"] = lr
        pick = rng.integers(len(items.image), size=cfg.batch_size)
        loss = _batch_loss(
            model,
            pixels[items.image[pick]].float() / 127.5 - 1.0,
            prefix,
            [items.suffix[i] for i in pick],
            [items.answer[i] for i in pick],
            _keep_count(rng, n_tokens, cfg.full_image_prob),
            rng,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0:
            progress(f"step {step + 1}/{cfg.steps} loss {np.mean(losses[-cfg.log_every:]):.4f} "
                     f"lr {lr:.2e} {time.time() - start:.0f}s")
    model.eval()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {"steps": len(losses), "seconds": round(time.time() - start, 1), "final_loss": float(np.mean(losses[-50:])),
               "train_images": len(samples), "train_config": asdict(cfg), "architecture": asdict(spec)}
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    return summary


def spec_tokens(spec: TinyLlavaSpec) -> int:
    return (spec.image_size // spec.patch_size) ** 2

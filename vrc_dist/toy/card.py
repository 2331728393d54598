"""The toy checkpoint's model card: what it is, how it was trained, how well it answers held-out images."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from vrc_dist.toy.evaluate import format_accuracy
from vrc_dist.toy.train import TrainConfig

BAR = 0.85  # the accuracy a question type must reach for the world to measure pruning on it


def _below_bar(accuracy: dict) -> str:
    low = [f"{t} ({r['accuracy']:.3f})" for t, r in accuracy.items() if r["accuracy"] < BAR]
    return f"\nNot yet at the bar ({BAR} on every question type): {', '.join(low)}.\n" if low else ""


def _train_command(run: dict) -> str:
    """The `vrc toy train` line that repeats one run: its settings that differ from today's defaults."""
    config, default = run["train_config"], asdict(TrainConfig())
    unused = ("shards", "out", "threads", "log_every") + (("vision_steps",) if config.get("init") else ())
    words = ["vrc toy train", *(f"--shards {s}" for s in config["shards"]), f"--out {config['out']}",
             *(f"--set {k}={v}" for k, v in config.items() if k not in unused and v != default.get(k))]
    return f"`{' '.join(words)}`"


def write_model_card(model_dir, accuracy: dict, eval_source: str, n_images: int) -> Path:
    model_dir = Path(model_dir)
    training = json.loads((model_dir / "training.json").read_text())
    arch = training["architecture"]
    runs = [training]
    while "continued_from" in runs[-1]:
        runs.append(runs[-1]["continued_from"])
    steps, seconds = sum(r["steps"] for r in runs), sum(r["seconds"] + r.get("vision_seconds", 0) for r in runs)
    vision = sum(r.get("vision_steps", 0) for r in runs)
    vision_text = f"{vision} vision steps and " if vision else ""
    history = f" in {len(runs)} runs (later ones continue from the last checkpoint)" if len(runs) > 1 else ""
    text = f"""# toy-llava

A tiny `LlavaForConditionalGeneration` trained on vrc-dist's synthetic toy world v2 (one to six
objects, sizes down to one patch, textured background regions, recurring distractor badges; questions:
the single-word prompt, shape and colour of a named object, count, existence), the embedded default
model of vrc-dist (`--model toy`). It loads offline with `from_pretrained(path)`, exactly like
a real LLaVA checkpoint. It exists to make the whole pipeline real end to end on a CPU; it says
nothing about real images.

- Vision: CLIP-style tower, {arch['image_size']} px images, patch {arch['patch_size']} (a
  {arch['image_size'] // arch['patch_size']}x{arch['image_size'] // arch['patch_size']} grid), hidden {arch['vision_hidden']},
  {arch['vision_layers']} layers; features from layer -2 with the CLS token dropped, as in LLaVA-1.5.
- Projector: two-layer GELU MLP. Language model: Llama, hidden {arch['text_hidden']}, {arch['text_layers']} layers.
- Tokenizer: word level (`PreTrainedTokenizerFast`), pad id 0; chat template `USER: <image>\\n{{question}} ASSISTANT:`.
- Training: `vrc toy train` (vrc_dist/toy/train.py), {vision_text}{steps} QA steps in {seconds:.0f} s on a CPU{history},
  {training['train_images']} train images, final loss {training['final_loss']:.4f} (the QA stage; the
  vision tower is pretrained before it on per-patch labels). Many batches drop a random subset of
  visual tokens that keeps at least one token of every object (keep counts log-uniform down to one
  token), so that, like large LLaVA models, it keeps answering when most visual tokens are removed;
  questions about scenes of several objects are oversampled. Config: `training.json`. The runs, first
  to last: {"; then ".join(_train_command(r) for r in reversed(runs))}.

## Held-out accuracy

First generated word vs the ground truth, on {n_images} images of `{eval_source}` (eval split; its
seed was not used in training):

{format_accuracy(accuracy)}
{_below_bar(accuracy)}

Reproduce: `vrc toy make-shards --out out/toy/eval --split eval --seed 100 --shards 2 --per-shard 200`
then `vrc toy eval --shards out/toy/eval`.
"""
    path = model_dir / "README.md"
    path.write_text(text)
    return path

"""Where a toy checkpoint fails: its vision tower, or the language model's binding of question to object.

1. Tower: a linear probe fitted on the frozen per-patch features of train images predicts each
   object patch's shape; an object counts as read when the majority of its patches is right. Reported
   on eval images by object size in patches. High here and low on shape questions means the tower sees
   the shapes and the LM does not bind the question's colour to them.
2. Answers: held-out accuracy per question type, by number of objects in the scene and by the size of
   the object the question names; existence also by answer, and the spread of the yes-minus-no logit
   (a spread near zero means the model ignores both the image and the question's words).

    .venv/bin/python bench/toy_model_diag.py --model toy --train out/toy2/train/train-00000.tar --shards out/toy/eval
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from vrc_dist.data.shards import SHARDS_HELP
from vrc_dist.eval.answers import first_token_logits
from vrc_dist.model import load_checkpoint
from vrc_dist.toy.data import encode_samples, load_toy_samples
from vrc_dist.toy.train import frozen_features, patch_labels
from vrc_dist.toy.world import SHAPES


def _size_bucket(n_patches: int) -> str:
    return "1-2 patches" if n_patches <= 2 else "3-5 patches" if n_patches <= 5 else "6+ patches"


def _shape_features(model, processor, samples):
    pixels, _ = encode_samples(samples, processor)
    return frozen_features(model, pixels), patch_labels(samples)[..., 0]


def tower_probe(model, processor, train, held_out, steps: int = 300) -> dict[str, tuple[float, int]]:
    """Majority-vote shape accuracy of a linear probe on object patches, per object size."""
    x, y = _shape_features(model, processor, train)
    x, y = x[y > 0], y[y > 0] - 1
    mean, std = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(0)  # the probe's start, so a rerun prints the same table
    probe = torch.nn.Linear(x.shape[1], len(SHAPES))
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(probe((x - mean) / std), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    features, _ = _shape_features(model, processor, held_out)
    hits = defaultdict(list)
    with torch.no_grad():
        for s, f in zip(held_out, features):
            owner = np.ravel(s["meta"]["mask"])
            predicted = probe((f - mean) / std).argmax(-1).numpy()
            for j, obj in enumerate(s["meta"]["objects"], start=1):
                patches = owner == j
                if patches.any():
                    majority = np.bincount(predicted[patches], minlength=len(SHAPES)).argmax()
                    hits[_size_bucket(int(patches.sum()))].append(majority == SHAPES.index(obj["shape"]))
    return {k: (float(np.mean(v)), len(v)) for k, v in sorted(hits.items())}


def answer_breakdown(model, processor, samples):
    """Accuracy per (question type, slice) and the yes-minus-no logit of every existence question."""
    rows = [(s, qa) for s in samples for qa in s["meta"]["qa"]]
    logits = first_token_logits(model, processor, [s["image"] for s, _ in rows], [qa["question"] for _, qa in rows])
    words = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    yes, no = processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
    hits, margins = defaultdict(list), []
    for (s, qa), word, row in zip(rows, words, logits):
        ok = word == qa["answer"]
        hits[(qa["type"], f"{len(s['meta']['objects'])} objects")].append(ok)
        if qa["object"]:
            size = int((np.ravel(s["meta"]["mask"]) == qa["object"]).sum())
            hits[(qa["type"], f"target {_size_bucket(size)}")].append(ok)
        if qa["type"] == "exist":
            hits[("exist", f"answer {qa['answer']}")].append(ok)
            margins.append(float(row[yes] - row[no]))
    return {k: (float(np.mean(v)), len(v)) for k, v in sorted(hits.items())}, np.asarray(margins)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--train", action="append", required=True, help=f"{SHARDS_HELP}; train-split images for the probe")
    ap.add_argument("--shards", action="append", required=True, help=f"{SHARDS_HELP}; eval-split images")
    ap.add_argument("--train-limit", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_checkpoint(args.model)
    model.eval()
    held_out = load_toy_samples(args.shards)
    train = load_toy_samples(args.train)[: args.train_limit]
    print(f"tower: linear-probe shape accuracy (majority of an object's patches), {len(held_out)} eval images")
    print("| object size | accuracy | objects |\n|---|---:|---:|")
    for bucket, (acc, n) in tower_probe(model, processor, train, held_out).items():
        print(f"| {bucket} | {acc:.3f} | {n} |")
    breakdown, margins = answer_breakdown(model, processor, held_out)
    print("\n| question type | slice | accuracy | questions |\n|---|---|---:|---:|")
    for (qtype, part), (acc, n) in breakdown.items():
        print(f"| {qtype} | {part} | {acc:.3f} | {n} |")
    print(f"\nexistence: yes-minus-no logit mean {margins.mean():+.3f}, std {margins.std():.3f}")


if __name__ == "__main__":
    main()

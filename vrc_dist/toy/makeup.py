"""What a codebook built on the toy world is made of: the ground-truth kind of every prototype's token.

A prototype's provenance names the image (key) and token it came from; the toy world renders that
image's per-patch truth again from the key, so no shards are needed. The shares are printed beside the
base rate, the same shares over every token of the images the prototypes came from: a codebook that
captured redundancy holds far more background and distractor than that base rate.
"""
from __future__ import annotations

from collections import Counter

from vrc_dist.toy.world import parse_key, patch_kinds, render

KINDS = ("object", "background", "distractor")


def prototype_makeup(provenance: list[dict]) -> dict[str, dict[str, float]]:
    """{'prototypes': {kind: share}, 'base rate': {kind: share}} for provenance rows (key, token_index)."""
    kinds, protos, base = {}, Counter(), Counter()
    for row in provenance:
        key = row["key"]
        if key not in kinds:
            kinds[key] = patch_kinds(render(*parse_key(key))[1])
            base.update(kinds[key].tolist())
        protos[kinds[key][row["token_index"]]] += 1
    return {name: {k: c[k] / max(sum(c.values()), 1) for k in KINDS} for name, c in
            (("prototypes", protos), ("base rate", base))}


def format_makeup(makeup: dict[str, dict[str, float]], n_prototypes: int) -> str:
    lines = ["| tokens | " + " | ".join(KINDS) + " |", "|---|" + "---:|" * len(KINDS)]
    for name, shares in makeup.items():
        label = f"{name} ({n_prototypes})" if name == "prototypes" else name
        lines.append(f"| {label} | " + " | ".join(f"{shares[k]:.3f}" for k in KINDS) + " |")
    return "\n".join(lines)

"""Baselines and controls the codebook is measured against, each from its paper's description, at the same
keep ratios.

- codebook-null, codebook-diverse-null: the codebook rules with seeded Gaussian prototypes of the codebook's
  size and dimension. If a codebook scores no better than its null, the codebook is not what helps.
- random: keep a uniformly random subset (seeded), in original order.
- cls: FasterVLM / VisionZip "dominant tokens": keep the patches the vision tower's [CLS] query attends
  to most, at the layer LLaVA takes its features from (averaged over heads). Towers without a CLS token
  (SigLIP, OneVision) use the attention each patch receives from all queries, as VisionZip does.
- divprune: DivPrune (Alvar et al., CVPR 2025), max-min diversity on the projected tokens' cosine distance,
  no codebook: the token farthest from its nearest neighbour first, then each time the token farthest from
  every one kept. The closest published peer of codebook-diverse.
- pool: average-pool the patch grid down to about the kept count (a h' x w' grid, h' = floor(sqrt(n))).
- fastv: FastV (vrc_dist.prune.fastv), prunes inside the LLM after layer K by the last token's attention.
- oracle, anti-oracle: toy shards only, from the world's per-patch ground truth (see OracleMethod).
All but fastv run through the same pruner as the codebook (vrc_dist.prune.InputPruner).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from vrc_dist.config import FASTV_LAYER
from vrc_dist.prune.methods import GROUP_SIM, CodebookMethod, Method, ScoreMethod, check_keep, keep_count

# name -> (diverse, null): the paper's rule, this project's extension, and their null controls.
# codebook-plain is the paper's rule under the name it had before it became the default `codebook`.
CODEBOOK_METHODS = {
    "codebook": (False, False), "codebook-null": (False, True),
    "codebook-diverse": (True, False), "codebook-diverse-null": (True, True),
    "codebook-plain": (False, False),
}
# Each codebook method's null control, for the tables' paired differences.
NULL_OF = {"codebook": "codebook-null", "codebook-diverse": "codebook-diverse-null"}
METHODS = (*CODEBOOK_METHODS, "divprune", "random", "cls", "fastv", "pool", "oracle", "anti-oracle")


class RandomMethod(ScoreMethod):
    name = "random"

    def __init__(self, keep: float, seed: int = 0):
        super().__init__(keep=keep)
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, tokens, image):
        return torch.rand(len(tokens), generator=self.generator).to(tokens.device)


def _layer_index(n_layers: int, feature_layer: int) -> int:
    """The encoder layer whose output is hidden_states[feature_layer] (hidden_states[0] = embeddings)."""
    return n_layers + feature_layer if feature_layer < 0 else feature_layer - 1


class ClsMethod(ScoreMethod):
    name = "cls"

    def __init__(self, keep: float):
        super().__init__(keep=keep)
        self._attention = None  # [images, L]: attention each patch receives, this forward

    def attach(self, model):
        feature_layer = model.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise ValueError("the cls baseline needs a single vision feature layer")
        self._has_cls = model.config.vision_feature_select_strategy == "default"
        # CLIP keeps its encoder at the top, SigLIP under .vision_model: find it by name.
        layers = next(m for n, m in model.model.vision_tower.named_modules() if n.endswith("encoder.layers"))
        attn = layers[_layer_index(len(layers), feature_layer)].self_attn
        return [attn.register_forward_pre_hook(self._capture, with_kwargs=True)]

    @torch.no_grad()
    def _capture(self, attn, args, kwargs):
        # Recomputed from the layer's input rather than asked of the attention kernel, so SDPA stays on.
        h = kwargs.get("hidden_states", args[0] if args else None)
        shape = (*h.shape[:2], -1, attn.head_dim)
        q = attn.q_proj(h).view(shape).transpose(1, 2)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        if self._has_cls:
            q = q[:, :, :1]
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # [images, heads, queries, keys]
        received = probs.mean(dim=(1, 2))
        self._attention = received[:, 1:] if self._has_cls else received

    def score(self, tokens, image):
        if self._attention is None or image >= len(self._attention) or self._attention.shape[1] != len(tokens):
            raise ValueError("the cls baseline needs one vision grid per image (LLaVA-1.5 layout); "
                             "multi-crop NeXT/OneVision images are not supported")
        return -self._attention[image].to(tokens.device)


class PoolMethod(Method):
    name = "pool"

    def __init__(self, keep: float):
        self.keep = check_keep(keep)

    def reduce(self, tokens, image):
        side = math.isqrt(len(tokens))
        if side * side != len(tokens):
            raise ValueError(f"the pool baseline needs a square grid of tokens, got {len(tokens)}")
        n = keep_count(self.keep, len(tokens))
        h = max(1, math.isqrt(n))
        w = min(side, max(1, round(n / h)))
        grid = tokens.T.reshape(1, -1, side, side)
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid.float(), (h, w)).to(tokens.dtype)
        return pooled.reshape(tokens.shape[1], h * w).T, None


class DivPruneMethod(ScoreMethod):
    name = "divprune"

    def __init__(self, keep: float):
        super().__init__(keep=keep)

    def choose(self, tokens, image, k):
        v = torch.nn.functional.normalize(tokens.float(), dim=-1)
        distance = (1 - v @ v.T).cpu().numpy()
        return torch.tensor(sorted(max_min_diverse(distance, k)), device=tokens.device)


def max_min_diverse(distance: np.ndarray, k: int) -> list[int]:
    """DivPrune's greedy max-min selection of k indices from an [n, n] distance matrix (first index on ties).
    A chosen token is masked out, so duplicates (distance 0) cannot be chosen twice."""
    n = len(distance)
    off_diagonal = np.where(np.eye(n, dtype=bool), np.inf, distance)
    first = int(np.argmax(off_diagonal.min(0))) if n > 1 else 0
    chosen, nearest = [first], distance[first].copy()
    nearest[first] = -np.inf
    while len(chosen) < k:
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, distance[chosen[-1]])
        nearest[chosen] = -np.inf
    return chosen


class OracleMethod(ScoreMethod):
    """Keeps by the toy world's ground truth, to show how much a keep rule can gain (or lose) on a world.

    oracle: one token per object first (each object's most covered patch), then the objects' next most
    covered patches in turn, then the rest in raster order. anti-oracle: the reverse, background first.
    The harness sets `truth` to the batch's per-image (mask, coverage) before each forward."""

    def __init__(self, keep: float, anti: bool = False):
        super().__init__(keep=keep)
        self.anti = anti
        self.name = "anti-oracle" if anti else "oracle"
        self.truth: list[tuple[np.ndarray, np.ndarray]] | None = None

    def choose(self, tokens, image, k):
        if self.truth is None or image >= len(self.truth) or len(self.truth[image][0]) != len(tokens):
            raise ValueError(f"the {self.name} method needs the toy world's per-patch masks, one per image, "
                             f"matching the model's {len(tokens)} visual tokens")
        order = oracle_order(*self.truth[image])
        return torch.tensor(sorted((order[::-1] if self.anti else order)[:k]), device=tokens.device)


def oracle_order(mask: np.ndarray, coverage: np.ndarray) -> list[int]:
    """Token indices, best first: round-robin over objects by falling coverage, then the background."""
    idx = np.arange(len(mask))
    objects = idx[mask > 0]
    by_coverage = objects[np.lexsort((objects, -coverage[objects]))]  # stable: raster order on ties
    rank = np.zeros(len(mask), int)
    for obj in np.unique(mask[objects]):
        rank[by_coverage[mask[by_coverage] == obj]] = np.arange((mask == obj).sum())
    ranked = sorted(by_coverage.tolist(), key=lambda i: (rank[i], mask[i]))
    return ranked + idx[mask == 0].tolist()


def make_method(name: str, keep: float, codebook=None, seed: int = 0, fastv_layer: int = FASTV_LAYER,
                group_sim: float = GROUP_SIM) -> Method:
    """The method called `name` at keep ratio `keep` (one harness runs them all)."""
    if name in CODEBOOK_METHODS:
        if codebook is None:
            raise ValueError(f"the {name} method needs a codebook")
        diverse, null = CODEBOOK_METHODS[name]
        return CodebookMethod(codebook, keep=keep, diverse=diverse, group_sim=group_sim,
                              null_seed=seed if null else None)
    if name == "random":
        return RandomMethod(keep, seed)
    if name == "cls":
        return ClsMethod(keep)
    if name == "divprune":
        return DivPruneMethod(keep)
    if name == "pool":
        return PoolMethod(keep)
    if name in ("oracle", "anti-oracle"):
        return OracleMethod(keep, anti=name == "anti-oracle")
    if name == "fastv":
        from vrc_dist.prune.fastv import FastV

        return FastV(keep, layer=fastv_layer)
    raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")

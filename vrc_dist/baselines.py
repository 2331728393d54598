"""Baselines the codebook is measured against, each from its paper's description, at the same keep ratios.

- random: keep a uniformly random subset (seeded), in original order.
- cls: FasterVLM / VisionZip "dominant tokens": keep the patches the vision tower's [CLS] query attends
  to most, at the layer LLaVA takes its features from (averaged over heads). Towers without a CLS token
  (SigLIP, OneVision) use the attention each patch receives from all queries, as VisionZip does.
- pool: average-pool the patch grid down to about the kept count (a h' x w' grid, h' = floor(sqrt(n))).
- fastv: FastV (vrc_dist.fastv), prunes inside the LLM after layer K by the last token's attention.
(codebook-plain is the codebook's lowest-similarity tokens, without covering each group once, for comparison.)
All but fastv run through the same pruner as the codebook (vrc_dist.prune.InputPruner).
"""
from __future__ import annotations

import math

import torch

from vrc_dist.prune import GROUP_SIM, CodebookMethod, Method, ScoreMethod, check_keep, keep_count

CODEBOOK_METHODS = ("codebook", "codebook-plain")
METHODS = (*CODEBOOK_METHODS, "random", "cls", "fastv", "pool")


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


def make_method(name: str, keep: float, codebook=None, seed: int = 0, fastv_layer: int = 2,
                group_sim: float = GROUP_SIM) -> Method:
    """The method called `name` at keep ratio `keep` (one harness runs them all)."""
    if name in CODEBOOK_METHODS:
        if codebook is None:
            raise ValueError(f"the {name} method needs a codebook")
        return CodebookMethod(codebook, keep=keep, diverse=name == "codebook", group_sim=group_sim)
    if name == "random":
        return RandomMethod(keep, seed)
    if name == "cls":
        return ClsMethod(keep)
    if name == "pool":
        return PoolMethod(keep)
    if name == "fastv":
        from vrc_dist.fastv import FastV

        return FastV(keep, layer=fastv_layer)
    raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")

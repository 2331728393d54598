"""Identify-then-probe at inference (docs/METHOD.md step 9): drop visual tokens before the LLM's first layer.

    with prune_visual_tokens(model, "toy", keep=0.111) as pruner:
        out = model.generate(**inputs)
    pruner.kept  # visual tokens each image kept, in order of appearance

The pruner hooks a transformers LLaVA model (LLaVA-1.5, LLaVA-NeXT, OneVision) at the language model's
input, where the image features are already merged into `inputs_embeds`: every contiguous run of image
placeholder tokens is one image (all its crops, for NeXT and OneVision). A method reduces each run, the
rows are left-padded again, and the sequence the LLM sees is genuinely shorter, so prefill cost falls.
Positions are contiguous after removal (as if the shorter prompt had been typed), like the reference.
Learned newline tokens (NeXT, OneVision) are layout, not content: always kept and not counted in L.

Inside `generate` the decode steps are corrected too: the 2-D attention mask `generate` keeps growing
still has the unpruned length, so each decode step gets the pruned mask instead, and position ids given
by the caller are shifted by the number of tokens removed from that row.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch

from vrc_dist.codebook import Codebook
from vrc_dist.model import given_cache


# Cosine above which two visual tokens count as alike in the codebook-diverse keep rule (see CodebookMethod);
# chosen on train-split images of the toy model.
GROUP_SIM = 0.9


def check_keep(keep: float) -> float:
    if not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep ratio must be in (0, 1], got {keep!r}")
    return float(keep)


def keep_count(keep: float, n: int) -> int:
    """round(keep * n), at least one token: an image is never dropped entirely."""
    return max(1, min(n, math.floor(keep * n + 0.5)))


def image_runs(is_image: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each contiguous run of True in a 1-D bool tensor: one run per image."""
    edges = torch.diff(is_image.int(), prepend=is_image.new_zeros(1).int(), append=is_image.new_zeros(1).int())
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def embed_dim(model) -> int:
    return model.config.text_config.hidden_size


def newline_mask(model, block: torch.Tensor) -> torch.Tensor:
    """Which rows of an image's token block are the model's learned `image_newline` (NeXT, OneVision)."""
    newline = getattr(model.model, "image_newline", None)
    if newline is None:
        return torch.zeros(len(block), dtype=torch.bool, device=block.device)
    return (block == newline.to(block)).all(-1)


class Method:
    """A way to reduce one image's content tokens [n, D] to fewer: returns (tokens, kept index or None)."""

    name = "method"

    def attach(self, model) -> list:
        """Install whatever hooks the method needs to see (e.g. vision attention); returns their handles."""
        return []

    def reduce(self, tokens: torch.Tensor, image: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class ScoreMethod(Method):
    """Keep the tokens of lowest redundancy score, by ratio or (codebook) by threshold, in original order."""

    def __init__(self, keep: float | None = None, threshold: float | None = None):
        if (keep is None) == (threshold is None):
            raise ValueError("give exactly one of keep (a ratio in (0, 1]) or threshold")
        self.keep = None if keep is None else check_keep(keep)
        self.threshold = threshold

    def score(self, tokens: torch.Tensor, image: int) -> torch.Tensor:
        raise NotImplementedError

    def reduce(self, tokens, image):
        if self.threshold is not None:
            s = self.score(tokens, image)
            # At least the least redundant token survives, so no image vanishes from the prompt.
            idx = (s < self.threshold).nonzero().flatten() if (s < self.threshold).any() else s.argmin()[None]
        elif (k := keep_count(self.keep, len(tokens))) == len(tokens):
            idx = torch.arange(len(tokens), device=tokens.device)  # nothing to remove: no scoring either
        else:
            idx = self.choose(tokens, image, k)
        return tokens[idx], idx

    def choose(self, tokens: torch.Tensor, image: int, k: int) -> torch.Tensor:
        """Indices of the k tokens kept, ascending: by default the k lowest scores."""
        return torch.sort(torch.argsort(self.score(tokens, image), stable=True)[:k]).values


# The keep rule's loops read a few numbers per step, so they run on host arrays: one copy per image
# instead of a device sync per step, and microseconds per step instead of a torch dispatch.

def cover(sim: np.ndarray, redundancy: np.ndarray, k: int, group_sim: float) -> list[int]:
    """Up to k token indices, one per group of alike tokens (cosine `sim` above `group_sim`), least
    redundant group first; each is its group's medoid. See CodebookMethod."""
    similar = sim > group_sim
    covered = np.zeros(len(sim), dtype=bool)
    chosen = []
    while len(chosen) < k and not covered.all():
        first = int(np.argmin(np.where(covered, np.inf, redundancy)))
        group = similar[first] & ~covered
        medoid = int(np.argmax(np.where(group, sim[:, group].sum(-1), -np.inf)))
        chosen.append(medoid)
        covered |= similar[medoid]
    return chosen


@lru_cache(maxsize=16)
def grid_distances(n: int) -> np.ndarray:
    """[n, n] squared distances between n tokens in raster order: on a square grid, or along one row
    if n is not square (multi-crop NeXT / OneVision images, whose crops are not one grid)."""
    side = math.isqrt(n)
    i = np.arange(n)
    xy = np.stack([i // side, i % side], -1) if side * side == n else np.stack([i * 0, i], -1)
    distances = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    distances.flags.writeable = False  # cached and shared between calls
    return distances


def spread(chosen: list[int], need: int, n: int) -> list[int]:
    """`need` more of n token indices, each the farthest on the grid from every one kept so far (first
    on ties). A kept token is at distance 0 from itself, so it is never picked again."""
    distances = grid_distances(n)
    far = distances[chosen].min(0)
    picked = []
    for _ in range(need):
        picked.append(int(np.argmax(far)))
        far = np.minimum(far, distances[picked[-1]])
    return picked


class CodebookMethod(ScoreMethod):
    """s(v) = max cosine similarity to the codebook's redundant prototypes; high s = redundant.

    By keep ratio, the paper's rule (the default): the tokens of lowest s, in original order. By threshold:
    the tokens with s below it.

    `diverse=True` is this project's extension (`codebook-diverse`, see docs/METHOD.md), not the paper's: the
    budget covers each distinct kind of content once, least redundant first, then spreads over the image:
    1. cover: the least redundant token not yet covered opens a group, the uncovered tokens within
       cosine `group_sim` of it (after the vision tower the patches of one object look alike). The
       group's medoid, its most typical token, is kept, and every token within `group_sim` of the
       medoid is covered. Repeat until the budget runs out or every token is covered.
    2. spread: budget left over goes to the tokens farthest on the patch grid from those kept.
    Why: the lowest-similarity tokens alone are often the many near-identical patches of one large object.
    The codebook only orders the groups; on the toy world the rule scores the same with a random codebook
    (README), so its gains there belong to the rule, not to the codebook.

    `null_seed` swaps the prototypes for seeded Gaussian noise of the same size and dimension: the control
    that shows whether a codebook does better than chance (`codebook-null`, `codebook-diverse-null`)."""

    name = "codebook"

    def __init__(self, codebook: Codebook | str, keep: float | None = None, threshold: float | None = None,
                 diverse: bool = False, group_sim: float = GROUP_SIM, null_seed: int | None = None):
        super().__init__(keep, threshold)
        self.codebook = codebook if isinstance(codebook, Codebook) else Codebook.open(codebook)
        self.diverse = diverse
        self.group_sim = group_sim
        self.vectors = self.codebook.vectors if null_seed is None else null_prototypes(self.codebook.vectors.shape,
                                                                                       null_seed)
        self._protos = None

    def attach(self, model):
        if self.codebook.dim != embed_dim(model):
            raise ValueError(f"embedding dim mismatch: codebook {self.codebook.path} has dim {self.codebook.dim}, "
                             f"the model's language embeddings have dim {embed_dim(model)}")
        # Cosine on the model's device (same numbers as the codebook's flat inner-product index).
        protos = torch.from_numpy(self.vectors).to(model.device, torch.float32)
        self._protos = torch.nn.functional.normalize(protos, dim=-1)
        return []

    def score(self, tokens, image):
        return self._redundancy(torch.nn.functional.normalize(tokens.float(), dim=-1))

    def _redundancy(self, unit: torch.Tensor) -> torch.Tensor:
        return (unit @ self._protos.T).max(-1).values

    def choose(self, tokens, image, k):
        if not self.diverse:
            return super().choose(tokens, image, k)
        v = torch.nn.functional.normalize(tokens.float(), dim=-1)
        sim = v @ v.T
        sim = (sim + sim.T) / 2  # exactly symmetric with a unit diagonal: a pair's medoid is a true tie
        sim.fill_diagonal_(1.0)
        chosen = cover(sim.cpu().numpy(), self._redundancy(v).cpu().numpy(), k, self.group_sim)
        return torch.tensor(sorted(chosen + spread(chosen, k - len(chosen), len(v))), device=tokens.device)


def null_prototypes(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Seeded N(0, 1) prototypes: a codebook that knows nothing, with the size and width of a real one."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class HookedPruner:
    """Forward hooks on a LLaVA model that see its input ids and count kept tokens per image."""

    def __init__(self, model):
        self.model = model
        self.kept: list[int] = []  # content tokens kept per image, last prefill
        self.total: list[int] = []  # content tokens per image before pruning, last prefill
        self._input_ids = None
        self._handles = []

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _capture(self, module, args, kwargs):
        # The merged embeddings no longer say where the image was; the input ids do.
        self._input_ids = kwargs.get("input_ids", args[0] if args else None)
        if self._input_ids is None and kwargs.get("pixel_values") is not None:
            raise ValueError("visual token pruning needs input_ids (it finds the image by its placeholder tokens)")


class InputPruner(HookedPruner):
    """Hooks that apply a Method to every image run before the first LLM layer; see the module docstring."""

    def __init__(self, model, method: Method):
        super().__init__(model)
        self.method = method
        self.image_token_id = model.config.image_token_id
        self._state = None  # (pruned 2-D mask, tokens removed per row, pruned length) for decode steps

    def attach(self):
        self._handles = self.method.attach(self.model)
        self._handles.append(self.model.model.register_forward_pre_hook(self._capture, with_kwargs=True))
        lm = self.model.model.language_model
        self._handles.append(lm.register_forward_pre_hook(self._before_llm, with_kwargs=True))
        return self

    def _before_llm(self, module, args, kwargs):
        cache = given_cache(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        ids = self._input_ids
        if past == 0 and ids is not None and (ids == self.image_token_id).any():
            return args, self._prefill(kwargs)
        if past > 0 and self._state is not None:
            return args, self._decode(kwargs, past)
        return args, kwargs

    def _reduce_image(self, block: torch.Tensor, image: int) -> torch.Tensor:
        newline = newline_mask(self.model, block)
        content = (~newline).nonzero().flatten()
        tokens, idx = self.method.reduce(block[content], image)
        self.kept.append(len(tokens))
        self.total.append(len(content))
        if not newline.any():
            return tokens
        if idx is None:
            raise ValueError(f"method {self.method.name!r} merges tokens, so it cannot keep this model's newline tokens")
        return block[torch.sort(torch.cat([content[idx], newline.nonzero().flatten()])).values]

    def _prefill(self, kwargs):
        embeds = kwargs["inputs_embeds"]
        batch, length, _ = embeds.shape
        mask = kwargs.get("attention_mask")
        valid = torch.ones(batch, length, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        self.kept, self.total, rows, image = [], [], [], 0
        for b in range(batch):
            is_image = self._input_ids[b] == self.image_token_id
            pieces, pos = [], 0
            for start, end in image_runs(is_image):
                pieces.append(embeds[b, pos:start][valid[b, pos:start]])
                pieces.append(self._reduce_image(embeds[b, start:end], image))
                image, pos = image + 1, end
            pieces.append(embeds[b, pos:][valid[b, pos:]])
            rows.append(torch.cat(pieces))
        new_len = max(len(r) for r in rows)
        new_embeds = embeds.new_zeros(batch, new_len, embeds.shape[-1])
        new_mask = torch.zeros(batch, new_len, dtype=torch.long, device=embeds.device)
        for b, r in enumerate(rows):  # left padding: the last position is every row's prompt end
            new_embeds[b, new_len - len(r):] = r
            new_mask[b, new_len - len(r):] = 1
        removed = valid.sum(1) - new_mask.sum(1)
        self._state = (new_mask, removed, new_len)
        kwargs = dict(kwargs, inputs_embeds=new_embeds)
        if mask is not None or not new_mask.all():
            kwargs["attention_mask"] = new_mask.to(mask.dtype if mask is not None else torch.long)
        if kwargs.get("position_ids") is not None:  # generate's convention: count of real tokens before
            kwargs["position_ids"] = (new_mask.cumsum(-1) - 1).clamp(min=0)
        return kwargs

    def _decode(self, kwargs, past):
        new_mask, removed, new_len = self._state
        step = kwargs["inputs_embeds"].shape[1]
        extra = new_mask.new_ones(new_mask.shape[0], past + step - new_len)
        kwargs = dict(kwargs, attention_mask=torch.cat([new_mask, extra], dim=1))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] - removed[:, None].to(kwargs["position_ids"])
        return kwargs


@contextmanager
def prune_visual_tokens(model, codebook: Codebook | str | None = None, *, keep: float | None = None,
                        threshold: float | None = None, diverse: bool = False, group_sim: float = GROUP_SIM,
                        method=None):
    """Prune visual tokens of `model` inside the block: by codebook (keep ratio or similarity threshold; the
    paper's rule, or this project's `diverse` extension), or by another `method` (see vrc_dist.baselines).
    Yields the pruner; `.kept` lists tokens kept per image."""
    if method is None:
        if codebook is None:
            raise ValueError("give a codebook (with keep= or threshold=) or a method")
        method = CodebookMethod(codebook, keep=keep, threshold=threshold, diverse=diverse, group_sim=group_sim)
    elif codebook is not None or keep is not None or threshold is not None:
        raise ValueError("a method carries its own settings: give either method= or codebook/keep/threshold")
    pruner = method.pruner(model) if hasattr(method, "pruner") else InputPruner(model, method)
    pruner.attach()
    try:
        yield pruner
    finally:
        pruner.detach()

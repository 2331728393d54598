"""Selection methods: how one image's visual tokens [n, D] are reduced (docs/METHOD.md step 9).

A Method reduces a block; ScoreMethod keeps the lowest scores by ratio or threshold; CodebookMethod scores by
similarity to a codebook's redundant prototypes (the paper's rule, and this project's `diverse` extension).
The hooks that apply a method inside a model are in vrc_dist/prune/hooks.py; the baselines in baselines.py.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from vrc_dist.codebook.store import Codebook

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


def embed_dim(model) -> int:
    return model.config.text_config.hidden_size


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

"""Per-token redundancy metrics for one image (docs/METHOD.md steps 1-7): ask the language model.

Three kinds of variants of the image's visual block go through the LM, and only the first
generated token's logits are read:
  single   [v_i] * dup                                   -> top1_prob, top1_token_id
  region   A = window of i,  B = A with v_i -> e_pad      -> jsd_region = D(A, B)
  global   A = intact image, B = image with window -> e_pad -> jsd_global = D(A, B)

Two engines produce the same logits. "batched" (default) runs each kind as budget-bounded batches,
reuses the prompt prefix's KV cache, computes window-only variants once per distinct window (border
windows are shared by several tokens) and, in the global pass, reuses the intact image's cache up to
the first ablated position. "reference" follows the reference scripts literally: every variant of
every token is one full forward at batch size 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vrc_dist.config import ConfigError, ProbeConfig, parse_token_ranks
from vrc_dist.model.adapter import KVContext, LlavaAdapter, leading_a_token_id
from vrc_dist.model.loading import load_llava
from vrc_dist.probe.divergence import CONVENTIONS, divergence, top1_of_head
from vrc_dist.probe.dpc import dpc_knn_exact

ENGINES = ("batched", "reference")
TOKEN_COLUMNS = (
    "token_index", "row", "col", "cls_sim", "cls_sim_rank", "top1_prob", "top1_token_id", "jsd_region",
    "jsd_global", "score", "low_info", "image_cluster", "image_cluster_size", "candidate",
)  # fmt: skip
# the columns only a probed token has (probe.tokens); the others are every token's
PROBED_COLUMNS = ("top1_prob", "top1_token_id", "jsd_region", "jsd_global", "score", "low_info", "image_cluster",
                  "image_cluster_size", "candidate")


@dataclass
class ImageResult:
    key: str
    grid: tuple[int, int]
    answer: str  # the intact image's first generated token, decoded
    answer_token_id: int
    tokens: dict[str, np.ndarray]  # TOKEN_COLUMNS -> length-L arrays
    candidate_index: np.ndarray  # int32 [n]
    candidate_vectors: np.ndarray  # float16 [n, D]


def windows(grid: tuple[int, int], size: int) -> np.ndarray:
    """[L, size*size] token indices of each token's window, raster order.

    The window is centred on the token and shifted inward at the borders, so it always has size*size
    cells and the token is then off-centre. Rows and columns are clamped separately, so a
    rectangular grid works as long as the window fits in both directions.
    """
    gh, gw = grid
    if size < 1 or size > gh or size > gw:
        raise ValueError(f"a {size}x{size} window does not fit the {gh}x{gw} grid")
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    top = np.clip(rows - size // 2, 0, gh - size)
    left = np.clip(cols - size // 2, 0, gw - size)
    dr, dc = np.divmod(np.arange(size * size), size)
    return (top[:, None] + dr) * gw + left[:, None] + dc


def cls_similarity(cls: torch.Tensor | None, patches: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """cos(p_i, c) and its descending rank (0 = most CLS-like); NaN and -1 for towers without a CLS."""
    if cls is None:
        return np.full(len(patches), np.nan), np.full(len(patches), -1, dtype=np.int32)
    sim = torch.nn.functional.cosine_similarity(patches.double(), cls.double()[None], dim=-1).cpu().numpy()
    rank = np.empty(len(sim), dtype=np.int32)
    rank[np.argsort(-sim, kind="stable")] = np.arange(len(sim), dtype=np.int32)
    return sim, rank


class Prober:
    def __init__(self, cfg: ProbeConfig, engine: str = "batched", generate_tokens: int = 0, adapter: LlavaAdapter | None = None):
        """`generate_tokens` > 0 (reference engine only) makes every variant a `generate` call of that
        many tokens, as the reference scripts do; it changes the cost, not the metrics."""
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}; expected one of {ENGINES}")
        if cfg.divergence not in CONVENTIONS:
            raise ValueError(f"divergence {cfg.divergence!r}; expected one of {CONVENTIONS}")
        if generate_tokens and engine != "reference":
            raise ValueError("generate_tokens applies to the reference engine only")
        self.cfg, self.engine, self.generate_tokens = cfg, engine, generate_tokens
        self.adapter = adapter or load_llava(
            cfg.model, cfg.device, cfg.dtype, prompt=cfg.prompt, pad_token_id=cfg.pad_token_id, token_budget=cfg.token_budget,
            conversation=cfg.conversation,
        )
        self.ranks, self.leading_a_id = self._reference_options()
        self.leading_a_skipped = 0  # variants whose logits are the step after a leading "▁A" (skip_leading_a)

    def _reference_options(self) -> tuple[list[tuple[int, int]] | None, int | None]:
        """`probe.tokens` as rank ranges (None: all) and the "▁A" id of `probe.skip_leading_a` (None: off),
        refused here, before any image, when they cannot apply to this model."""
        cfg, adapter = self.cfg, self.adapter
        if getattr(adapter, "conversation", "template") != cfg.conversation:
            raise ConfigError(f"probe.conversation {cfg.conversation!r}, but the adapter given was built with "
                              f"{getattr(adapter, 'conversation', 'template')!r}")
        ranks = parse_token_ranks(cfg.tokens)
        n = adapter.grid[0] * adapter.grid[1]
        if ranks is not None and ranks[-1][1] > n:
            raise ConfigError(f"probe.tokens asks for rank {ranks[-1][1]}, but {adapter.model_id} has {n} visual "
                              f"tokens per image (ranks 1-{n})")
        return ranks, leading_a_token_id(adapter.tokenizer, adapter.model_id) if cfg.skip_leading_a else None

    @property
    def model_info(self) -> dict:
        return {**self.adapter.info, "divergence": self.cfg.divergence, "engine": self.engine}

    def visual_tokens(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        """The image's projected visual tokens (float32 [L, D]) and their grid."""
        feats = self.adapter.encode_image(image)
        return feats.tokens.float().cpu().numpy(), feats.grid

    @torch.no_grad()
    def probe(self, image, key: str) -> ImageResult:
        feats = self.adapter.encode_image(image)
        cls = cls_similarity(feats.cls, feats.patches)
        who = self._probed(feats, cls[1], key)  # the probed tokens (all: 0..n-1); every pass runs for them only
        top1_prob, top1_id, intact, jsd_region, jsd_global = self._passes(feats.tokens, feats.grid, who)
        return self._result(key, feats, cls, who, top1_prob, top1_id, intact, jsd_region, jsd_global)

    def _passes(self, v: torch.Tensor, grid: tuple[int, int], who: np.ndarray):
        """The three passes over visual tokens v [L, D] for the probed tokens `who`: (top1_prob, top1_id,
        intact logits, jsd_region, jsd_global), the divergences as numpy arrays."""
        cfg, pad = self.cfg, self.adapter.pad_embedding
        n = len(v)
        win = windows(grid, cfg.window)[who]
        # Variants that depend only on the window are computed once per distinct window when batched.
        distinct, of_token = np.unique(win, axis=0, return_inverse=True) if self.engine == "batched" else (win, np.arange(len(who)))
        of_token = of_token.reshape(-1)
        slot = (win == who[:, None]).argmax(1)  # where token i sits in its own window

        single = self._logits(lambda ix: v[who[ix]][:, None].expand(-1, cfg.dup, -1), len(who), cfg.dup)
        top1_prob, top1_id = top1_of_head(single, cfg.k_head)

        image_context = self.adapter.context(v) if self.engine == "batched" else None
        intact = self._logits(lambda ix: v[None], 1, n, image_context, starts=[n])[0]

        def on_device(a):
            return torch.as_tensor(a, device=v.device)

        def window_block(ix):
            return v[on_device(distinct[ix])]

        def without_token(ix):
            block = v[on_device(win[ix])]
            block[on_device(np.arange(len(ix))), on_device(slot[ix])] = pad
            return block

        def without_window(ix):
            block = v[None].repeat(len(ix), 1, 1)
            cells = on_device(distinct[ix])[..., None].expand(-1, -1, v.shape[1])
            return block.scatter_(1, cells, pad.expand(len(ix), distinct.shape[1], -1))

        region_a = self._logits(window_block, len(distinct), win.shape[1])[of_token]
        region_b = self._logits(without_token, len(who), win.shape[1])
        global_b = self._logits(without_window, len(distinct), n, image_context, distinct.min(1), slack=grid[1])[of_token]

        k, conv = cfg.k_div, cfg.divergence
        jsd_region = divergence(region_a, region_b, k, conv).cpu().numpy()
        jsd_global = divergence(intact.expand_as(global_b), global_b, k, conv).cpu().numpy()
        return top1_prob, top1_id, intact, jsd_region, jsd_global

    def _result(self, key: str, feats, cls, who: np.ndarray, top1_prob, top1_id, intact, jsd_region,
                jsd_global) -> ImageResult:
        """Score, the low-info and per-image cluster filters (steps 6-7), and the image's token columns."""
        cfg, v, grid = self.cfg, feats.tokens, feats.grid
        n = len(v)
        score = cfg.k_region * jsd_region + cfg.k_global * jsd_global
        top1_prob = top1_prob.cpu().numpy()
        low_info = (score < cfg.jsd_thres) & (top1_prob < cfg.top1_thres)

        tokens_np = v.float().cpu().numpy()
        clusters = dpc_knn_exact(tokens_np[who], cfg.image_dpc_k, cfg.image_dpc_clusters, seed=cfg.seed).labels
        cluster_size = np.bincount(clusters, minlength=cfg.image_dpc_clusters)[clusters]
        candidate = low_info & (cluster_size <= cfg.cluster_size_thres)

        cls_sim, cls_rank = cls
        rows, cols = np.divmod(np.arange(n), grid[1])
        answer_id = int(intact.argmax())
        candidate_index = np.sort(who[np.flatnonzero(candidate)]).astype(np.int32)
        columns = {
            "token_index": np.arange(n, dtype=np.int32), "row": rows.astype(np.int32), "col": cols.astype(np.int32),
            "cls_sim": cls_sim, "cls_sim_rank": cls_rank, "top1_prob": top1_prob,
            "top1_token_id": top1_id.cpu().numpy().astype(np.int64), "jsd_region": jsd_region, "jsd_global": jsd_global,
            "score": score, "low_info": low_info, "image_cluster": clusters.astype(np.int32),
            "image_cluster_size": cluster_size.astype(np.int32), "candidate": candidate,
        }  # fmt: skip
        columns = spread_probed(columns, who, n)
        return ImageResult(
            key=key, grid=grid, answer=self.adapter.decode(answer_id), answer_token_id=answer_id, tokens=columns,
            candidate_index=candidate_index, candidate_vectors=tokens_np[candidate_index].astype(np.float16),
        )  # fmt: skip

    def _probed(self, feats, rank: np.ndarray, key: str) -> np.ndarray:
        """Token indices `probe.tokens` selects, in rank order: rank r (1-based) is the token of the r-th
        highest cls_sim (cls_sim_rank r - 1). `all`: every token in raster order, the path of old."""
        n = len(feats.tokens)
        if self.ranks is None:
            return np.arange(n)
        if feats.cls is None:
            raise ConfigError(f"probe.tokens selects by [CLS]-similarity rank, but {self.adapter.model_id}'s vision "
                              "tower has no CLS token; use tokens: all")
        if self.ranks[-1][1] > n:
            raise ConfigError(f"probe.tokens asks for rank {self.ranks[-1][1]}, but image {key!r} has {n} visual tokens")
        by_rank = np.argsort(rank, kind="stable")  # by_rank[r] = the token of 0-based rank r
        return by_rank[np.concatenate([np.arange(lo - 1, hi) for lo, hi in self.ranks])]

    def _logits(self, make_blocks, count: int, width: int, context: KVContext | None = None, starts=None,
                slack: int = 0) -> torch.Tensor:
        """`_first_logits`, with `probe.skip_leading_a`: each variant whose own greedy first token is "▁A"
        gets the next step's logits after it instead, as the reference scripts read every run's output."""
        logits = self._first_logits(make_blocks, count, width, context, starts, slack)
        if self.leading_a_id is None:
            return logits
        again = np.flatnonzero((logits.argmax(-1) == self.leading_a_id).cpu().numpy())
        if len(again):
            starts = None if starts is None else np.asarray(starts)[again]
            with self.adapter.after_token(self.leading_a_id):
                logits[torch.as_tensor(again, device=logits.device)] = self._first_logits(
                    lambda ix: make_blocks(again[ix]), len(again), width, context, starts, slack)
        self.leading_a_skipped += len(again)
        return logits

    def _first_logits(
        self, make_blocks, count: int, width: int, context: KVContext | None = None, starts=None, slack: int = 0
    ) -> torch.Tensor:
        """First-token logits [count, V] of the [len(indices), width, D] blocks `make_blocks(indices)` builds.

        `starts[j]` (ascending): the first block position where variant j differs from `context`'s block.
        A batch reuses the cache up to its smallest start, so batches are cut where starts drift more
        than `slack` apart (a grid row): each variant recomputes at most that much more than it must.
        """
        if self.engine == "reference":
            return torch.stack([self.adapter.reference_logits(make_blocks(np.array([j]))[0], self.generate_tokens) for j in range(count)])
        starts = np.zeros(count, dtype=np.int64) if starts is None else np.asarray(starts)
        out = []
        for ix in batches(starts, self.adapter.batch_size(width), slack):
            shared = int(starts[ix[0]]) if context is not None else 0
            out.append(self.adapter.first_token_logits(make_blocks(ix), context, shared))
        return torch.cat(out)


def spread_probed(columns: dict, who: np.ndarray, n: int) -> dict:
    """Length-n columns from the metrics of the probed tokens `who` (given in that order). Tokens not probed
    get NaN metrics, -1 for top1_token_id and image_cluster[_size], False for low_info and candidate."""
    if len(who) == n and np.array_equal(who, np.arange(n)):
        return columns
    out = dict(columns)
    for name in PROBED_COLUMNS:
        values = np.asarray(columns[name])
        fill = np.nan if values.dtype.kind == "f" else False if values.dtype.kind == "b" else -1
        out[name] = np.full(n, fill, dtype=values.dtype)
        out[name][who] = values
    return out


def batches(starts: np.ndarray, size: int, slack: int):
    """Consecutive index ranges of at most `size` whose starts lie within `slack` of the range's first."""
    lo = 0
    while lo < len(starts):
        hi = min(lo + size, len(starts))
        hi = lo + int(np.searchsorted(starts[lo:hi], starts[lo] + slack, side="right"))
        yield np.arange(lo, hi)
        lo = hi

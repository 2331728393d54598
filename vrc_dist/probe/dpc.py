"""DPC-KNN as TCFormer's `cluster_dpc_knn` computes it (docs/METHOD.md), exact and with FAISS.

`dpc_knn_exact` builds the N x N distance matrix: the reference, for one image's tokens.
`dpc_knn_faiss` never does, and returns the same labels wherever its kNN search is exact ("flat").
Both follow one set of rules, so they agree bit for bit:

- d(i, j) = ||x_i - x_j|| / sqrt(D), in float64 from direct differences (`_dist`), never from the
  |a|^2 + |b|^2 - 2ab expansion: duplicates are exactly 0 apart and both versions round alike.
- rho_i = exp(-mean d^2 to its k nearest, itself included) + U[0, 1e-6) noise from default_rng(seed).
- j is denser than i iff rho_j > rho_i; delta_i = min d(i, j) over denser j. The densest point gets
  the largest distance in its own row. TCFormer uses the largest in the whole set; that changes only
  this one delta value, never centres or labels: every other delta_j <= d(j, densest) <= that row
  max, so the densest point has the top score either way.
- Ties: centres are the C largest rho * delta, equal scores lowest index first; a point equally far
  from several centres joins the earliest (highest-scoring) one. Labels are centre ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from vrc_dist.arrays import nonfinite_rows

_EXTRA = 8  # neighbours asked beyond k, so float32 near-ties at the k-th can be re-ranked in float64
_WIDEN = (64, 512)  # neighbour-list lengths tried for points with no denser point in their list
_CELLS = 1 << 22  # float64 values per temporary block (32 MB): bounds memory of distance blocks
AUTO_EXACT_MAX = 2048
AUTO_IVF_MIN = 200_000
_FAISS_OPTIONS = {"use_gpu", "block_size", "nprobe", "hnsw_m", "ef_search"}


@dataclass
class DPCResult:
    labels: np.ndarray  # int64 [N], cluster = rank of its centre
    centers: np.ndarray  # int64 [C], point indices, highest score first
    rho: np.ndarray  # float64 [N]
    delta: np.ndarray  # float64 [N]


def dpc_knn(x, k: int, n_clusters: int, seed: int = 0, backend: str = "auto", **kw) -> DPCResult:
    """DPC-KNN with the backend picked by size: auto | exact | faiss (= flat) | flat | ivf | hnsw.

    kw: `dpc_knn_faiss` options (use_gpu, block_size, ...); the exact backend has no use for them."""
    unknown = sorted(set(kw) - _FAISS_OPTIONS)
    if unknown:
        raise TypeError(f"unknown DPC option(s) {unknown}; known: {sorted(_FAISS_OPTIONS)}")
    x = _check(x, k, n_clusters)
    if backend == "auto":
        n = len(x)
        backend = "exact" if n <= AUTO_EXACT_MAX else "flat" if n < AUTO_IVF_MIN else "ivf"
    if backend == "exact":
        return dpc_knn_exact(x, k, n_clusters, seed)
    if backend in ("faiss", "flat", "ivf", "hnsw"):
        return dpc_knn_faiss(x, k, n_clusters, seed, index="flat" if backend == "faiss" else backend, **kw)
    raise ValueError(f"unknown DPC backend {backend!r}; expected auto, exact, faiss, flat, ivf or hnsw")


def dpc_knn_exact(x, k: int, n_clusters: int, seed: int = 0) -> DPCResult:
    """The O(N^2) reference: fine for one image's tokens, impossible for millions."""
    x = np.asarray(_check(x, k, n_clusters), dtype=np.float64)
    n = len(x)
    k = min(k, n)
    step = max(1, _CELLS // (n * x.shape[1]))
    d = np.empty((n, n))
    for i in range(0, n, step):
        d[i : i + step] = _dist(x[i : i + step], x)
    rho = _density(np.sort(np.partition(d, k - 1, axis=1)[:, :k], axis=1), seed)
    delta = np.empty(n)
    for i in range(0, n, step):
        denser = rho[None, :] > rho[i : i + step, None]
        delta[i : i + step] = np.where(denser, d[i : i + step], np.inf).min(1)
    top = int(np.argmax(rho))
    delta[top] = d[top].max()
    centers = _centers(rho, delta, n_clusters)
    return _result(d[:, centers].argmin(1), centers, rho, delta)


def dpc_knn_faiss(
    x,
    k: int,
    n_clusters: int,
    seed: int = 0,
    index: str = "flat",
    use_gpu: bool = False,
    block_size: int = 8192,
    nprobe: int = 32,
    hnsw_m: int = 32,
    ef_search: int = 128,
) -> DPCResult:
    """DPC-KNN without the N x N matrix; memory O(N * (D + k)), queries searched `block_size` at a time.

    index: "flat" (exact kNN: same labels as `dpc_knn_exact`), "ivf" (IndexIVFFlat, nlist ~ 4 sqrt(N),
    `nprobe` lists searched) or "hnsw" (IndexHNSWFlat, `hnsw_m` links, `ef_search`). Approximate
    indexes only change which neighbours are found; delta for local maxima and the assignment to
    centres stay exact. use_gpu: FAISS GPU indexes where faiss has GPUs (not for hnsw).
    """
    if index not in ("flat", "ivf", "hnsw"):
        raise ValueError(f"unknown FAISS index {index!r}; expected flat, ivf or hnsw")
    x = _check(x, k, n_clusters)
    n = len(x)
    k = min(k, n)
    exact = index == "flat"
    sp = _Space(x)
    main = _build(sp.x32, index, use_gpu, nprobe, hnsw_m, ef_search, seed)
    search = _searcher(main, sp.x32, sp.x32, exact)
    blocks = [np.arange(i, min(i + block_size, n)) for i in range(0, n, block_size)]

    # kNN lists, re-ranked in float64; lo bounds the distance of every point left out of a list.
    m0 = min(n, k + _EXTRA)
    nb_d, nb_id, nb_lo = np.empty((n, m0)), np.empty((n, m0), np.int64), np.empty(n)
    for q in blocks:
        nb_d[q], nb_id[q], nb_lo[q] = _certified(sp, search, q, m0, n, exact, lambda d, lo: d[:, k - 1] <= lo)
    rho = _density(nb_d[:, :k], seed)

    delta = _faiss_delta(sp, search, rho, blocks, (nb_d, nb_id, nb_lo), m0, exact, block_size)
    centers = _centers(rho, delta, n_clusters)
    labels = _faiss_assign(sp, centers, blocks, use_gpu, nprobe, hnsw_m, ef_search, seed)
    return _result(labels, centers, rho, delta)


def _faiss_delta(sp, search, rho, blocks, neighbours, m0: int, exact: bool, block_size: int) -> np.ndarray:
    """delta of every point: the first denser point of a distance-sorted list is the nearest denser point, as
    long as nothing left out of the list could be nearer; the rest get longer lists, then a full scan."""
    nb_d, nb_id, nb_lo = neighbours
    n = len(rho)
    delta = np.full(n, np.nan)
    top = int(np.argmax(rho))
    step = max(1, _CELLS // sp.x32.shape[1])
    delta[top] = max(sp.dist([top], np.arange(i, min(i + step, n))[None]).max() for i in range(0, n, step))
    pending = []
    for q in blocks:
        pending.append(_take_first_denser(delta, rho, q, nb_d[q], nb_id[q], nb_lo[q]))
    pending = np.concatenate(pending)
    pending = pending[pending != top]
    for m in _WIDEN:
        if m <= m0 or len(pending) == 0:
            continue
        m = min(m, n)
        left = []
        for i in range(0, len(pending), block_size):
            q = pending[i : i + block_size]
            d, ids, lo = sp.refine(q, *search(q, m), complete=not exact or m >= n)
            left.append(_take_first_denser(delta, rho, q, d, ids, lo))
        pending = np.concatenate(left)
    if len(pending):
        delta[pending] = _scan_denser(sp, rho, pending)
    return delta


def _faiss_assign(sp, centers, blocks, use_gpu, nprobe, hnsw_m, ef_search, seed) -> np.ndarray:
    """Each point's nearest centre through a flat index over the centres, ties to the earliest centre."""
    c32 = sp.x32[centers]
    csearch = _searcher(_build(c32, "flat", use_gpu, nprobe, hnsw_m, ef_search, seed), sp.x32, c32, True)
    labels = np.empty(len(sp.x32), np.int64)
    for q in blocks:
        d, ids, lo = _certified(
            sp, csearch, q, min(len(centers), _EXTRA), len(centers), True, lambda d, lo: d[:, 0] < lo, base=centers
        )
        labels[q] = ids[:, 0]
    return labels


def _check(x, k, n_clusters) -> np.ndarray:
    for name, v in (("k", k), ("n_clusters", n_clusters)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D array [N, D], got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"x is empty: shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"x must be numeric, got dtype {x.dtype}")
    step = max(1, _CELLS // x.shape[1])
    bad = np.concatenate([nonfinite_rows(x[i : i + step]) + i for i in range(0, len(x), step)])
    if len(bad):
        raise ValueError(f"x has {len(bad)} row(s) with NaN or inf, the first at index {bad[0]}")
    return x


def _dist(a, b):
    """d = euclidean / sqrt(D) between rows a [n, D] and b [m, D] or [n, m, D]; the one formula both versions use."""
    return np.sqrt(((a[:, None, :] - b) ** 2).sum(-1) / a.shape[1])


def _density(knn_d, seed):
    noise = np.random.default_rng(seed).random(len(knn_d)) * 1e-6  # breaks density ties, as TCFormer does
    return np.exp(-(knn_d**2).mean(1)) + noise


def _centers(rho, delta, n_clusters):
    return np.argsort(-(rho * delta), kind="stable")[: min(n_clusters, len(rho))]


def _result(labels, centers, rho, delta):
    labels = np.asarray(labels, np.int64).copy()
    labels[centers] = np.arange(len(centers))  # each centre leads its own cluster
    return DPCResult(labels, centers.astype(np.int64), rho, delta)


class _Space:
    """The caller's rows (float64 on demand) and a centred float32 copy for FAISS."""

    def __init__(self, x):
        self.x, self.dim = x, x.shape[1]
        step = max(1, _CELLS // self.dim)
        mean = sum(x[i : i + step].sum(0, dtype=np.float64) for i in range(0, len(x), step)) / len(x)
        # Centring keeps float32 distances accurate when all vectors share a large offset.
        self.x32 = np.empty(x.shape, np.float32)
        n2 = np.empty(len(x))
        for i in range(0, len(x), step):
            self.x32[i : i + step] = x[i : i + step] - mean
            n2[i : i + step] = (self.x32[i : i + step].astype(np.float64) ** 2).sum(1)
        # FAISS's float32 squared distances (expansion, dot products of length D, rounded inputs) are
        # off by at most about (D + 8) * 2^-24 * (|a|^2 + |b|^2); twice that is our safety margin.
        self.tol = 2 * (self.dim + 8) * 2.0**-24 * (n2 + n2.max())

    def dist(self, q, ids):
        """float64 d between rows q [n] and ids [n, m] (-1: missing, inf), in bounded blocks."""
        q, ids = np.asarray(q), np.asarray(ids)
        out = np.full(ids.shape, np.inf)
        step = max(1, _CELLS // (ids.shape[1] * self.dim))
        for i in range(0, len(q), step):
            j = ids[i : i + step]
            rows = np.asarray(self.x[np.maximum(j, 0)], np.float64)
            out[i : i + step] = np.where(j >= 0, _dist(np.asarray(self.x[q[i : i + step]], np.float64), rows), np.inf)
        return out

    def refine(self, q, d32, ids, complete, base=None):
        """Re-rank FAISS candidates by float64 distance (ties: lower id), and bound what they left out.

        Returns d, ids sorted, and lo [n]: no point outside a row's list is nearer than lo (inf when
        the list is complete or the search approximate, where nothing can be vouched for)."""
        d = self.dist(q, ids if base is None else np.where(ids >= 0, base[np.maximum(ids, 0)], -1))
        o = np.lexsort((ids, d), axis=-1)
        d, ids = np.take_along_axis(d, o, 1), np.take_along_axis(ids, o, 1)
        if complete:
            return d, ids, np.full(len(q), np.inf)
        return d, ids, np.sqrt(np.maximum(d32.max(1) - self.tol[q], 0) / self.dim)


def _certified(sp, search, q, m, n_base, exact, ok, base=None):
    """Top-m lists for rows q, searched again with 4x m for rows whose `ok(d, lo)` test fails."""
    complete = not exact or m >= n_base
    d, ids, lo = sp.refine(q, *search(q, m), complete=complete, base=base)
    redo = ~ok(d, lo)
    if redo.any() and not complete:
        d2, ids2, lo2 = _certified(sp, search, q[redo], min(4 * m, n_base), n_base, exact, ok, base)
        d[redo], ids[redo] = d2[:, :m], ids2[:, :m]
        # what the longer list held beyond m columns is no nearer than its (m+1)-th entry
        lo[redo] = np.minimum(lo2, d2[:, m]) if d2.shape[1] > m else lo2
    return d, ids, lo


def _take_first_denser(delta, rho, q, d, ids, lo):
    """Set delta[q] where a list vouches for the nearest denser point; return the rows it can't."""
    denser = (ids >= 0) & (rho[np.maximum(ids, 0)] > rho[q, None])
    pos = denser.argmax(1)
    r = d[np.arange(len(q)), pos]
    ok = denser[np.arange(len(q)), pos] & (r <= lo)
    delta[q[ok]] = r[ok]
    return q[~ok]


def _scan_denser(sp, rho, q, t=_EXTRA, chunk=8192):
    """Exact delta for rows q by scanning all points in density order.

    Chunks wholly denser than a query go through FAISS (float32 top-t candidates, re-ranked in
    float64, rescanned with 8x t where they can't be vouched for); the denser part of the query's own
    chunk is measured directly in float64."""
    order = np.argsort(-rho, kind="stable")
    rank = np.empty(len(rho), np.int64)
    rank[order] = np.arange(len(rho))
    qr = rank[q]
    cand_d = np.full((len(q), t), np.inf, np.float32)
    cand_id = np.full((len(q), t), -1, np.int64)
    own = np.full(len(q), np.inf)
    for a in range(0, int(qr.max()) + 1, chunk):
        ids = order[a : a + chunk]
        rows = np.flatnonzero(qr >= a + len(ids))
        if len(rows):
            d32, i = faiss.knn(sp.x32[q[rows]], sp.x32[ids], min(t, len(ids)))
            d32 = np.concatenate([cand_d[rows], d32], 1)
            i = np.concatenate([cand_id[rows], ids[i]], 1)
            keep = np.argpartition(d32, t - 1, axis=1)[:, :t]
            cand_d[rows], cand_id[rows] = np.take_along_axis(d32, keep, 1), np.take_along_axis(i, keep, 1)
        for j in np.flatnonzero((qr >= a) & (qr < a + len(ids))):
            if qr[j] > a:
                own[j] = sp.dist(q[[j]], ids[None, : qr[j] - a]).min()
    d, _, lo = sp.refine(q, cand_d, cand_id, complete=False)  # an unfilled slot (inf) makes lo inf
    best = np.minimum(d[:, 0], own)
    sure = best <= lo
    if not sure.all():
        best[~sure] = _scan_denser(sp, rho, q[~sure], 8 * t, chunk)
    return best


def _build(x32, kind, use_gpu, nprobe, hnsw_m, ef_search, seed):
    n, dim = x32.shape
    if kind == "ivf":
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))  # FAISS wants >= 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        index.cp.seed, index.cp.niter, index.cp.max_points_per_centroid = seed, 10, 40  # bounded training cost
        index.nprobe = nprobe
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m)
        index.hnsw.efSearch = ef_search
    else:
        index = faiss.IndexFlatL2(dim)
    if use_gpu and kind != "hnsw" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    if kind == "ivf":
        index.train(x32)
    index.add(x32)
    return index


def _searcher(index, queries32, base32, exact):
    """search(q, m) -> (float32 squared distances, ids) for query rows q; brute force where the index can't."""

    def search(q, m):
        if m > 2048:  # beyond FAISS GPU's k limit; only reached by rows in huge tie groups
            return faiss.knn(queries32[q], base32, m)
        d32, ids = index.search(queries32[q], m)
        short = (ids < 0).any(1)  # an approximate search may find fewer than m points
        if not exact and short.any():
            d32[short], ids[short] = faiss.knn(queries32[q[short]], base32, m)
        return d32, ids

    return search

import functools
import tracemalloc

import numpy as np
import pytest

from vrc_dist.probe import dpc
from vrc_dist.probe.dpc import dpc_knn, dpc_knn_exact, dpc_knn_faiss


def ari(a, b):
    """Adjusted Rand index from the contingency table."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)

    def pairs(v):
        return (v * (v - 1) / 2).sum()

    both, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(np.array([len(a)]))
    return (both - expected) / ((rows + cols) / 2 - expected)


def blobs(n, dim, n_blobs=20, spread=0.15, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, dim))
    return (centres[rng.integers(0, n_blobs, n)] + spread * rng.standard_normal((n, dim))).astype(np.float32)


@functools.cache
def exact_on(name, n, dim, seed):
    return dpc_knn_exact(DATA[name](n, dim, seed), 5, 64)


DATA = {
    "random": lambda n, dim, seed: np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32),
    "blobs": lambda n, dim, seed: blobs(n, dim, seed=seed),
}


def assert_same(a, b):
    np.testing.assert_array_equal(a.centers, b.centers)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.rho, b.rho)
    np.testing.assert_array_equal(a.delta, b.delta)


def test_ari_helper():
    assert ari([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    assert ari([0, 0, 1, 1], [0, 1, 0, 1]) < 0


def test_exact_hand_checked():
    # 1-D, k = 3. Densities by hand: exp(-mean of squared distances to self + 2 nearest).
    x = np.array([[0.0], [0.1], [0.3], [1.0], [1.05], [1.3]])
    r = dpc_knn_exact(x, k=3, n_clusters=2)
    msd = np.array([0.01 + 0.09, 0.01 + 0.04, 0.04 + 0.09, 0.0025 + 0.09, 0.0025 + 0.0625, 0.0625 + 0.09]) / 3
    np.testing.assert_allclose(r.rho, np.exp(-msd), atol=1e-6)  # noise < 1e-6
    # density order 1 > 4 > 3 > 0 > 2 > 5; the densest point gets its row's max distance (1.3 - 0.1)
    np.testing.assert_allclose(r.delta, [0.1, 1.2, 0.2, 0.05, 0.95, 0.25])
    np.testing.assert_array_equal(r.centers, [1, 4])
    np.testing.assert_array_equal(r.labels, [0, 0, 0, 1, 1, 1])
    r3 = dpc_knn_exact(x, k=3, n_clusters=3)  # third score: point 5 (0.95 * 0.25)
    np.testing.assert_array_equal(r3.centers, [1, 4, 5])
    np.testing.assert_array_equal(r3.labels, [0, 0, 0, 1, 1, 2])
    assert r3.labels.dtype == np.int64 and r3.centers.dtype == np.int64


def tcformer_cluster_dpc_knn(x, cluster_num, k, noise):
    """TCFormer's cluster_dpc_knn for one batch, verbatim in torch, with our noise injected."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(np.asarray(x, np.float64))[None]
    _, n, c = x.shape
    dist_matrix = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / (c**0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=k, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    density = density + torch.from_numpy(noise)[None]
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    idx_cluster = dist_matrix[0][index_down[0]].argmin(dim=0)
    idx_cluster[index_down[0]] = torch.arange(cluster_num)
    return idx_cluster.numpy(), index_down[0].numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_matches_tcformer(seed):
    x = np.random.default_rng(seed).standard_normal((576, 32))
    noise = np.random.default_rng(seed).random(576) * 1e-6
    labels, centers = tcformer_cluster_dpc_knn(x, 8, 5, noise)
    r = dpc_knn_exact(x, 5, 8, seed=seed)
    np.testing.assert_array_equal(r.centers, centers)
    np.testing.assert_array_equal(r.labels, labels)


def test_every_point_its_own_cluster_when_n_le_clusters():
    x = np.random.default_rng(0).standard_normal((10, 4))
    for f in (dpc_knn_exact, dpc_knn_faiss):
        r = f(x, 5, 64)
        assert len(r.centers) == 10
        np.testing.assert_array_equal(r.labels[r.centers], np.arange(10))


@pytest.mark.parametrize(
    "n,dim,seed", [(n, d, s) for n in (50, 500) for d in (8, 64) for s in (0, 1, 2)] + [(5000, 8, 0), (5000, 64, 0)]
)
def test_flat_equals_exact_random(n, dim, seed):
    x = DATA["random"](n, dim, seed)
    assert_same(dpc_knn_faiss(x, 5, 64, block_size=1000), exact_on("random", n, dim, seed))


def test_flat_equals_exact_blobs():
    x = DATA["blobs"](5000, 16, 0)
    assert_same(dpc_knn_faiss(x, 5, 64, block_size=2048), exact_on("blobs", 5000, 16, 0))


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_close_to_exact(index):
    x = DATA["blobs"](5000, 16, 0)
    r = dpc_knn_faiss(x, 5, 64, index=index)
    assert ari(r.labels, exact_on("blobs", 5000, 16, 0).labels) >= 0.95
    np.testing.assert_array_equal(r.labels[r.centers], np.arange(64))


def duplicated(seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((150, 8))
    x = np.concatenate([base, base, base[:40], np.repeat(base[40:43], 30, axis=0)])
    return x[rng.permutation(len(x))].astype(np.float32)


def near_ties(seed):
    # 200 points on a unit sphere around the origin, radii 1 + i * 1e-9: one distance to float32,
    # distinct in float64, so FAISS lists an arbitrary few of them among the origin's nearest.
    # Four companions at radius 0.5 settle the origin's 5-NN; four twins just outside each shell
    # point make the shell denser than the origin, whose nearest denser point is then in the tie.
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((200, 8))
    shell = (1 + 1e-9 * rng.permutation(200))[:, None] * dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    companions = 0.5 * rng.standard_normal((4, 8))
    companions /= np.linalg.norm(companions, axis=1, keepdims=True) / 0.5
    twins = [(1 + 0.01 * t) * shell for t in range(1, 5)]
    return np.concatenate([np.zeros((1, 8)), companions, shell, *twins, 5 + rng.standard_normal((100, 8))])


TIES = {
    "near_ties": near_ties,
    "duplicates": duplicated,
    "all_identical": lambda seed: np.ones((300, 6), np.float32),
    # hypercube vertices twice over: every distance is shared by many points (tie groups straddle k)
    "hypercube": lambda seed: np.tile(((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(np.float32), (2, 1)),
    "big_offset": lambda seed: np.random.default_rng(seed).standard_normal((800, 16)).astype(np.float32) + 1000,
    "float16_4096d": lambda seed: np.random.default_rng(seed).standard_normal((150, 4096)).astype(np.float16),
}


@pytest.mark.parametrize("name", TIES)
@pytest.mark.parametrize("n_clusters", [8, 64])
def test_flat_equals_exact_ties_and_hard_inputs(name, n_clusters):
    x = TIES[name](0)
    assert_same(dpc_knn_faiss(x, 5, n_clusters, block_size=100), dpc_knn_exact(x, 5, n_clusters))


def test_assignment_resolves_float32_near_ties(monkeypatch):
    # Make the 200 near-tied shell points the centres: the origin's nearest centre is then decided
    # at the 1e-9 level, below float32 resolution.
    monkeypatch.setattr(dpc, "_centers", lambda rho, delta, c: np.arange(5, 205))
    x = near_ties(0)
    want = dpc_knn_exact(x, 5, 200)
    assert want.labels[0] == np.argmin(np.linalg.norm(x[5:205], axis=1))
    assert_same(dpc_knn_faiss(x, 5, 200), want)


def test_ties_go_to_lowest_index():
    # identical points: equal scores (all 0) pick the lowest indices, and all others join centre 0
    r = dpc_knn_faiss(np.zeros((20, 3)), 5, 4)
    np.testing.assert_array_equal(r.centers, [0, 1, 2, 3])
    np.testing.assert_array_equal(r.labels, [0, 1, 2, 3] + [0] * 16)


def test_local_maxima_scan_paths(monkeypatch):
    # Force every local maximum through the density-ordered scan, in tiny chunks with short candidate
    # lists, so its in-chunk float64 part and its rescans with longer lists all run.
    x = DATA["blobs"](2000, 8, 1)
    want = dpc_knn_exact(x, 5, 64)
    calls = []
    scan = dpc._scan_denser

    def tiny_scan(sp, rho, q, t=2, chunk=64):
        calls.append(t)
        return scan(sp, rho, q, t, chunk)

    monkeypatch.setattr(dpc, "_WIDEN", ())
    monkeypatch.setattr(dpc, "_scan_denser", tiny_scan)
    assert_same(dpc_knn_faiss(x, 5, 64), want)
    assert calls and calls[0] == 2


def test_faiss_memory_stays_below_n_squared():
    n = 6000
    x = DATA["random"](n, 8, 0)
    tracemalloc.start()
    dpc_knn_faiss(x, 5, 64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < n * n * 8 / 4, f"peak {peak / 2**20:.0f} MB looks like an N x N matrix"


def test_noise_is_seeded():
    x = DATA["random"](300, 8, 0)
    a, b = dpc_knn_faiss(x, 5, 8, seed=3), dpc_knn_faiss(x, 5, 8, seed=3)
    assert_same(a, b)
    assert not np.array_equal(a.rho, dpc_knn_faiss(x, 5, 8, seed=4).rho)
    # square corners: equal densities, so the noise alone picks the centre
    square = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    picks = {int(dpc_knn_exact(square, 2, 1, seed=s).centers[0]) for s in range(10)}
    assert len(picks) > 1


def test_dispatcher():
    small = DATA["random"](200, 8, 0)
    assert_same(dpc_knn(small, 5, 8), dpc_knn_exact(small, 5, 8))
    assert_same(dpc_knn(small, 5, 8, backend="faiss", block_size=50), dpc_knn_exact(small, 5, 8))
    big = DATA["random"](3000, 8, 0)
    assert_same(dpc_knn(big, 5, 8), dpc_knn_faiss(big, 5, 8))
    assert dpc_knn(big, 5, 8, backend="ivf").labels.shape == (3000,)
    # FAISS options from ClusterConfig are fine when auto picks the exact backend; typos are not
    assert_same(dpc_knn(small, 5, 8, use_gpu=False), dpc_knn_exact(small, 5, 8))
    with pytest.raises(TypeError, match="nprobes"):
        dpc_knn(small, 5, 8, nprobes=4)


@pytest.mark.parametrize(
    "x,k,c,match",
    [
        (np.zeros(5), 5, 2, "2-D"),
        (np.zeros((2, 3, 4)), 5, 2, "2-D"),
        (np.zeros((0, 4)), 5, 2, "empty"),
        (np.array([["a", "b"]]), 5, 2, "numeric"),
        (np.zeros((5, 2)), 0, 2, "k must be"),
        (np.zeros((5, 2)), 5, 0, "n_clusters must be"),
        (np.zeros((5, 2)), 2.5, 2, "k must be"),
    ],
)
def test_bad_input(x, k, c, match):
    for backend in ("exact", "faiss"):
        with pytest.raises(ValueError, match=match):
            dpc_knn(x, k, c, backend=backend)


def test_non_finite_rows_named():
    x = np.zeros((10, 3))
    x[4, 1], x[7, 0], x[7, 2] = np.nan, np.inf, -np.inf
    for backend in ("exact", "faiss", "ivf"):
        with pytest.raises(ValueError, match=r"2 row\(s\) with NaN or inf, the first at index 4"):
            dpc_knn(x, 5, 2, backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown DPC backend"):
        dpc_knn(np.zeros((5, 2)), 2, 2, backend="kdtree")
    with pytest.raises(ValueError, match="unknown FAISS index"):
        dpc_knn_faiss(np.zeros((5, 2)), 2, 2, index="pq")

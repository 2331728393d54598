"""Time and peak memory of DPC-KNN backends; prints one Markdown table.

Each case runs in a fresh subprocess, so its peak RSS (ru_maxrss) covers FAISS's allocations too and
includes the input data (shown separately). Data: Gaussian blobs (1 per 1,000 points), k = 5, 64
clusters. "ARI" compares labels with the exact backend, or with flat where exact is too large.

    python bench/dpc_bench.py            # full grid, N = 10k .. 1M (takes hours on 2 cores)
    python bench/dpc_bench.py --quick    # N = 10k, 50k (make bench)
    python bench/dpc_bench.py --only ivf:1000000:256:float32
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

QUICK = [
    ("exact", 10_000, 256, "float32"),
    ("flat", 10_000, 256, "float32"),
    ("ivf", 10_000, 256, "float32"),
    ("hnsw", 10_000, 256, "float32"),
    ("flat", 50_000, 256, "float32"),
    ("ivf", 50_000, 256, "float32"),
    ("hnsw", 50_000, 256, "float32"),
]
FULL = QUICK + [
    ("exact", 20_000, 256, "float32"),
    ("flat", 20_000, 256, "float32"),
    ("ivf", 20_000, 256, "float32"),
    ("flat", 200_000, 256, "float32"),
    ("ivf", 200_000, 256, "float32"),
    ("hnsw", 200_000, 256, "float32"),
    ("ivf", 1_000_000, 256, "float32"),
    ("exact", 10_000, 4096, "float16"),
    ("flat", 10_000, 4096, "float16"),
    ("ivf", 10_000, 4096, "float16"),
    ("flat", 100_000, 4096, "float16"),
    ("ivf", 100_000, 4096, "float16"),
]


def blobs(n: int, dim: int, dtype: str, seed: int = 0) -> np.ndarray:
    """n points around n/1000 random centres, generated in chunks so no float64 copy of all exists."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 1000), dim)).astype(np.float32)
    x = np.empty((n, dim), dtype)
    for i in range(0, n, 65536):
        m = min(65536, n - i)
        x[i : i + m] = centres[rng.integers(0, len(centres), m)] + 0.5 * rng.standard_normal((m, dim), np.float32)
    return x


def run_case(method: str, n: int, dim: int, dtype: str, labels_out: str) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vrc_dist.probe.dpc import dpc_knn

    x = blobs(n, dim, dtype)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    res = dpc_knn(x, 5, 64, seed=0, backend=method)
    secs = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF)
    np.save(labels_out, res.labels)
    return {
        "secs": secs,
        # on a shared machine wall time depends on the neighbours; CPU time doesn't
        "cpu_secs": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "data_mb": x.nbytes / 2**20,
        "rss_after_data_mb": before.ru_maxrss / 1024,
        "clusters": int(len(res.centers)),
    }


def ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index from the contingency table."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)
    pairs = lambda v: (v * (v - 1) / 2).sum()  # noqa: E731
    both, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([len(a)]))
    expected = rows * cols / total
    return float((both - expected) / ((rows + cols) / 2 - expected))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 10k and 50k only")
    ap.add_argument("--only", nargs="*", help="cases as method:N:D:dtype")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    ap.add_argument("--case", nargs=5, help=argparse.SUPPRESS)  # method N D dtype labels.npy, in the child
    args = ap.parse_args()
    if args.case:
        m, n, d, dt, out = args.case
        print(json.dumps(run_case(m, int(n), int(d), dt, out)))
        return
    if args.only:
        cases = [(m, int(n), int(d), dt) for m, n, d, dt in (c.split(":") for c in args.only)]
    else:
        cases = QUICK if args.quick else FULL
    order = {"exact": 0, "flat": 1, "ivf": 2, "hnsw": 3}
    cases = sorted(cases, key=lambda c: (c[3] != "float32", c[2], c[1], order[c[0]]))
    tmp = tempfile.mkdtemp(prefix="dpc_bench_")
    rows, labels = [], {}
    print(f"# DPC-KNN bench: k=5, 64 clusters, {os.cpu_count()} CPUs", file=sys.stderr)
    for m, n, d, dt in cases:
        out = f"{tmp}/{m}_{n}_{d}_{dt}.npy"
        cmd = [sys.executable, __file__, "--case", m, str(n), str(d), dt, out]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            r = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-300:]}
        except subprocess.TimeoutExpired:
            r = {"error": f"timeout after {args.timeout:.0f} s"}
        ref = next((labels[(rm, n, d, dt)] for rm in ("exact", "flat") if (rm, n, d, dt) in labels), None)
        if "error" not in r:
            labels[(m, n, d, dt)] = np.load(out)
            r["ari"] = "ref" if ref is None else f"{ari(ref, labels[(m, n, d, dt)]):.4f}"
        print(f"{m:5s} N={n:>9,} D={d:4d} {dt}: {r}", file=sys.stderr, flush=True)
        rows.append((m, n, d, dt, r))
    print("| backend | N | D | dtype | wall (s) | CPU (s) | peak RSS (MB) | input (MB) | ARI vs exact/flat |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for m, n, d, dt, r in rows:
        if "error" in r:
            print(f"| {m} | {n:,} | {d} | {dt} | {r['error'].splitlines()[-1]} | | | | |")
        else:
            print(
                f"| {m} | {n:,} | {d} | {dt} | {r['secs']:.1f} | {r['cpu_secs']:.1f} | {r['peak_mb']:,.0f} "
                f"| {r['data_mb']:,.0f} | {r['ari']} |"
            )


if __name__ == "__main__":
    main()

"""Faults that need no Ray: a codebook commit killed at each step (of the version, and of adding a file to the
candidate pool), and a full disk under the metrics writer.

Kills are real (os._exit in a child process: no finally, no cleanup), not exceptions. The full disk is a
real size-limited tmpfs mounted for the test (needs root; skipped with the reason otherwise).
"""
from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fakes import FakeProber
from rel_helpers import child_env, doctor_errors, png, raw_tar, run_local

from vrc_dist.codebook.format import PROVENANCE_SCHEMA
from vrc_dist.codebook.store import Codebook

# Where a commit can die. Each: (what to wrap in the child, which call of it dies). Ordered as commit runs.
COMMIT_STEPS = {
    "saving vectors.npy": ("codebook.np.save", 1),
    "writing provenance.parquet": ("codebook.pq.write_table", 1),
    "writing index.faiss": ("codebook.faiss.write_index", 1),
    "writing params.json": ("pathlib.Path.write_text", 1),
    "writing SHA256SUMS": ("pathlib.Path.write_text", 2),
    "making files read-only": ("codebook.os.chmod", 3),
    "fsyncing files": ("codebook.fsync_path", 2),
    "publishing (rename)": ("codebook.os.rename", 1),
    "fsyncing the directory": ("codebook.fsync_path", 6),
    "writing the manifest": ("codebook.write_json_atomic", 1),
    "replacing the manifest": ("codebook.os.replace", 1),
}
PUBLISHED_FROM = "fsyncing the directory"  # from this step on, v0002 was renamed into place

CHILD = textwrap.dedent("""
    import os, sys, pathlib
    import numpy as np, pyarrow as pa
    from vrc_dist.codebook import store as codebook
    from vrc_dist.codebook.format import PROVENANCE_SCHEMA
    from vrc_dist.codebook.store import Codebook
    target, nth = sys.argv[2], int(sys.argv[3])
    owner_name, attr = target.rsplit(".", 1)
    owner = {"codebook": codebook, "codebook.np": codebook.np, "codebook.pq": codebook.pq,
             "codebook.faiss": codebook.faiss, "codebook.os": codebook.os, "pathlib.Path": pathlib.Path}[owner_name]
    real, calls = getattr(owner, attr), [0]
    def wrapper(*a, **k):
        calls[0] += 1
        if calls[0] == nth:
            os._exit(17)
        return real(*a, **k)
    setattr(owner, attr, wrapper)
    prov = pa.table({"key": list("xyz"), "shard": ["s"] * 3, "token_index": [0, 1, 2], "cluster": [0] * 3,
                     "support": [1] * 3, "cluster_size": [1] * 3}).cast(PROVENANCE_SCHEMA)
    Codebook.at(sys.argv[1]).commit(np.full((3, 4), 2.0, np.float32), prov, {"note": "v2"}, parent=1)
    sys.exit(0)
""")


def _prov(n=3):
    return pa.table({"key": [f"k{i}" for i in range(n)], "shard": ["s"] * n, "token_index": list(range(n)),
                     "cluster": [0] * n, "support": [1] * n, "cluster_size": [1] * n}).cast(PROVENANCE_SCHEMA)


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_commit_killed_at_each_step_keeps_every_version_loadable(tmp_path, step):
    book = tmp_path / "cb"
    v1 = np.random.default_rng(1).random((3, 4)).astype(np.float32)
    Codebook.create(book, "t", "m", 4).commit(v1, _prov(), {"note": "v1"})
    target, nth = COMMIT_STEPS[step]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(book), target, str(nth)], env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, f"the commit did not die at {step}: rc {proc.returncode} {proc.stderr[-2000:]}"

    published = list(COMMIT_STEPS).index(step) >= list(COMMIT_STEPS).index(PUBLISHED_FROM)
    assert Codebook.at(book).versions() == ([1, 2] if published else [1])
    np.testing.assert_array_equal(Codebook.open(book, version=1).vectors, v1)  # checksums verified
    latest = Codebook.open(book)
    assert latest.version == (2 if published else 1)
    if published:
        np.testing.assert_array_equal(latest.vectors, np.full((3, 4), 2.0, np.float32))
    assert doctor_errors(book) == [], "the doctor calls a crash-consistent state broken"
    # The next writer carries on without reusing a number, and its manifest rewrite lists every version.
    nxt = Codebook.at(book).commit(np.ones((3, 4), np.float32), _prov(), {"note": "after"})
    # Unpublished, the dead writer's number is free unless its half-made directory is left: never reused.
    assert nxt == (3 if published else 2)
    listed = [v["version"] for v in json.loads((book / "manifest.json").read_text())["versions"]]
    assert listed == Codebook.at(book).versions() and nxt in listed
    assert doctor_errors(book) == []


POOL_CHILD = textwrap.dedent("""
    import errno, os, sys, pathlib
    import numpy as np, pyarrow as pa
    from vrc_dist.codebook import store as codebook
    from vrc_dist.codebook.format import PROVENANCE_SCHEMA
    from vrc_dist.codebook.store import Codebook
    book, src, step = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
    def die(*a, **k):
        os._exit(17)
    def no_link(*a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    def half_copy(s, d):  # dies with half the file written under the temporary name
        data = pathlib.Path(s).read_bytes()
        pathlib.Path(d).write_bytes(data[: len(data) // 2])
        os._exit(17)
    if step == "copying":
        codebook.os.link, codebook.shutil.copyfile = no_link, half_copy
    elif step == "linking":
        codebook.os.link = die
    elif step == "renaming into place":
        codebook.os.replace = die
    elif step == "fsyncing the pool directory":
        codebook.fsync_path = die
    digest = codebook.sha256_file(src)
    cb = Codebook.at(book)
    cb.add_to_pool(src, digest)
    entry = {"dataset": "d", "shard": "s", "candidates": digest, "images": None, "n_candidates": 3, "n_images": None}
    prov = pa.table({"key": list("xyz"), "shard": ["s"] * 3, "token_index": [0, 1, 2], "cluster": [0] * 3,
                     "support": [1] * 3, "cluster_size": [1] * 3}).cast(PROVENANCE_SCHEMA)
    cb.commit(np.full((3, 4), 2.0, np.float32), prov, {"note": "v2"}, parent=1, pool=[entry])
""")


@pytest.mark.parametrize("step", ["linking", "copying", "renaming into place", "fsyncing the pool directory"])
def test_pool_write_killed_at_each_step_leaves_no_partial_pool_file(tmp_path, step):
    from vrc_dist.codebook.format import sha256_file

    book, src = tmp_path / "cb", tmp_path / "candidates.parquet"
    Codebook.create(book, "t", "m", 4).commit(np.ones((3, 4), np.float32), _prov(), {"note": "v1"})
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(1000)]}), src)

    def child(step):
        return subprocess.run([sys.executable, "-c", POOL_CHILD, str(book), str(src), step], env=child_env(),
                              capture_output=True, text=True, timeout=300)

    proc = child(step)
    assert proc.returncode == 17, f"the pool write did not die at {step}: rc {proc.returncode} {proc.stderr[-2000:]}"
    pooled = [f for f in (book / "pool").iterdir() if not f.name.endswith(".tmp")]
    assert [f.name for f in pooled] == ([f"{sha256_file(src)}.parquet"] if step == "fsyncing the pool directory" else [])
    assert all(sha256_file(f) == f.name.removesuffix(".parquet") for f in pooled)  # whole, or not under its name
    assert Codebook.at(book).versions() == [1]
    assert doctor_errors(book) == [], "the doctor calls a crash-consistent state broken"
    # The next writer carries on, reusing a pool file that made it into place.
    proc = child("none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    latest = Codebook.open(book)
    assert latest.version == 2 and latest.pool_file(sha256_file(src), "v0002").read_bytes() == src.read_bytes()
    assert doctor_errors(book) == []


# ---- disk full ----------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_loses_no_finished_shard_and_leaves_no_debris(tmp_path, small_disk):
    big_dim = 2048  # 2 candidates x 2048 x fp16 = 8 KiB per image: 400 images cannot fit in 1 MiB
    small = raw_tar(tmp_path / "small.tar", [(f"a{i}.png", png()) for i in range(4)])
    big = raw_tar(tmp_path / "big.tar", [(f"b{i:03d}.png", png()) for i in range(400)])
    out = small_disk / "out"
    prober = FakeProber(dim=big_dim)
    run_local([small], out, prober)
    with pytest.raises(OSError) as e:
        run_local([big], out, prober)
    assert e.value.errno == errno.ENOSPC or "No space left" in str(e.value), repr(e.value)

    from vrc_dist.build.manifest import Manifest
    from vrc_dist.build.read import read_table

    manifest = Manifest.load(out)
    assert manifest.done() == ["small"] and "big" not in manifest.shards
    assert read_table(out, "images").num_rows == 4  # the finished shard is whole and readable
    debris = sorted(str(p.relative_to(out)) for p in out.rglob(".*.tmp"))
    assert debris == [], f"temporary files left on the full disk: {debris}"
    assert doctor_errors(out) == []

    # With space again, the same run resumes: the full shard is done, nothing twice.
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    import shutil

    shutil.copytree(out, bigger / "out")
    run_local([big], bigger / "out", prober)
    m = Manifest.load(bigger / "out")
    assert m.done() == ["big", "small"] and read_table(bigger / "out", "images").num_rows == 404
    assert doctor_errors(bigger / "out") == []


def test_manifest_write_on_a_full_disk_keeps_the_old_manifest(small_disk):
    from vrc_dist.build.manifest import Manifest

    out = small_disk / "out"
    m = Manifest.create(out, {"probe": {}})
    m.save()
    with open(small_disk / "filler", "wb", buffering=0) as f:  # fill the disk to the last block
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    m.data["shards"]["x"] = {"status": "done", "payload": "y" * 20000, "id": uuid.uuid4().hex}
    with pytest.raises(OSError):
        m.save()
    assert Manifest.load(out).shards == {}  # the previous manifest, whole
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    Path(small_disk / "filler").unlink()


def test_shard_writer_that_cannot_start_on_a_full_disk_leaves_nothing(small_disk):
    from vrc_dist.build.writer import ShardWriter

    out = small_disk / "out"
    for t in ("tokens", "images", "candidates"):
        (out / t).mkdir(parents=True)
    with open(small_disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    with pytest.raises(OSError):
        ShardWriter(out, "s", dim=4)
    left = sorted(str(p.relative_to(out)) for p in out.rglob(".*.tmp"))
    assert left == [], f"temporary files left by a writer that never started: {left}"


def test_fault_switch_fires_once_per_marker(tmp_path, monkeypatch):
    import importlib.util

    from rel_helpers import INJECT

    spec = importlib.util.spec_from_file_location("vrc_inject", INJECT / "sitecustomize.py")
    inject = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inject)  # no VRC_FAULT_* set here: nothing is hooked
    exits = []
    monkeypatch.setattr("os._exit", exits.append)
    switch = inject.FaultSwitch.from_env({"VRC_FAULT_EXIT_AFTER": "2", "VRC_FAULT_MARKER": str(tmp_path / "m")})
    for n in (1, 2, 2, 3):
        switch.maybe_fire(n)
    assert exits == [1] and (tmp_path / "m").exists()
    assert inject.FaultSwitch.from_env({}) == inject.FaultSwitch()

"""Extend (issue 5 item 4, issue 12 item 4): only images the parent version has not seen are probed, the
extended version equals a from-scratch build on all the data (same seed), and the codebook directory alone
(its candidate pool inside) is enough to extend it.

The fast tests cover key skipping inside a shard, the parent's probe settings being enforced, and the refusals
that come before any model runs. The Ray test builds v1 on shards A with jobs/build_codebook.py, copies the
codebook with `cp -r`, deletes A's metrics dataset, extends the copy with A+B through jobs/extend_codebook.py
(the code of `vrc extend`) on a real loopback head (2 actors, a tiny random LLaVA, loose thresholds so
candidates appear) and compares v2 with a fresh build of A+B in another codebook.
"""
import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from vrc_dist.build.arguments import prepare_extend
from vrc_dist.build.extend import ExtendError, extend_config, known_images, open_parent, run_extend
from vrc_dist.build.manifest import Manifest
from vrc_dist.build.read import read_table
from vrc_dist.build.schema import TOKEN_FIELDS, table_path
from vrc_dist.build.work import process_shard
from vrc_dist.codebook.clustering import build_version
from vrc_dist.codebook.format import CHECKSUMS, VERSION_FILES, sha256_file
from vrc_dist.codebook.store import Codebook
from vrc_dist.config import ClusterConfig, ProbeConfig, to_dict
from vrc_dist.data.shards import ShardSpec, iter_samples
from vrc_dist.toy.write_shards import make_shards

REPO = Path(__file__).resolve().parents[1]
DIM = 4


def write_tar(path: Path, samples) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write({"__key__": s.key, "png": s.image, "json": json.dumps(s.meta).encode()})
    return path


# --- fast: no Ray, no model ------------------------------------------------------------------------------


class FakeProber:
    """One token per image, a candidate with the image's number as its vector; records what it probed."""

    model_info = {"embed_dim": DIM}

    def __init__(self):
        self.probed = []

    def probe(self, image, key):
        self.probed.append(key)
        tokens = {name: np.zeros(1, dtype=typ.to_pandas_dtype()) for name, typ in TOKEN_FIELDS}
        vector = np.full((1, DIM), len(self.probed), np.float16)
        return SimpleNamespace(key=key, grid=(1, 1), answer="x", answer_token_id=1, tokens=tokens,
                               candidate_index=np.zeros(1, np.int32), candidate_vectors=vector)


@pytest.fixture(scope="module")
def toy_shard(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), shards=1, per_shard=4, seed=3)[0]


def test_process_shard_skips_known_keys(toy_shard, tmp_path):
    keys = [s.key for s in iter_samples(str(toy_shard))]
    prober = FakeProber()
    spec = ShardSpec(str(toy_shard), "s")
    entry = process_shard(prober, spec, tmp_path, skip_keys=frozenset(keys[1:3]) | {"elsewhere"})
    assert prober.probed == [keys[0], keys[3]]
    assert entry["images_skipped"] == 2 and entry["images_ok"] == 2
    assert pq.read_table(tmp_path / "images" / "s.parquet").column("key").to_pylist() == [keys[0], keys[3]]
    plain = process_shard(FakeProber(), spec, tmp_path / "plain")  # no skip set: the entry is as before
    assert "images_skipped" not in plain and plain["images_ok"] == 4


def metrics_dataset(root: Path, shard: Path, name: str) -> Path:
    """A metric dataset (manifest + tables) of one shard, made by the fake prober."""
    manifest = Manifest.create(root, {"probe": {}})
    manifest.data["model_info"] = {"model_id": "m", "embed_dim": DIM}
    entry = process_shard(FakeProber(), ShardSpec(str(shard), name), root)
    manifest.record_shard(name, {**entry, "attempts": 1})
    return root


@pytest.fixture
def parent(toy_shard, tmp_path):
    """v1 of a codebook over one dataset of `toy_shard`, recorded as probed with model `m`."""
    data = metrics_dataset(tmp_path / "a", toy_shard, "a")
    probe = to_dict(ProbeConfig(model="m", jsd_thres=5.0))
    build_version(tmp_path / "cb", [data], ClusterConfig(k=2, n_clusters=2, min_images=0), model_id="m", probe=probe)
    return open_parent(tmp_path / "cb")


def test_extend_config_takes_the_parents_probe_and_refuses_changes(parent, tmp_path):
    cfg = extend_config(parent, None, ["probe.token_budget=128", "actors=3"], model="m", shards=["x.tar"],
                        out=str(tmp_path / "o"))
    assert cfg.probe.jsd_thres == 5.0 and cfg.probe.model == "m" and cfg.probe.token_budget == 128
    assert cfg.actors == 3 and cfg.cluster.n_clusters == 2 and cfg.codebook == str(parent.path)
    with pytest.raises(ExtendError, match=r"probe.jsd_thres: 5.0 -> 0.1"):
        extend_config(parent, None, ["probe.jsd_thres=0.1"])
    with pytest.raises(ExtendError, match=r"probe.model: 'm' -> 'other'"):
        extend_config(parent, None, [], model="other")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("probe:\n  divergence: jsd\n")
    with pytest.raises(ExtendError, match="probe.divergence"):
        extend_config(parent, str(cfg_file))
    assert extend_config(parent, None, ["cluster.n_clusters=3"]).cluster.n_clusters == 3  # allowed, warned


def test_known_images_come_from_the_pool_alone(parent, toy_shard, tmp_path):
    pool = parent.params["pool"]
    images = tmp_path / "a" / "images" / "a.parquet"
    assert [(e["dataset"], e["shard"], e["images"], e["n_images"]) for e in pool] == [("a", "a", sha256_file(images), 4)]
    subprocess.run(["cp", "-r", str(parent.path), str(tmp_path / "copy")], check=True)
    shutil.rmtree(tmp_path / "a")
    assert known_images(open_parent(tmp_path / "copy")) == {s.key for s in iter_samples(str(toy_shard))}


def test_refusals_before_probing(parent, toy_shard, tmp_path):
    cfg = extend_config(parent, None, [], shards=[str(toy_shard)], out=str(tmp_path / "a"))
    with pytest.raises(ExtendError, match=r"--out .*/a: shard a of dataset a holds the images of shard a of "
                                          r"dataset a, already in v0001's pool .*give a new --out"):
        run_extend(cfg, parent)
    assert Manifest.load(tmp_path / "a").shards.keys() == {"a"}  # nothing was run
    bare = Codebook.at(parent.path)
    bare.commit(parent.vectors, parent.provenance, {"probe": None}, parent=1)
    with pytest.raises(ExtendError, match="records no probe settings"):
        open_parent(parent.path)


def test_an_unusable_out_is_refused_before_ray(parent, tmp_path):
    (tmp_path / "file").write_text("")
    for out, error in ((tmp_path / "file" / "run", "is a file, not a directory"),
                       (parent.path, "a directory of their own")):
        args = argparse.Namespace(codebook=str(parent.path), parent=None, config=None, set=[], model=None,
                                  shards=["x.tar"], out=str(out), actors=None)
        with pytest.raises(ValueError, match=error):
            prepare_extend(args)


def test_a_version_without_a_pool_is_refused(parent):
    """A version of the format before the pool (params with `datasets` paths) cannot be extended."""
    vdir = parent.path / "v0001"
    params = json.loads((vdir / "params.json").read_text())
    params["datasets"] = [{"path": "/elsewhere/run", "candidates": {}}]
    del params["pool"]
    for f in (vdir / "params.json", vdir / CHECKSUMS):
        os.chmod(f, 0o644)
    (vdir / "params.json").write_text(json.dumps(params))
    (vdir / CHECKSUMS).write_text("".join(f"{sha256_file(vdir / f)}  {f}\n" for f in VERSION_FILES))
    with pytest.raises(ExtendError, match="v0001 of .* predates the codebook format vrc-codebook/2 .*rebuild it"):
        open_parent(parent.path)


# --- Ray: jobs/build_codebook.py then jobs/extend_codebook.py ------------------------------------------


SETTINGS = ["--set", "probe.jsd_thres=10", "--set", "probe.top1_thres=1.1",
            "--set", "cluster.k=3", "--set", "cluster.n_clusters=4", "--set", "cluster.min_images=1"]


@pytest.fixture(scope="module")
def head():
    from ray_head import LocalHead

    h = LocalHead(num_cpus=2)
    yield h
    h.stop()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_extend_probes_only_new_images_and_equals_a_fresh_build(head, tmp_path):
    from tiny_models import save

    model = str(save("llava", tmp_path / "model"))
    gen = make_shards(tmp_path / "gen", shards=4, per_shard=2, seed=7)
    a, b, scratch = tmp_path / "A", tmp_path / "B", tmp_path / "scratch"
    for d in (a, b):
        d.mkdir()
    for s in gen[:2]:
        shutil.copy(s, a / s.name)
    shutil.copy(gen[2], b / gen[2].name)
    old = next(iter_samples(str(gen[0])))
    new = list(iter_samples(str(gen[3])))
    write_tar(b / "mix.tar", [old, *new])  # one of A's images beside two new ones
    write_tar(scratch / "mix.tar", new)  # the same shard name, without A's image

    def job(script, *args):
        entry = ["python", f"jobs/{script}", "--actors", "2", *args]
        r = head.submit(entry, str(REPO))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r

    job("build_codebook.py", "--model", model, "--shards", str(a / "*.tar"), "--out", str(tmp_path / "mA"),
        "--codebook", str(tmp_path / "cb"), *SETTINGS)
    subprocess.run(["cp", "-r", str(tmp_path / "cb"), str(tmp_path / "copy")], check=True)
    shutil.rmtree(tmp_path / "mA")  # the copy must carry its candidate pool
    r = job("extend_codebook.py", "--codebook", str(tmp_path / "copy"), "--shards", str(a / "*.tar"),
            "--shards", str(b / "*.tar"), "--out", str(tmp_path / "mB"))
    job("build_codebook.py", "--model", model, "--shards", str(a / "*.tar"), "--shards", str(gen[2]),
        "--shards", str(scratch / "mix.tar"), "--out", str(tmp_path / "mAB"), "--codebook",
        str(tmp_path / "fresh"), *SETTINGS)

    counts = Manifest.load(tmp_path / "mB").data["extend"]
    assert counts["images_probed"] == 4  # |B|: gen[2]'s two images and mix's two new ones
    assert counts["images_skipped"] == 5  # A's four, given again, and A's image inside mix.tar
    assert counts["parent"] == 1 and counts["version"] == 2 and "4 images probed" in r.stdout
    assert sorted(read_table(tmp_path / "mB", "images").column("key").to_pylist()) == sorted(
        [s.key for s in iter_samples(str(gen[2]))] + [s.key for s in new])

    extended, fresh = Codebook.open(tmp_path / "copy"), Codebook.open(tmp_path / "fresh")
    assert extended.version == 2 and extended.params["parent"] == 1 and len(extended.vectors) > 0
    np.testing.assert_array_equal(extended.vectors, fresh.vectors)
    assert extended.provenance.equals(fresh.provenance)
    assert extended.params["clustering"] == fresh.params["clustering"]
    # A's shards, given again, gave no images and so no pool entries
    assert [(e["dataset"], e["shard"]) for e in extended.params["pool"]] == [
        ("mA", "train-00000"), ("mA", "train-00001"), ("mB", "mix"), ("mB", "train-00002")]
    assert extended.params["pool"][3]["candidates"] == sha256_file(table_path(tmp_path / "mB", "candidates",
                                                                              "train-00002"))
    assert "/" not in json.dumps(extended.params["pool"]) and "/" not in json.dumps(fresh.params["pool"])


def test_run_metrics_runs_under_the_local_executor_without_ray(toy_shard, tmp_path):
    from vrc_dist.build.executor import LocalExecutor
    from vrc_dist.build.pipeline import run_metrics
    from vrc_dist.config import BuildConfig

    cfg = BuildConfig(shards=[str(toy_shard)], out=str(tmp_path / "out"))
    prober = FakeProber()
    summary = run_metrics(cfg, executor=LocalExecutor(cfg, prober))
    assert (summary["shards_done"], summary["images_ok"], summary["tokens"]) == (1, 4, 4)
    assert Manifest.load(cfg.out).shards[toy_shard.stem]["attempts"] == 1
    assert read_table(cfg.out, "candidates").num_rows == 4
    again = run_metrics(cfg, executor=LocalExecutor(cfg, prober))  # resumed: the done shard is not run again
    assert (again["shards_skipped"], again["shards_done"], len(prober.probed)) == (1, 0, 4)

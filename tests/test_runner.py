"""The Ray build end to end: a real loopback Ray head, `ray job submit`, 2 probe actors, toy shards.

Checks issue 4's promises: every image exactly once, metrics equal to a single-process probe run,
an actor killed mid-shard costs nothing, a stopped job resumes with only unfinished shards, bad
input is recorded and the job fails only when nothing could be processed.
The model is a tiny random LLaVA (plumbing, not quality); loose thresholds make candidates appear.
"""
import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from vrc_dist.build.manifest import Manifest
from vrc_dist.build.read import read_table
from vrc_dist.build.schema import TABLES, table_path
from vrc_dist.config import ProbeConfig
from vrc_dist.data.images import load_image
from vrc_dist.data.shards import iter_samples
from vrc_dist.toy.write_shards import make_shards

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]
INJECT = str(REPO / "tests" / "reliability" / "inject")  # VRC_FAULT_*: test-only fault injection
THRESHOLDS = ["--set", "probe.jsd_thres=10", "--set", "probe.top1_thres=1.1"]
SORT = {"tokens": ["shard", "key", "token_index"], "images": ["shard", "key"], "candidates": ["shard", "key", "token_index"]}


@pytest.fixture(scope="module")
def head():
    from ray_head import LocalHead

    h = LocalHead(num_cpus=2)
    yield h
    h.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny_models import save

    root = tmp_path_factory.mktemp("world")
    model = save("llava", root / "model")
    shards = make_shards(root / "shards", shards=4, per_shard=3, seed=7, split="train")
    return {"root": root, "model": str(model), "shards": shards, "glob": str(root / "shards" / "*.tar")}


def build(head, world, out, shards=None, env=None, wait=True, submission_id=None):
    entry = ["python", "jobs/build_codebook.py", "--model", world["model"], "--out", str(out), "--actors", "2",
             *THRESHOLDS]
    for s in shards or [world["glob"]]:
        entry += ["--shards", str(s)]
    return head.submit(entry, str(REPO), env_vars=env, wait=wait, submission_id=submission_id)


def sorted_table(out, table):
    return read_table(out, table).sort_by([(c, "ascending") for c in SORT[table]])


def assert_same_dataset(a, b):
    for t in TABLES:
        assert sorted_table(a, t).equals(sorted_table(b, t)), f"{t} differs between {a} and {b}"


@pytest.fixture(scope="module")
def clean_run(head, world):
    out = world["root"] / "clean"
    r = build(head, world, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


def test_every_image_once_and_metrics_equal_single_process(world, clean_run):
    out, r = clean_run
    assert "images/s" in r.stdout
    images = read_table(out, "images")
    expected = sorted((s.stem, smp.key) for s in world["shards"] for smp in iter_samples(str(s)))
    got = sorted(zip(images.column("shard").to_pylist(), images.column("key").to_pylist()))
    assert got == expected and len(set(got)) == len(got) == 12
    assert set(images.column("status").to_pylist()) == {"ok"}
    assert read_table(out, "candidates").num_rows > 0

    from vrc_dist.probe.prober import Prober

    torch.set_num_threads(1)  # as in a 1-CPU actor: same reduction order, so equal to the bit
    prober = Prober(ProbeConfig(model=world["model"], jsd_thres=10, top1_thres=1.1))
    tokens = sorted_table(out, "tokens")
    cand = sorted_table(out, "candidates")
    for shard in world["shards"]:
        for smp in iter_samples(str(shard)):
            ref = prober.probe(load_image(smp.image, smp.key), smp.key)
            mine = tokens.filter(pa.compute.and_(pa.compute.equal(tokens["shard"], shard.stem),
                                                 pa.compute.equal(tokens["key"], smp.key)))
            for col, values in ref.tokens.items():
                got_col = mine.column(col).to_numpy(zero_copy_only=False)
                want = np.asarray(values).astype(got_col.dtype)
                np.testing.assert_array_equal(got_col, want, err_msg=f"{shard.stem}/{smp.key} {col}")
            mc = cand.filter(pa.compute.and_(pa.compute.equal(cand["shard"], shard.stem),
                                             pa.compute.equal(cand["key"], smp.key)))
            assert mc.column("token_index").to_pylist() == ref.candidate_index.tolist()
            vec = np.asarray(mc.column("vector").to_pylist(), dtype=np.float16).reshape(ref.candidate_vectors.shape)
            np.testing.assert_array_equal(vec, ref.candidate_vectors)


def test_actor_killed_mid_shard_loses_and_duplicates_nothing(head, world, clean_run, tmp_path):
    out = tmp_path / "fault"
    env = {"PYTHONPATH": INJECT, "VRC_FAULT_EXIT_AFTER": "2", "VRC_FAULT_MARKER": str(tmp_path / "fired")}
    r = build(head, world, out, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "fired").exists(), "the fault switch never fired"
    manifest = Manifest.load(out)
    assert manifest.data["runs"][-1]["actor_deaths"] == 1
    assert sorted(e["attempts"] for e in manifest.shards.values()) == [1, 1, 1, 2]
    assert_same_dataset(out, clean_run[0])


def test_stopped_job_resumes_only_unfinished_shards(head, world, clean_run, tmp_path):
    out = tmp_path / "resume"
    # Slow images down so "mid-run" is a wide window, not a race.
    r = build(head, world, out, env={"PYTHONPATH": INJECT, "VRC_FAULT_SLEEP_S": "1.5"}, wait=False, submission_id="vrc-resume-1")
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.time() + 300
    while time.time() < deadline:
        m = Manifest.load(out) if (out / "manifest.json").exists() else None
        if m and m.done():
            break
        time.sleep(0.5)
    stop = head.ray("job", "stop", "--address", head.address, "vrc-resume-1")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    first = Manifest.load(out).done()
    assert 1 <= len(first) < 4, f"stopped too late to test resume: {first}"
    stamps = {n: table_path(out, "tokens", n).stat().st_mtime_ns for n in first}

    r = build(head, world, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = Manifest.load(out).data["runs"][-1]
    assert run["shards_skipped"] == len(first) and run["shards_done"] == 4 - len(first)
    assert stamps == {n: table_path(out, "tokens", n).stat().st_mtime_ns for n in first}  # not rewritten
    assert_same_dataset(out, clean_run[0])


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (30, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_input_is_recorded_and_only_total_failure_fails(head, world, tmp_path):
    import webdataset as wds

    bad = tmp_path / "bad"
    bad.mkdir()
    with wds.TarWriter(str(bad / "mixed.tar")) as w:
        w.write({"__key__": "good", "png": _png()})
        w.write({"__key__": "corrupt", "png": b"\x89PNG\r\n\x1a\n broken"})
        w.write({"__key__": "good2", "png": _png(), "json": b"not json"})
    (bad / "empty.tar").write_bytes(b"")
    data = world["shards"][0].read_bytes()
    (bad / "truncated.tar").write_bytes(data[: len(data) // 2])
    shards = [bad / "mixed.tar", bad / "empty.tar", bad / "truncated.tar", bad / "missing.tar"]
    out = tmp_path / "out"
    r = build(head, world, out, shards=shards)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = Manifest.load(out)
    assert m.shards["missing"]["status"] == "failed" and "cannot open" in m.shards["missing"]["error"]
    assert m.shards["empty"]["status"] == "done" and "empty" in m.shards["empty"]["error"]
    assert "corrupt" in m.shards["truncated"]["error"] and m.shards["truncated"]["images_ok"] >= 1
    rows = {r["key"]: r for r in read_table(out, "images").to_pylist() if r["shard"] == "mixed"}
    assert rows["good"]["status"] == "ok" and rows["good2"]["status"] == "ok" and rows["good2"]["warning"]
    assert rows["corrupt"]["status"] == "error" and "cannot decode" in rows["corrupt"]["error"]

    r = build(head, world, tmp_path / "nothing", shards=[bad / "empty.tar", bad / "missing.tar"])
    assert r.returncode != 0
    assert "no image could be processed" in r.stdout + r.stderr
    assert json.loads((tmp_path / "nothing" / "manifest.json").read_text())["shards"]["missing"]["status"] == "failed"


def test_a_key_in_two_shards_is_kept_once_in_the_first_shard_of_the_run(head, world, tmp_path):
    import shutil

    d = tmp_path / "dup"
    d.mkdir()
    for name, src in (("a", 0), ("b", 1), ("c", 0)):  # c holds a's three keys again
        shutil.copy(world["shards"][src], d / f"{name}.tar")
    keys = sorted(smp.key for smp in iter_samples(str(d / "a.tar")))

    def outcome(out):
        images = read_table(out, "images").to_pylist()
        ok = sorted((r["shard"], r["key"]) for r in images if r["status"] == "ok")
        dup = sorted((r["shard"], r["key"]) for r in images if r["status"] == "error" and "duplicate key" in r["error"])
        return ok, dup, {t: read_table(out, t).num_rows for t in ("tokens", "candidates")}

    out = tmp_path / "out"
    r = build(head, world, out, shards=[d / "*.tar"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "3 duplicate keys" in r.stdout
    ok, dup, rows = outcome(out)
    assert [k for s, k in ok if s != "b"] == [k for s, k in ok if s == "a"] == keys  # a keeps them
    assert dup == [("c", k) for k in keys]
    tokens = read_table(out, "tokens")
    assert sorted(set(zip(tokens["shard"].to_pylist(), tokens["key"].to_pylist()))) == ok  # no doubled rows
    m = Manifest.load(out)
    assert (m.shards["c"]["images_ok"], m.shards["c"]["images_duplicate"], m.shards["c"]["tokens"]) == (0, 3, 0)
    assert m.data["runs"][-1]["images_duplicate"] == 3

    r = build(head, world, out, shards=[d / "*.tar"])  # resumed: nothing to run, nothing changes
    assert r.returncode == 0 and outcome(out) == (ok, dup, rows), r.stdout[-3000:] + r.stderr[-3000:]

    out2 = tmp_path / "out2"  # the order of the run decides, not the names
    r = build(head, world, out2, shards=[d / "c.tar", d / "a.tar"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert outcome(out2)[1] == [("a", k) for k in keys]

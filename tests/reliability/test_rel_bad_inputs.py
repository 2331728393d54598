"""Bad inputs, one kind per case, each with a defined outcome (issue 7).

Outcomes: `error` = the sample is recorded in the images table with status error and a reason that
names it; `ok` = probed after a documented conversion (the prober got an RGB image); `warn` = probed,
with the problem in the images table's warning column; `shard` = the shard-level outcome in the
manifest. The shard cases run the real reader, image loader and Parquet writer (process_shard) with a
fake prober, so they need no model; one slow case runs the same shard through a real tiny LLaVA.
After every case the output passes `vrc doctor` and nothing exists outside the output directory.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fakes import DIM, FakeProber
from PIL import Image
from rel_helpers import doctor_errors, encode, png, raw_tar, run_local

from vrc_dist.build.read import read_table


def _img(mode, size=(24, 16), color=None):
    return Image.new(mode, size, color if color is not None else 0)


def _palette_transparent():
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return encode(img, transparency=1)


def _sixteen_bit():
    return encode(Image.fromarray(np.full((16, 16), 40000, np.uint16)))


def _animated_gif():
    frames = [Image.new("P", (16, 16), i) for i in range(3)]
    import io

    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _truncated_png():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    return data[: len(data) // 2]


def _bomb_png():
    # 8000 x 8000 = 64 MP, over MAX_PIXELS; a few KB on disk. Refused from the header, never decoded.
    return encode(Image.new("1", (8000, 8000)))


# kind -> (members of ONE sample besides its key, expected outcome, substring of the recorded reason)
SAMPLES = {
    "zero-byte image": ({"png": b""}, "error", "cannot decode"),
    "undecodable image (random bytes)": ({"png": os.urandom(512)}, "error", "cannot decode"),
    "truncated PNG": ({"png": _truncated_png()}, "error", "cannot decode"),
    "image is 1x1": ({"png": png((1, 1))}, "error", "need at least 2"),
    "decompression bomb (64 MP header)": ({"png": _bomb_png()}, "error", "MP"),
    "aspect ratio 1:500": ({"png": png((2, 1000))}, "error", "aspect ratio"),
    "aspect ratio 1:100 (allowed extreme)": ({"png": png((3, 300))}, "ok", None),
    "large 4000x3000": ({"jpg": encode(Image.new("RGB", (4000, 3000), (9, 9, 9)), "JPEG")}, "ok", None),
    "16-bit grayscale": ({"png": _sixteen_bit()}, "ok", None),
    "CMYK JPEG": ({"jpg": encode(_img("CMYK", color=(0, 255, 0, 0)), "JPEG")}, "ok", None),
    "palette with transparency": ({"png": _palette_transparent()}, "ok", None),
    "RGBA with alpha": ({"png": encode(_img("RGBA", color=(255, 0, 0, 0)))}, "ok", None),
    "LA (gray + alpha)": ({"png": encode(_img("LA", color=(9, 128)))}, "ok", None),
    "animated GIF": ({"gif": _animated_gif()}, "ok", None),
    "float TIFF": ({"tif": encode(Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF")}, "ok", None),
    "sidecar JSON not JSON": ({"png": png(), "json": b"{not json"}, "warn", "not valid JSON"),
    "sidecar JSON not UTF-8": ({"png": png(), "json": b"\xff\xfe\x00garbage"}, "warn", "not valid JSON"),
    "no image member": ({"json": b"{}", "txt": b"hello"}, "error", "no image member"),
    "image extension with text inside": ({"jpg": b"<html>not an image</html>"}, "error", "cannot decode"),
}


@pytest.mark.parametrize("kind", SAMPLES)
def test_bad_sample_has_its_defined_outcome(kind, sandbox):
    members, outcome, reason = SAMPLES[kind]
    shard = sandbox / "in" / "s.tar"
    raw_tar(shard, [("before.png", png())] + [(f"victim.{ext}", data) for ext, data in members.items()]
            + [("after.png", png())])
    prober = FakeProber()
    entry = run_local([shard], sandbox / "out", prober)["s"]
    assert entry["status"] == "done" and entry["error"] is None
    rows = {r["key"]: r for r in read_table(sandbox / "out", "images").to_pylist()}
    assert rows["before"]["status"] == rows["after"]["status"] == "ok", "a bad sample cost its neighbours"
    row = rows["victim"]
    if outcome == "error":
        assert row["status"] == "error" and reason in row["error"], row
        if "member" not in reason:  # the loader's message names the member; the row's key names it anyway
            assert "victim" in row["error"], f"the reason does not name the input: {row['error']}"
    else:
        assert row["status"] == "ok", row
        got = {k: (size, mode) for k, size, mode in prober.seen}
        assert got["victim"][1] == "RGB"
        if outcome == "warn":
            assert reason in row["warning"] and "victim" in row["warning"], row
    assert doctor_errors(sandbox / "out") == []


def _tar_bytes(n=6):
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            data = png(color=(i, 0, 0))
            info = tarfile.TarInfo(f"k{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write(path, data):
    path.write_bytes(data)
    return path


# kind -> (shard file builder, expected manifest status, substring of the shard error, min images ok)
SHARDS = {
    "truncated tar": (lambda p: _write(p, _tar_bytes()[:3000]), "done", "corrupt", 1),
    "garbage file named .tar": (lambda p: _write(p, os.urandom(4096)), "done", "corrupt", 0),
    "zero-byte tar": (lambda p: _write(p, b""), "done", "empty", 0),
    "tar with no samples": (lambda p: raw_tar(p, []), "done", "empty", 0),
    "truncated gzip tar": (lambda p: _write(p, gzip.compress(_tar_bytes())[:200]), "done", "corrupt", 0),
    "missing shard": (lambda p: p, "failed", "cannot open", 0),
}


@pytest.mark.parametrize("kind", SHARDS)
def test_bad_shard_is_recorded_in_the_manifest(kind, sandbox):
    build, status, reason, min_ok = SHARDS[kind]
    suffix = ".tar.gz" if "gzip" in kind else ".tar"
    bad = build(sandbox / "in" / f"bad{suffix}")
    good = raw_tar(sandbox / "in" / "good.tar", [("g0.png", png()), ("g1.png", png())])
    shards = run_local([bad, good], sandbox / "out")
    assert shards["good"]["status"] == "done" and shards["good"]["images_ok"] == 2
    entry = shards["bad"]
    assert entry["status"] == status and reason in entry["error"] and str(bad) in entry["error"], entry
    assert entry["images_ok"] >= min_ok
    assert doctor_errors(sandbox / "out") == []


MEMBER_NAMES = {
    "path traversal ../x": ("../x.png", "path traversal"),
    "nested traversal a/../../x": ("a/../../escape.png", "path traversal"),
    "absolute member name": ("/tmp/evil.png", "absolute"),
    "backslash in name": ("a\\..\\x.png", "backslash"),
    "control character in name": ("bad\x01name.png", "control character"),
}


@pytest.mark.parametrize("kind", MEMBER_NAMES)
def test_hostile_member_name_is_refused_and_writes_nothing(kind, sandbox):
    name, reason = MEMBER_NAMES[kind]
    shard = raw_tar(sandbox / "in" / "s.tar", [("ok.png", png()), (name, png()), ("ok2.png", png())])
    run_local([shard], sandbox / "out")
    rows = read_table(sandbox / "out", "images").to_pylist()
    bad = [r for r in rows if r["status"] == "error"]
    assert len(bad) == 1 and reason in bad[0]["error"] and repr(name) in bad[0]["error"], rows
    assert sorted(r["key"] for r in rows if r["status"] == "ok") == ["ok", "ok2"]
    # the sandbox fixture asserts nothing was created outside sandbox/out


@pytest.mark.parametrize("kind,member", [
    ("symlink member", ("link.png", tarfile.SYMTYPE, "/etc/passwd")),
    ("hardlink member", ("hard.png", tarfile.LNKTYPE, "ok.png")),
    ("device member", ("dev.png", tarfile.CHRTYPE, "")),
])
def test_non_regular_member_is_refused(kind, member, sandbox):
    shard = raw_tar(sandbox / "in" / "s.tar", [("ok.png", png()), member])
    run_local([shard], sandbox / "out")
    rows = {r["key"]: r for r in read_table(sandbox / "out", "images").to_pylist()}
    key = member[0].split(".")[0]
    assert rows[key]["status"] == "error" and "not a regular file" in rows[key]["error"]
    assert rows["ok"]["status"] == "ok"


def test_oversized_member_is_refused_unread(sandbox):
    from vrc_dist.build.work import process_shard
    from vrc_dist.data.shards import ShardSpec

    shard = raw_tar(sandbox / "in" / "s.tar", [("big.png", b"\0" * 5000), ("ok.png", png())])
    entry = process_shard(FakeProber(), ShardSpec(str(shard), "s"), sandbox / "out", max_member_bytes=4096)
    assert (entry["images_ok"], entry["images_error"]) == (1, 1)
    row = pq.read_table(sandbox / "out" / "images" / "s.parquet").to_pylist()[0]
    assert "big.png" in row["error"] and "limit 4096" in row["error"]


def test_duplicate_key_within_a_shard(sandbox):
    shard = raw_tar(sandbox / "in" / "s.tar", [("a.png", png()), ("b.png", png()), ("a.jpg", png())])
    run_local([shard], sandbox / "out")
    rows = read_table(sandbox / "out", "images").to_pylist()
    assert [(r["key"], r["status"]) for r in rows] == [("a", "ok"), ("b", "ok"), ("a", "error")]
    assert "duplicate key 'a'" in rows[2]["error"]
    assert doctor_errors(sandbox / "out") == []  # one ok row per key: nothing counts twice


def test_duplicate_keys_across_shards_are_kept_flagged_and_refused_by_clustering(sandbox):
    from vrc_dist.codebook.clustering import ClusteringError, read_candidates

    s1 = raw_tar(sandbox / "in" / "s1.tar", [("same.png", png()), ("u1.png", png())])
    s2 = raw_tar(sandbox / "in" / "s2.tar", [("same.png", png()), ("u2.png", png())])
    run_local([s1, s2], sandbox / "out")
    images = read_table(sandbox / "out", "images")
    assert sorted(zip(images["shard"].to_pylist(), images["key"].to_pylist())) == [
        ("s1", "same"), ("s1", "u1"), ("s2", "same"), ("s2", "u2")]  # nothing lost, keyed by (shard, key)
    errors = doctor_errors(sandbox / "out")
    assert any("'same' in s1, s2" in e for e in errors), errors
    with pytest.raises(ClusteringError, match=r"same:\d+ appears twice: in .*s1.parquet and .*s2.parquet"):
        read_candidates([sandbox / "out"])


def test_cross_shard_duplicates_resolved_by_the_build_are_counted_from_the_files(sandbox):
    """The build's duplicate pass (build.pipeline.drop_duplicate_keys; through Ray in test_runner.py) leaves a dataset
    the doctor and clustering accept, changes nothing when run again, and repairs the counts of a manifest
    that missed a rewrite (a driver killed between the two)."""
    from vrc_dist.build.manifest import Manifest
    from vrc_dist.build.pipeline import drop_duplicate_keys
    from vrc_dist.build.writer import mark_duplicates
    from vrc_dist.codebook.clustering import read_candidates

    s1 = raw_tar(sandbox / "in" / "s1.tar", [("same.png", png()), ("u1.png", png())])
    s2 = raw_tar(sandbox / "in" / "s2.tar", [("same.png", png()), ("u2.png", png())])
    s3 = raw_tar(sandbox / "in" / "s3.tar", [("u3.png", png()), ("same.png", png())])
    out = sandbox / "out"
    run_local([s1, s2, s3], out)
    assert drop_duplicate_keys(out, Manifest.load(out), ["s2", "s1", "s3"]) == 2
    rows = {(r["shard"], r["key"]): r for r in read_table(out, "images").to_pylist()}
    assert rows[("s2", "same")]["status"] == "ok"
    for shard in ("s1", "s3"):
        assert rows[(shard, "same")]["status"] == "error" and "kept in shard s2" in rows[(shard, "same")]["error"]
    assert doctor_errors(out) == []
    read_candidates([out])  # no duplicate candidate ids left
    before = (out / "manifest.json").read_text()
    assert drop_duplicate_keys(out, Manifest.load(out), ["s2", "s1", "s3"]) == 2
    assert (out / "manifest.json").read_text() == before

    mark_duplicates(out, "s3", {"u3": "duplicate key 'u3': kept in shard s9, the earlier one in the run's shard order"})
    assert doctor_errors(out), "the doctor should see the manifest's stale counts"
    assert drop_duplicate_keys(out, Manifest.load(out), ["s2", "s1", "s3"]) == 3
    assert Manifest.load(out).shards["s3"]["images_ok"] == 0 and doctor_errors(out) == []


# ---- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data,match", [
    ({"shardz": ["a"]}, r"config: unknown key\(s\) \['shardz'\]"),
    ({"probe": {"jsd_thresh": 0.1}}, r"config.probe: unknown key\(s\) \['jsd_thresh'\]"),
    ({"actors": "two"}, r"config.actors: 'two' does not fit"),
    ({"probe": {"k_global": "16"}}, r"config.probe.k_global: expected float, got str '16'"),
    ({"overwrite": 1}, r"config.overwrite: expected bool, got int"),
    ({"probe": {"window": True}}, r"config.probe.window: expected int, got a boolean"),
    ({"cluster": [1, 2]}, r"config.cluster: expected a mapping, got list"),
], ids=["unknown key", "unknown nested key", "str for int|None", "str for float", "int for bool",
        "bool for int", "list for section"])
def test_config_errors_name_the_key(data, match):
    from vrc_dist.config import BuildConfig, ConfigError, from_dict

    with pytest.raises(ConfigError, match=match):
        from_dict(BuildConfig, data)


@pytest.mark.parametrize("name,text,match", [
    ("c.yaml", "probe: [unclosed", "not valid YAML"),
    ("c.toml", "probe = = 1", "not valid TOML"),
    ("c.yaml", "- a\n- b\n", "top level must be a mapping"),
], ids=["broken YAML", "broken TOML", "YAML list at top"])
def test_config_file_errors_name_the_file(tmp_path, name, text, match):
    from vrc_dist.config import BuildConfig, ConfigError, load

    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        load(BuildConfig, tmp_path / name)
    assert name in str(e.value)


def test_cli_reports_a_bad_config_in_one_line(tmp_path, capsys):
    from vrc_dist.cli import main

    (tmp_path / "c.yaml").write_text("probe:\n  k_globl: 3\n")
    assert main(["build", "--config", str(tmp_path / "c.yaml")]) == 2  # refused before Ray starts
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key(s) ['k_globl']" in err[0]


@pytest.mark.parametrize("args,match", [
    (["--set", "probe.k_head=0"], "config.probe.k_head: 0 must be >= 1"),
    (["--set", "probe.window=0"], "config.probe.window: 0 must be an odd number"),
    (["--set", "probe.window=4"], "config.probe.window: 4 must be an odd number"),
    (["--set", "cluster.n_clusters=0"], "config.cluster.n_clusters: 0 must be >= 1"),
    (["--set", "cluster.k=0"], "config.cluster.k: 0 must be >= 1"),
    (["--set", "cluster.min_images=-1"], "config.cluster.min_images: -1 must be >= 0"),
    (["--set", "actors=0"], "config.actors: 0 must be >= 1"),
    (["--actors", "-3"], "config.actors: -3 must be >= 1"),
    (["--set", "probe.jsd_thres=-0.1"], "config.probe.jsd_thres: -0.1 must be >= 0"),
    (["--set", "probe.top1_thres=-1e-3"], "config.probe.top1_thres: -0.001 must be >= 0"),
], ids=["k_head 0", "window 0", "window even", "n_clusters 0", "cluster.k 0", "min_images -1", "actors 0",
        "--actors -3", "negative jsd_thres", "negative top1_thres"])
def test_out_of_range_settings_are_refused_in_one_line_before_ray(args, match, tmp_path, capsys, monkeypatch):
    from vrc_dist.build import local_ray
    from vrc_dist.cli import main

    monkeypatch.setattr(local_ray, "run_on_ray", lambda run: pytest.fail("Ray was started"))
    assert main(["build", "--shards", str(tmp_path / "s.tar"), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


@pytest.mark.parametrize("case", ["--out under a regular file", "--out equal to --codebook"])
def test_unusable_output_directory_is_refused_in_one_line_before_ray(case, tmp_path, capsys, monkeypatch):
    from vrc_dist.build import local_ray
    from vrc_dist.cli import main

    (tmp_path / "file").write_text("")
    out, extra, match = {
        "--out under a regular file": (tmp_path / "file" / "out", [], "is a file, not a directory"),
        "--out equal to --codebook": (tmp_path / "same", ["--codebook", str(tmp_path / "same")], "both"),
    }[case]
    monkeypatch.setattr(local_ray, "run_on_ray", lambda run: pytest.fail("Ray was started"))
    assert main(["build", "--shards", str(tmp_path / "s.tar"), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and str(out) in err[0], err


def test_yaml_exponent_without_a_dot_is_a_float_for_float_fields_only(tmp_path):
    from vrc_dist.config import BuildConfig, ConfigError, load

    (tmp_path / "c.yaml").write_text("probe:\n  jsd_thres: 1e-3\n  top1_thres: 2.5E+1\n")
    cfg = load(BuildConfig, tmp_path / "c.yaml", ["cluster.use_gpu=false"])
    assert (cfg.probe.jsd_thres, cfg.probe.top1_thres) == (1e-3, 25.0)
    assert load(BuildConfig, None, ["probe.k_global=2e1"]).probe.k_global == 20.0
    with pytest.raises(ConfigError, match="config.probe.k_head: expected int, got str '1e2'"):
        load(BuildConfig, None, ["probe.k_head=1e2"])
    with pytest.raises(ConfigError, match="config.probe.prompt: expected str"):
        load(BuildConfig, None, ["probe.prompt=1.5"])  # a str field is not parsed as a number either way


# ---- codebook interchange, vectors ---------------------------------------------------------------------


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vrc-reliability-pwned",))


def test_pt_holding_a_pickled_object_is_refused_unexecuted(tmp_path):
    from vrc_dist.codebook.format import CodebookError
    from vrc_dist.codebook.interchange import import_reference

    marker = "/tmp/vrc-reliability-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    pt = tmp_path / "evil.pt"
    with open(pt, "wb") as f:
        pickle.dump({"vectors": Boom()}, f)
    with pytest.raises(CodebookError, match="weights_only"):
        import_reference(pt, None, tmp_path / "cb", model_id="m")
    torch.save({"not": "a tensor"}, tmp_path / "dict.pt")
    with pytest.raises(CodebookError, match="expected a 2-D float tensor"):
        import_reference(tmp_path / "dict.pt", None, tmp_path / "cb", model_id="m")
    assert not os.path.exists(marker), "the pickle's payload ran"
    assert not (tmp_path / "cb").exists()


@pytest.mark.parametrize("tensor,match", [
    (torch.ones(3), "2-D float tensor"),
    (torch.ones(3, 4, dtype=torch.int64), "2-D float tensor"),
    (torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), "NaN or inf"),
    (torch.tensor([[1.0, float("inf")], [1.0, 2.0]]), "NaN or inf"),
], ids=["1-D", "integer", "NaN", "inf"])
def test_pt_with_wrong_shape_or_values_is_refused_by_name(tmp_path, tensor, match):
    from vrc_dist.codebook.format import CodebookError
    from vrc_dist.codebook.interchange import load_reference

    torch.save(tensor, tmp_path / "c.pt")
    with pytest.raises(CodebookError, match=match) as e:
        load_reference(tmp_path / "c.pt")
    assert "c.pt" in str(e.value)


def test_reference_sidecar_not_json_or_wrong_length(tmp_path):
    from vrc_dist.codebook.format import CodebookError
    from vrc_dist.codebook.interchange import load_reference

    torch.save(torch.ones(3, 4), tmp_path / "c.pt")
    (tmp_path / "c.json").write_text("[oops")
    with pytest.raises(CodebookError, match="c.json: not a readable JSON list"):
        load_reference(tmp_path / "c.pt", tmp_path / "c.json")
    (tmp_path / "c.json").write_text(json.dumps(["a:1"]))
    with pytest.raises(CodebookError, match="expected a list of 3 sample ids"):
        load_reference(tmp_path / "c.pt", tmp_path / "c.json")


def _book(tmp_path, dim=4, n=6):
    from vrc_dist.codebook.format import PROVENANCE_SCHEMA
    from vrc_dist.codebook.store import Codebook

    cb = Codebook.create(tmp_path / "cb", "t", "m", dim)
    prov = pa.table({"key": [f"k{i}" for i in range(n)], "shard": ["s"] * n, "token_index": list(range(n)),
                     "cluster": [0] * n, "support": [1] * n, "cluster_size": [1] * n}).cast(PROVENANCE_SCHEMA)
    vectors = np.random.default_rng(0).random((n, dim)).astype(np.float32)
    cb.commit(vectors, prov, {})
    return cb, vectors, prov


def test_nan_inf_and_wrong_dims_in_codebook_commits_and_queries(tmp_path):
    from vrc_dist.codebook.format import CodebookError
    from vrc_dist.codebook.store import Codebook

    cb, vectors, prov = _book(tmp_path)
    for bad in (np.nan, np.inf, -np.inf):
        v = vectors.copy()
        v[2, 1] = bad
        with pytest.raises(CodebookError, match="NaN or inf"):
            cb.commit(v, prov, {})
    with pytest.raises(CodebookError, match=r"must be \[N, 4\]"):
        cb.commit(vectors[:, :3], prov, {})
    with pytest.raises(CodebookError, match="dim mismatch.*the model has dim 8"):
        Codebook.open(tmp_path / "cb", expected_dim=8)
    opened = Codebook.open(tmp_path / "cb")
    with pytest.raises(CodebookError, match="dim mismatch.*the query has dim 5"):
        opened.search(np.ones((2, 5), np.float32))
    with pytest.raises(CodebookError, match=r"query vectors must be \[n, D\]"):
        opened.search(np.ones(4, np.float32))
    q = np.ones((3, 4), np.float32)
    q[1, 0] = np.nan
    with pytest.raises(CodebookError, match=r"NaN or inf \(rows \[1\]\)"):
        opened.max_similarity(q)
    assert Codebook.at(tmp_path / "cb").versions() == [1]  # the refused commits left nothing


def test_codebook_vectors_swapped_for_a_pickle_are_refused(tmp_path):
    """A crafted version (checksums recomputed to match) whose vectors.npy is an object array: refused
    by np.load(allow_pickle=False), reported as a codebook error naming the file."""
    from vrc_dist.codebook.format import CHECKSUMS, VERSION_FILES, CodebookError, sha256_file
    from vrc_dist.codebook.store import Codebook

    _book(tmp_path)
    vdir = tmp_path / "cb" / "v0001"
    os.chmod(vdir / "vectors.npy", 0o644)
    np.save(vdir / "vectors.npy", np.array([Boom()], dtype=object), allow_pickle=True)
    os.chmod(vdir / CHECKSUMS, 0o644)
    (vdir / CHECKSUMS).write_text("".join(f"{sha256_file(vdir / f)}  {f}\n" for f in VERSION_FILES))
    with pytest.raises(CodebookError, match="vectors.npy: not a plain numeric array"):
        Codebook.open(tmp_path / "cb")
    assert any("vectors.npy" in e for e in doctor_errors(tmp_path / "cb"))
    assert not os.path.exists("/tmp/vrc-reliability-pwned")


def _candidates_dataset(root, shard, keys, vectors):
    from vrc_dist.build.schema import candidates_schema

    dim = vectors.shape[1]
    (root / "candidates").mkdir(parents=True, exist_ok=True)
    flat = pa.array(vectors.astype(np.float16).reshape(-1), pa.float16())
    pq.write_table(pa.table({"key": keys, "shard": [shard] * len(keys), "token_index": list(range(len(keys))),
                             "vector": pa.FixedSizeListArray.from_arrays(flat, dim)}, schema=candidates_schema(dim)),
                   root / "candidates" / f"{shard}.parquet")
    return root


def test_nan_candidates_and_mixed_dims_are_refused_by_name(tmp_path):
    from vrc_dist.codebook.clustering import ClusteringError, read_candidates

    v = np.ones((3, DIM), np.float32)
    v[1, 2] = np.inf
    bad = _candidates_dataset(tmp_path / "nan", "s0", ["a", "b", "c"], v)
    with pytest.raises(ClusteringError, match=r"s0.parquet: 1 candidate vector\(s\) with NaN or inf, the first b:1"):
        read_candidates([bad])
    a = _candidates_dataset(tmp_path / "a", "s0", ["a"], np.ones((1, 4)))
    b = _candidates_dataset(tmp_path / "b", "s1", ["b"], np.ones((1, 5)))
    with pytest.raises(ClusteringError, match="dimension 5, but .*s0.parquet has 4"):
        read_candidates([a, b])


def test_nan_vectors_from_the_prober_are_caught_by_the_doctor(sandbox):
    """A model that overflows (fp16) hands NaN candidates to the writer; the dataset is written (nothing is
    lost), `vrc doctor` names the rows, and the clustering stage refuses them by file and key."""
    from fakes import fake_result

    from vrc_dist.codebook.clustering import ClusteringError, read_candidates

    class NaNProber(FakeProber):
        def probe(self, image, key):
            v = np.ones((2, DIM), np.float16)
            v[0, 0] = np.nan
            return fake_result(key, vectors=v)

    shard = raw_tar(sandbox / "in" / "s.tar", [("a.png", png())])
    run_local([shard], sandbox / "out", NaNProber())
    assert any("NaN or inf: a:0" in e for e in doctor_errors(sandbox / "out"))
    with pytest.raises(ClusteringError, match="NaN or inf, the first a:0"):
        read_candidates([sandbox / "out"])


@pytest.mark.slow
def test_every_bad_sample_through_a_real_tiny_llava(sandbox):
    """All the sample kinds above in one shard through the real probe engine (tiny random LLaVA)."""
    from tiny_models import save

    from vrc_dist.config import ProbeConfig
    from vrc_dist.probe.prober import Prober

    torch.set_num_threads(1)
    prober = Prober(ProbeConfig(model=str(save("llava", sandbox / "out" / "model")), jsd_thres=10, top1_thres=1.1))
    members = []
    for i, (kind, (sample, _, _)) in enumerate(SAMPLES.items()):
        members += [(f"case{i:02d}.{ext}", data) for ext, data in sample.items()]
    shard = raw_tar(sandbox / "in" / "all.tar", members)
    entry = run_local([shard], sandbox / "out", prober)["all"]
    rows = {r["key"]: r for r in read_table(sandbox / "out", "images").to_pylist()}
    for i, (kind, (_, outcome, reason)) in enumerate(SAMPLES.items()):
        row = rows[f"case{i:02d}"]
        assert row["status"] == ("error" if outcome == "error" else "ok"), (kind, row)
        if outcome == "error":
            assert reason in row["error"], (kind, row)
    assert entry["images_ok"] == sum(o != "error" for _, o, _ in SAMPLES.values())
    assert doctor_errors(sandbox / "out") == []

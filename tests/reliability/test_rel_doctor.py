"""`vrc doctor`: a clean output passes; each kind of damage is found, named, and fails the exit code."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fakes import FakeProber, fake_result
from rel_helpers import png, raw_tar, run_local

from vrc_dist.build.schema import table_path
from vrc_dist.cli import main


@pytest.fixture
def run(tmp_path):
    shards = [raw_tar(tmp_path / f"s{i}.tar", [(f"s{i}k{j}.png", png()) for j in range(3)]) for i in range(2)]
    out = tmp_path / "out"
    run_local(shards, out)
    return out


def doctor(path, *flags, capsys=None):
    code = main(["doctor", str(path), *flags])
    return code, capsys.readouterr().out if capsys else ""


def rewrite(path, fn):
    t = fn(pq.read_table(path))
    pq.write_table(t, path)


def test_clean_run_is_ok(run, capsys):
    code, out = doctor(run, capsys=capsys)
    assert code == 0 and out.strip().endswith("OK"), out
    code, out = doctor(run, "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["ok"] is True and json.loads(out)["kind"] == "metrics"


DAMAGE = {
    "file of a done shard deleted": (lambda o: os.remove(table_path(o, "tokens", "s0")), "missing: the manifest lists"),
    "rows duplicated": (lambda o: rewrite(table_path(o, "tokens", "s1"), lambda t: pa.concat_tables([t, t])),
                        "appear more than once"),
    "rows lost": (lambda o: rewrite(table_path(o, "candidates", "s1"), lambda t: t.slice(1)),
                  "candidates rows, the manifest records"),
    "manifest count wrong": (lambda o: _edit_manifest(o, lambda m: m["shards"]["s0"].update(images_ok=2)),
                             "images with status ok rows, the manifest records 2"),
    "temp file left": (lambda o: (o / "images" / ".s0.parquet.abc.tmp").write_bytes(b"x"), "temporary file"),
    "format_version missing": (lambda o: _edit_manifest(o, lambda m: m.pop("format_version")), "format_version"),
    "schema changed": (lambda o: rewrite(table_path(o, "images", "s0"), lambda t: t.drop_columns(["warning"])),
                       "missing ['warning']"),
    "status not done/failed": (lambda o: _edit_manifest(o, lambda m: m["shards"]["s0"].update(status="running")),
                               "status must be done or failed"),
    "unreadable parquet": (lambda o: table_path(o, "tokens", "s0").write_bytes(b"PAR1 garbage"), "unreadable"),
    "key in two shards": (lambda o: rewrite(table_path(o, "images", "s1"), _rename_key), "probed more than once"),
}


def _rename_key(t):
    keys = t.column("key").to_pylist()
    keys[0] = "s0k0"
    return t.set_column(0, "key", pa.array(keys))


def _edit_manifest(out, fn):
    m = json.loads((out / "manifest.json").read_text())
    fn(m)
    (out / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("kind", DAMAGE)
def test_damage_is_found_and_fails(run, capsys, kind):
    damage, message = DAMAGE[kind]
    damage(run)
    code, out = doctor(run, capsys=capsys)
    assert code == 1 and message in out, out


def test_warnings_pass_unless_strict(run, tmp_path, capsys):
    shutil.copy(table_path(run, "tokens", "s0"), run / "tokens" / "stale.parquet")  # not in the manifest
    _edit_manifest(run, lambda m: m["shards"].update(
        gone={"url": "/x/gone.tar", "status": "failed", "error": "cannot open", "images_ok": 0, "images_error": 0,
              "tokens": 0, "candidates": 0}))
    code, out = doctor(run, capsys=capsys)
    assert code == 0 and "stale.parquet" in out and "shard 'gone' failed" in out and "2 warning(s)" in out
    assert doctor(run, "--strict", capsys=capsys)[0] == 1


def test_nan_candidates_found(tmp_path, capsys):
    class NaNProber(FakeProber):
        def probe(self, image, key):
            v = np.full((2, 6), np.inf, np.float16)
            return fake_result(key, vectors=v)

    run_local([raw_tar(tmp_path / "s.tar", [("a.png", png())])], tmp_path / "out", NaNProber())
    code, out = doctor(tmp_path / "out", capsys=capsys)
    assert code == 1 and "2 candidate vectors with NaN or inf: a:0, a:1" in out


def test_not_an_output(tmp_path, capsys):
    assert doctor(tmp_path, capsys=capsys)[0] == 1
    (tmp_path / "manifest.json").write_text("{}")
    code, out = doctor(tmp_path, capsys=capsys)
    assert code == 1 and "unknown format" in out


# ---- codebooks ------------------------------------------------------------------------------------------


@pytest.fixture
def book(tmp_path):
    """Two versions; v0002 lists one candidates file in the pool."""
    from vrc_dist.codebook.format import PROVENANCE_SCHEMA, sha256_file
    from vrc_dist.codebook.store import Codebook

    cb = Codebook.create(tmp_path / "cb", "t", "m", 4)
    src = tmp_path / "candidates.parquet"
    pq.write_table(pa.table({"key": list("abc")}), src)
    cb.add_to_pool(src, sha256_file(src))
    pool = [{"dataset": "d", "shard": "s", "candidates": sha256_file(src), "images": None, "n_candidates": 3,
             "n_images": None}]
    rng = np.random.default_rng(0)
    for entries in ([], pool):
        prov = pa.table({"key": list("abc"), "shard": ["s"] * 3, "token_index": [0, 1, 2], "cluster": [0] * 3,
                         "support": [1] * 3, "cluster_size": [1] * 3}).cast(PROVENANCE_SCHEMA)
        cb.commit(rng.random((3, 4)).astype(np.float32), prov, {}, pool=entries)
    return tmp_path / "cb"


def _pool_file(book):
    (f,) = (book / "pool").glob("*.parquet")
    return f


def _orphan(book):
    from vrc_dist.codebook.format import sha256_file
    from vrc_dist.codebook.store import Codebook

    src = book.parent / "added-then-crashed.parquet"
    pq.write_table(pa.table({"key": ["z"]}), src)
    Codebook.at(book).add_to_pool(src, sha256_file(src))


def _old_format(book):
    manifest = json.loads((book / "manifest.json").read_text())
    (book / "manifest.json").write_text(json.dumps({**manifest, "format": "vrc-codebook/1"}))


def _writable(p):
    os.chmod(p, 0o644)
    return p


def _resum(vdir):
    from vrc_dist.codebook.format import CHECKSUMS, VERSION_FILES, sha256_file

    _writable(vdir / CHECKSUMS).write_text("".join(f"{sha256_file(vdir / f)}  {f}\n" for f in VERSION_FILES))


def _nan_vectors(book):
    v = np.load(book / "v0002" / "vectors.npy")
    v[1, 1] = np.nan
    np.save(_writable(book / "v0002" / "vectors.npy"), v)
    _resum(book / "v0002")


def _wrong_dim(book):
    np.save(_writable(book / "v0002" / "vectors.npy"), np.ones((3, 5), np.float32))
    _resum(book / "v0002")


BOOK_DAMAGE = {
    "file tampered": (lambda b: _writable(b / "v0001" / "params.json").write_text("{}"), 1, "checksum mismatch"),
    "file deleted": (lambda b: os.remove(b / "v0002" / "index.faiss"), 1, "missing (listed in SHA256SUMS)"),
    "manifest lists a missing version": (lambda b: shutil.rmtree(b / "v0002"), 1, "lists v0002, which is not"),
    "NaN prototype (checksums redone)": (_nan_vectors, 1, "1 prototype rows with NaN or inf: rows 1"),
    "wrong dimension (checksums redone)": (_wrong_dim, 1, "shape (3, 5), expected [N, 4]"),
    "incomplete version dir": (lambda b: (b / "v0003").mkdir(), 0, "incomplete version"),
    "temp dir of a crashed commit": (lambda b: (b / ".tmp-v0003-xyz").mkdir(), 0, "interrupted commit"),
    "pool file tampered": (lambda b: _writable(_pool_file(b)).write_bytes(b"x"), 1,
                           "checksum mismatch: the pool file changed after it was added"),
    "pool file deleted": (lambda b: os.remove(_pool_file(b)), 1, "pool files missing from"),
    "orphan pool file of a crashed commit": (_orphan, 0, "in no version's pool"),
    "temp file of a crashed pool write": (lambda b: (b / "pool" / ".x.parquet.abc.tmp").write_bytes(b"half"), 0,
                                          "interrupted pool write"),
    "format before the pool": (_old_format, 1, "codebook format 'vrc-codebook/1', this code reads 'vrc-codebook/2': "
                                               "rebuild it"),
}


def test_clean_codebook_is_ok(book, capsys):
    code, out = doctor(book, capsys=capsys)
    assert code == 0 and out.strip().endswith("OK"), out


@pytest.mark.parametrize("kind", BOOK_DAMAGE)
def test_codebook_damage_is_found(book, capsys, kind):
    damage, want_code, message = BOOK_DAMAGE[kind]
    damage(book)
    code, out = doctor(book, capsys=capsys)
    assert code == want_code and message in out, out


def test_clustering_ignores_files_the_manifest_does_not_count(run):
    """A candidates file left by an interrupted or overwritten run (not done in the manifest) is not data."""
    from vrc_dist.codebook.clustering import read_candidates

    before = read_candidates([run]).ids.num_rows
    shutil.copy(table_path(run, "candidates", "s0"), run / "candidates" / "leftover.parquet")
    assert read_candidates([run]).ids.num_rows == before

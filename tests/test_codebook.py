"""The versioned codebook store: round trip, immutability, races, crashes, tampering, search, interchange."""
from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import vrc_dist
from vrc_dist.codebook import store as codebook
from vrc_dist.codebook.format import PROVENANCE_SCHEMA, CodebookError, resolve_path
from vrc_dist.codebook.interchange import export_reference, import_reference, load_reference
from vrc_dist.codebook.store import Codebook
from vrc_dist.toy import TOY_CODEBOOK_DIR

DIM = 16
# The reference's released codebooks, in shared/ beside the checkout.
REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "codebooks"


def protos(n: int, seed: int) -> tuple[np.ndarray, pa.Table]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    prov = pa.table(
        {"key": [f"img{seed}-{i // 3}" for i in range(n)], "shard": ["s0"] * n, "token_index": list(range(n)),
         "cluster": [i % 4 for i in range(n)], "support": [7] * n, "cluster_size": [n // 4] * n},
        schema=PROVENANCE_SCHEMA,
    )
    return vectors, prov


def commit(path: Path, seed: int, n: int = 12, parent: int | None = None) -> int:
    vectors, prov = protos(n, seed)
    return Codebook.at(path).commit(vectors, prov, {"note": f"seed {seed}"}, parent=parent)


@pytest.fixture
def book(tmp_path) -> Path:
    Codebook.create(tmp_path / "cb", "test", "toy-model", DIM)
    return tmp_path / "cb"


def test_commit_open_round_trip(book):
    assert commit(book, seed=1) == 1
    cb = Codebook.open(book, expected_dim=DIM)
    vectors, prov = protos(12, 1)
    assert cb.version == 1 and cb.name == "test" and cb.model_id == "toy-model"
    np.testing.assert_array_equal(cb.vectors, vectors)
    assert cb.provenance.equals(prov)
    assert cb.params["note"] == "seed 1" and cb.params["parent"] is None and cb.params["n_prototypes"] == 12
    assert cb.params["pool"] == []
    manifest = json.loads((book / "manifest.json").read_text())
    assert [v["version"] for v in manifest["versions"]] == [1] and manifest["dim"] == DIM
    assert cb.lookup([3, 0]).column("token_index").to_pylist() == [3, 0]


def test_versions_are_sequential_and_immutable(book):
    assert commit(book, seed=1) == 1
    v1_sums = (book / "v0001" / "SHA256SUMS").read_text()
    assert commit(book, seed=2, parent=1) == 2
    assert commit(book, seed=3, parent=2) == 3
    assert Codebook.at(book).versions() == [1, 2, 3]
    assert (book / "v0001" / "SHA256SUMS").read_text() == v1_sums
    assert not os.access(book / "v0001" / "vectors.npy", os.W_OK) or os.geteuid() == 0
    np.testing.assert_array_equal(Codebook.open(book, version=1).vectors, protos(12, 1)[0])
    latest = Codebook.open(book)
    assert latest.version == 3 and latest.params["parent"] == 2
    assert Codebook.open(book, version="v0002").version == 2
    with pytest.raises(CodebookError, match="parent version 9"):
        commit(book, seed=4, parent=9)
    with pytest.raises(CodebookError, match="params may not set"):
        Codebook.at(book).commit(*protos(4, 5), {"version": 1})


def test_pool_files_are_content_addressed_linked_shared_and_verified(book, tmp_path, monkeypatch):
    src = tmp_path / "cands.parquet"
    pq.write_table(pa.table({"key": ["a", "b"]}), src)
    digest = codebook.sha256_file(src)
    cb = Codebook.at(book)
    cb.add_to_pool(src, digest)
    cb.add_to_pool(src, digest)  # already there: reused
    entry = {"dataset": "d", "shard": "s", "candidates": digest, "images": None, "n_candidates": 2, "n_images": None}
    cb.commit(*protos(12, 1), {}, pool=[entry])
    cb.commit(*protos(12, 2), {}, parent=1, pool=[entry])
    pooled = book / "pool" / f"{digest}.parquet"
    assert sorted(p.name for p in (book / "pool").iterdir()) == [pooled.name]  # one file for both versions
    assert pooled.stat().st_ino == src.stat().st_ino  # hard-linked, not copied
    assert Codebook.open(book).params["pool"] == [entry] == Codebook.open(book, version=1).params["pool"]
    assert cb.pool_file(digest, "here") == pooled

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"key": ["c"]}), other)
    with pytest.raises(CodebookError, match="other.parquet changed while the version was built"):
        cb.add_to_pool(other, digest[::-1])

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(codebook.os, "link", no_link)
    cb.add_to_pool(other, codebook.sha256_file(other))
    copied = cb.pool_path(codebook.sha256_file(other))
    assert copied.read_bytes() == other.read_bytes() and copied.stat().st_ino != other.stat().st_ino
    assert not [p for p in (book / "pool").iterdir() if p.name.endswith(".tmp")]

    with pytest.raises(CodebookError, match="pool entries name files not in"):
        cb.commit(*protos(12, 3), {}, pool=[{**entry, "images": "0" * 64}])
    os.chmod(pooled, 0o644)
    pooled.write_bytes(other.read_bytes())
    with pytest.raises(CodebookError, match=f"{pooled.name}: checksum mismatch"):
        cb.pool_file(digest, "here")


def _racer(path, barrier, seed, results):
    """Commit in a child process, but hold at the rename until the other racer has also chosen its number."""
    real_rename = os.rename

    def synced_rename(src, dst):
        barrier.wait(timeout=60)
        return real_rename(src, dst)

    codebook.os.rename = synced_rename
    try:
        results.put(("ok", seed, commit(Path(path), seed=seed, parent=1)))
    except CodebookError as e:
        results.put(("error", seed, str(e)))


def _race(ctx, target, args: list[tuple]) -> list[tuple]:
    """Run target(*a, results) in one process per args tuple; their sorted outcomes. Spawned, not forked:
    forking after OpenMP (faiss) has run can deadlock the child."""
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, results)) for a in args]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return outcomes


def test_racing_writers_exactly_one_wins(book):
    commit(book, seed=1)
    ctx = mp.get_context("spawn")
    outcomes = _race(ctx, _racer, [(str(book), barrier, s) for barrier in [ctx.Barrier(2)] for s in (10, 20)])
    assert [o[0] for o in outcomes] == ["error", "ok"], outcomes
    (_, loser, message), (_, winner, version) = outcomes
    assert version == 2 and "v0002" in message and "another writer" in message
    cb = Codebook.open(book)
    assert cb.version == 2 and cb.params["note"] == f"seed {winner}"
    assert not [p for p in book.iterdir() if p.name.startswith(".tmp")]  # the loser cleaned up


def _stale_racer(path, seed, results):
    try:
        cb = Codebook.at(path)
        results.put(("ok", cb.commit(*protos(12, seed), {"note": f"seed {seed}"}, parent=1, latest=1)))
    except CodebookError as e:
        results.put(("error", str(e)))


def test_writers_started_on_one_version_cannot_fork_the_lineage(book):
    """Two runs that both started from v0001: however their commits interleave, exactly one lands."""
    commit(book, seed=1)
    outcomes = _race(mp.get_context("spawn"), _stale_racer, [(str(book), s) for s in (10, 20)])
    assert [o[0] for o in outcomes] == ["error", "ok"], outcomes
    assert outcomes[1][1] == 2 and "v0002" in outcomes[0][1]
    cb = Codebook.at(book)
    assert cb.versions() == [1, 2] and [cb.version_params(v)["parent"] for v in (1, 2)] == [None, 1]


def _commit_crashing_at(path, step):
    """A writer killed (os._exit: no cleanup, no finally) at one step of the commit."""
    die = lambda *args, **kwargs: os._exit(17)  # noqa: E731
    if step == "writing files":
        codebook.faiss.write_index = die
    elif step == "publishing the version":
        codebook.os.rename = die
    elif step == "updating the manifest":
        codebook.os.replace = die
    commit(Path(path), seed=2, parent=1)


@pytest.mark.parametrize("step", ["writing files", "publishing the version", "updating the manifest"])
def test_crash_mid_commit_leaves_previous_versions_loadable(book, step):
    commit(book, seed=1)
    proc = mp.get_context("spawn").Process(target=_commit_crashing_at, args=(str(book), step))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 17, "the writer did not crash where intended"
    published = step == "updating the manifest"  # the rename happened: v0002 is complete, the manifest stale
    assert Codebook.at(book).versions() == ([1, 2] if published else [1])
    np.testing.assert_array_equal(Codebook.open(book, version=1).vectors, protos(12, 1)[0])
    assert Codebook.open(book).version == (2 if published else 1)
    # The next writer carries on, and its manifest rewrite repairs any stale entry.
    nxt = commit(book, seed=3)
    assert nxt == (3 if published else 2)
    manifest = json.loads((book / "manifest.json").read_text())
    assert [v["version"] for v in manifest["versions"]] == list(range(1, nxt + 1))


def test_incomplete_version_dir_is_skipped_not_reused(book):
    commit(book, seed=1)
    (book / "v0002").mkdir()  # e.g. a partial copy: no SHA256SUMS
    (book / "v0002" / "vectors.npy").write_bytes(b"partial")
    assert Codebook.open(book).version == 1
    assert commit(book, seed=2) == 3
    assert Codebook.at(book).versions() == [1, 3]


@pytest.mark.parametrize("name", ["vectors.npy", "provenance.parquet", "index.faiss", "params.json"])
def test_tampered_file_is_named(book, name):
    commit(book, seed=1)
    f = book / "v0001" / name
    os.chmod(f, 0o644)
    data = bytearray(f.read_bytes())
    data[-2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CodebookError, match=f"{name}: checksum mismatch"):
        Codebook.open(book)


def test_deleted_file_is_named(book):
    commit(book, seed=1)
    (book / "v0001" / "index.faiss").unlink()
    with pytest.raises(CodebookError, match="index.faiss: missing"):
        Codebook.open(book)


def test_dimension_mismatch(book):
    commit(book, seed=1)
    with pytest.raises(CodebookError, match=f"dim {DIM}.*dim 4096"):
        Codebook.open(book, expected_dim=4096)
    cb = Codebook.open(book)
    with pytest.raises(CodebookError, match="dim mismatch"):
        cb.search(np.zeros((1, DIM + 1), np.float32), 1)
    with pytest.raises(CodebookError, match=r"\[N, 16\]"):
        Codebook.at(book).commit(np.zeros((3, 8), np.float32), protos(3, 0)[1], {})


def test_missing_version_lists_available(book):
    commit(book, seed=1)
    commit(book, seed=2)
    with pytest.raises(CodebookError, match="v0007 not in codebook.*available: v0001, v0002"):
        Codebook.open(book, version=7)
    with pytest.raises(CodebookError, match="no versions yet"):
        Codebook.create(book.parent / "empty", "e", "m", DIM) and Codebook.open(book.parent / "empty")
    with pytest.raises(CodebookError, match="not a codebook"):
        Codebook.open(book.parent / "nowhere")


def test_search_is_exact_cosine_top_k(book):
    commit(book, seed=1, n=50)
    cb = Codebook.open(book)
    queries = np.random.default_rng(9).normal(size=(20, DIM)).astype(np.float32)
    sims, ids = cb.search(queries, 5)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    cos = unit(queries.astype(np.float64)) @ unit(cb.vectors.astype(np.float64)).T
    expected_ids = np.argsort(-cos, axis=1)[:, :5]
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(sims, np.take_along_axis(cos, expected_ids, axis=1), atol=1e-5)
    np.testing.assert_allclose(cb.max_similarity(queries), cos.max(axis=1), atol=1e-5)
    assert cb.search(queries, 500)[1].shape == (20, 50)  # k is capped at the number of prototypes


def test_bare_names_resolve_under_codebooks_root_and_toy_to_the_packaged_codebook(tmp_path, monkeypatch):
    monkeypatch.setenv("VRC_CODEBOOKS", str(tmp_path))
    Codebook.create(tmp_path / "mine", "mine", "toy", DIM)
    commit(tmp_path / "mine", seed=1)
    assert Codebook.open("mine").path == tmp_path / "mine"
    assert resolve_path("toy") == TOY_CODEBOOK_DIR
    assert TOY_CODEBOOK_DIR.is_relative_to(Path(vrc_dist.__file__).parent)  # package data, not the checkout


def test_export_import_round_trip(book, tmp_path):
    commit(book, seed=1)
    cb = Codebook.open(book)
    pt, js = export_reference(cb, tmp_path / "ref" / "protos")
    assert json.loads(js.read_text())[:2] == ["img1-0:0", "img1-0:1"]
    version = import_reference(pt, js, tmp_path / "imported", model_id="toy-model")
    back = Codebook.open(tmp_path / "imported", version=version, expected_dim=DIM)
    np.testing.assert_array_equal(back.vectors, cb.vectors)
    assert back.provenance.select(["key", "token_index"]).equals(cb.provenance.select(["key", "token_index"]))
    assert back.params["imported_from"] == {"pt": "protos.pt", "pt_sha256": codebook.sha256_file(pt), "dtype": "float32",
                                            "json": "protos.json", "json_sha256": codebook.sha256_file(js)}


@pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"no reference codebooks at {REFERENCE} (shared/ beside the checkout)")
@pytest.mark.parametrize("folder", ["llava15-454", "onevision-45"])
def test_reference_codebooks_round_trip_exactly(tmp_path, folder):
    """import -> export gives back the released tensor and ids; a second round changes nothing."""
    import torch

    (pt,) = (REFERENCE / folder).glob("*.pt")
    js = pt.with_suffix(".json")
    original = torch.load(pt, map_location="cpu", weights_only=True).detach()
    import_reference(pt, js, tmp_path / "one", model_id="m")
    first_cb = Codebook.open(tmp_path / "one")
    assert first_cb.params["imported_from"] == {"pt": pt.name, "pt_sha256": codebook.sha256_file(pt), "dtype": "float16",
                                                "json": js.name, "json_sha256": codebook.sha256_file(js)}
    pt1, js1 = export_reference(first_cb, tmp_path / "out1" / "cb")
    first = torch.load(pt1, weights_only=True)
    assert first.dtype == torch.float16 and first.device.type == "cpu" and not first.requires_grad
    assert torch.equal(first, original)
    assert json.loads(js1.read_text()) == json.loads(js.read_text())  # bare ids, as released

    import_reference(pt1, js1, tmp_path / "two", model_id="m")
    pt2, js2 = export_reference(Codebook.open(tmp_path / "two"), tmp_path / "out2" / "cb")
    second = torch.load(pt2, weights_only=True)
    assert js2.read_bytes() == js1.read_bytes()
    assert second.dtype == first.dtype and torch.equal(second, first)


def test_import_refuses_values_float32_cannot_hold(tmp_path):
    import torch

    torch.save(torch.full((2, DIM), 0.5, dtype=torch.float64), tmp_path / "exact.pt")
    assert load_reference(tmp_path / "exact.pt")[2] == "float64"
    torch.save(torch.full((2, DIM), 0.1, dtype=torch.float64), tmp_path / "inexact.pt")
    with pytest.raises(CodebookError, match="inexact.pt: torch.float64 values that float32 does not hold exactly"):
        load_reference(tmp_path / "inexact.pt")


def test_reference_ids_without_token_index(tmp_path):
    import torch

    torch.save(torch.ones(2, DIM, dtype=torch.float16), tmp_path / "r.pt")
    (tmp_path / "r.json").write_text('["213546", "297510"]')
    vectors, prov, dtype = load_reference(tmp_path / "r.pt", tmp_path / "r.json")
    assert vectors.dtype == np.float32 and vectors.shape == (2, DIM) and dtype == "float16"
    assert prov.column("key").to_pylist() == ["213546", "297510"]
    assert prov.column("token_index").to_pylist() == [-1, -1]
    (tmp_path / "short.json").write_text('["1"]')
    with pytest.raises(CodebookError, match="list of 2 sample ids"):
        load_reference(tmp_path / "r.pt", tmp_path / "short.json")


class _Evil:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_import_never_unpickles_objects(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    with open(tmp_path / "plain.pt", "wb") as f:
        pickle.dump(_Evil(marker), f, protocol=2)
    torch.save({"x": _Evil(marker)}, tmp_path / "zipped.pt")
    assert not marker.exists()
    for name in ("plain.pt", "zipped.pt"):
        with pytest.raises(CodebookError, match=f"{name}: not loadable as plain tensor data"):
            load_reference(tmp_path / name)
    assert not marker.exists()
    torch.save({"w": torch.zeros(2, DIM)}, tmp_path / "dict.pt")
    torch.save(torch.zeros(DIM), tmp_path / "vec.pt")
    torch.save(torch.zeros(2, DIM, dtype=torch.int64), tmp_path / "int.pt")
    for name, what in [("dict.pt", "dict"), ("vec.pt", r"tensor \(16,\)"), ("int.pt", "torch.int64")]:
        with pytest.raises(CodebookError, match=f"{name}: expected a 2-D float tensor.*{what}"):
            load_reference(tmp_path / name)


def test_cli_query_with_a_real_tiny_llava(tmp_path, capsys):
    """Prototypes = the image's own visual tokens, so each token's nearest prototype is itself (cosine 1)."""
    import tiny_models
    from PIL import Image

    from vrc_dist.cli import main
    from vrc_dist.config import ProbeConfig
    from vrc_dist.probe.prober import Prober

    model = tiny_models.save("llava", tmp_path / "tiny-llava")
    image = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(image)
    tokens, (gh, gw) = Prober(ProbeConfig(model=str(model))).visual_tokens(Image.open(image).convert("RGB"))
    n, dim = tokens.shape
    prov = pa.table({"key": ["img"] * n, "shard": ["s"] * n, "token_index": list(range(n)), "cluster": [0] * n,
                     "support": [1] * n, "cluster_size": [n] * n}, schema=PROVENANCE_SCHEMA)
    Codebook.create(tmp_path / "cb", "self", str(model), dim).commit(tokens, prov, {})
    capsys.readouterr()
    args = ["codebook", "query", "--codebook", str(tmp_path / "cb"), "--model", str(model), "--image", str(image)]
    assert main(args + ["--k", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["grid"] == [gh, gw] and len(result["tokens"]) == n == gh * gw
    for t in result["tokens"]:
        assert t["neighbours"][0]["token_index"] == t["token_index"] and len(t["neighbours"]) == 2
        assert t["redundancy"] == pytest.approx(1.0, abs=1e-5)
    assert main(args) == 0
    assert "redundancy map" in capsys.readouterr().out
    Codebook.create(tmp_path / "wide", "w", "m", dim + 1).commit(np.ones((1, dim + 1), np.float32), prov.slice(0, 1), {})
    assert main(args[:2] + ["--codebook", str(tmp_path / "wide")] + args[4:]) == 2
    assert f"has dim {dim + 1}, model {model} has dim {dim}" in capsys.readouterr().err


def test_a_lost_manifest_is_reported_and_repaired(book, capsys):
    from vrc_dist.cli import main

    commit(book, seed=1)
    commit(book, seed=2, parent=1)
    (book / "manifest.json").unlink()
    for argv in (["codebook", "list", str(book)], ["codebook", "show", "--codebook", str(book)]):
        assert main(argv) != 0
        assert f"manifest.json is missing but version directories are there; rebuild it with `vrc codebook " \
               f"repair {book}`" in capsys.readouterr().err
    assert main(["doctor", str(book)]) == 1
    assert f"rebuild it with `vrc codebook repair {book}`" in capsys.readouterr().out
    assert main(["codebook", "repair", str(book)]) == 0
    cb = Codebook.open(book)
    assert (cb.name, cb.model_id, cb.dim, cb.version) == ("test", "toy-model", DIM, 2)
    assert [e["version"] for e in json.loads((book / "manifest.json").read_text())["versions"]] == [1, 2]


def test_repair_of_versions_that_predate_the_record_needs_name_and_model(book):
    commit(book, seed=1)
    params = book / "v0001" / "params.json"
    os.chmod(params, 0o644)
    params.write_text(json.dumps({k: v for k, v in json.loads(params.read_text()).items() if k != "codebook"}))
    (book / "manifest.json").unlink()
    with pytest.raises(CodebookError, match="give --name and --model-id"):
        Codebook.repair(book)
    assert Codebook.repair(book, name="old", model_id="m0").name == "old"
    assert Codebook.at(book).model_id == "m0"

"""Global clustering stage: candidates Parquet -> prototypes -> codebook versions; extend == fresh build."""
from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vrc_dist.codebook.clustering import (
    AlreadyCommitted,
    ClusteringError,
    build_version,
    cluster_candidates,
    read_candidates,
)
from vrc_dist.codebook.format import CodebookError, StaleParent
from vrc_dist.codebook.store import Codebook
from vrc_dist.config import ClusterConfig

DIM = 8
# Four well-separated blobs: the first two in every image, the third in every fourth, the last in one image only.
CENTRES = np.random.default_rng(123).normal(size=(4, DIM)) * 10


def image_tokens(i: int, rng) -> list[tuple[int, np.ndarray]]:
    blobs = [0, 0, 1] + ([2] if i % 4 == 0 else []) + ([3, 3, 3] if i == 1 else [])
    return [(t * 7, CENTRES[b] + rng.normal(size=DIM) * 0.3) for t, b in enumerate(blobs)]


def write_dataset(root: Path, prefix: str, n_images: int, per_shard: int = 5, dim: int = DIM) -> Path:
    """A metric dataset dir with candidates/<shard>.parquet in the metrics dataset schema (vrc_dist/build/schema.py)."""
    rng = np.random.default_rng(zlib.crc32(prefix.encode()))
    (root / "candidates").mkdir(parents=True)
    for s in range(0, n_images, per_shard):
        shard = f"{prefix}-{s // per_shard:03d}"
        rows = [(f"{prefix}{i:03d}", t, v) for i in range(s, min(s + per_shard, n_images))
                for t, v in image_tokens(i, rng)]
        flat = np.concatenate([v[:dim] for _, _, v in rows]).astype(np.float16)
        table = pa.table({
            "key": [r[0] for r in rows], "shard": [shard] * len(rows),
            "token_index": pa.array([r[1] for r in rows], pa.int32()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat), dim),
        })
        pq.write_table(table, root / "candidates" / f"{shard}.parquet")
    return root


def cfg(**kw) -> ClusterConfig:
    return ClusterConfig(**{"k": 3, "n_clusters": 4, "min_images": 3, **kw})


def test_read_sorts_pool_independently_of_order(tmp_path):
    a = write_dataset(tmp_path / "a", "a", 8)
    b = write_dataset(tmp_path / "b", "b", 8)
    ab, ba = read_candidates([a, b]), read_candidates([b, a])
    assert ab.ids.equals(ba.ids)
    np.testing.assert_array_equal(ab.vectors, ba.vectors)
    keys = ab.ids.column("key").to_pylist()
    assert keys == sorted(keys) and ab.vectors.dtype == np.float32 and ab.vectors.shape[1] == DIM
    assert [(e["dataset"], e["shard"]) for e in ab.entries] == [("a", "a-000"), ("a", "a-001"), ("b", "b-000"),
                                                                ("b", "b-001")]
    assert ab.sources == {e["candidates"]: d / "candidates" / f"{e['shard']}.parquet"
                          for e, d in zip(ab.entries, [a, a, b, b])}
    assert all(e["images"] is None and e["n_images"] is None for e in ab.entries)  # no manifest: no images files


def test_read_rejects_bad_inputs(tmp_path):
    a = write_dataset(tmp_path / "a", "a", 4)
    wide = write_dataset(tmp_path / "w", "w", 4, dim=4)
    with pytest.raises(ClusteringError, match=r"w-000\.parquet: vectors have dimension 4, but .*a-000\.parquet has 8"):
        read_candidates([a, wide])
    dup = write_dataset(tmp_path / "dup", "a", 4)  # the same image keys again
    with pytest.raises(ClusteringError, match="candidate a000:0 appears twice"):
        read_candidates([a, dup])
    with pytest.raises(ClusteringError, match="listed more than once"):
        read_candidates([a, a])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClusteringError, match="no candidates/\\*.parquet"):
        read_candidates([tmp_path / "empty"])


def test_members_and_centers(tmp_path):
    pool = read_candidates([write_dataset(tmp_path / "a", "a", 16)])
    members = cluster_candidates(pool, cfg(prototype_mode="members"))
    centers = cluster_candidates(pool, cfg(prototype_mode="centers"))
    prov = members.provenance.to_pydict()
    kept = [c for c in members.stats["clusters"] if c["kept"]]
    assert {c["support"] for c in members.stats["clusters"]} == {16, 4, 1}  # the blobs, recovered
    assert len(kept) == 3 and all(c["support"] > 3 for c in kept)
    assert len(members.vectors) == sum(c["size"] for c in kept) == members.stats["n_prototypes"]
    for c in kept:  # every member of a kept cluster, with its true distinct-image support
        rows = [i for i, cl in enumerate(prov["cluster"]) if cl == c["cluster"]]
        assert len(rows) == c["size"]
        assert len({prov["key"][i] for i in rows}) == c["support"] == prov["support"][rows[0]]
    # centers: one real member per kept cluster, the one closest to the cluster mean
    assert centers.provenance.column("cluster").to_pylist() == [c["cluster"] for c in kept]
    for row, vec in zip(centers.provenance.to_pylist(), centers.vectors):
        rows = [i for i, cl in enumerate(prov["cluster"]) if cl == row["cluster"]]
        x = members.vectors[rows].astype(np.float64)
        medoid = rows[int(np.argmin(((x - x.mean(0)) ** 2).sum(1)))]
        assert (prov["key"][medoid], prov["token_index"][medoid]) == (row["key"], row["token_index"])
        np.testing.assert_array_equal(vec, members.vectors[medoid])
        assert row["cluster_size"] == len(rows)
    with pytest.raises(ClusteringError, match="no cluster has more than cluster.min_images=99"):
        cluster_candidates(pool, cfg(min_images=99))


@pytest.mark.parametrize("backend", ["exact", "flat"])
def test_extend_equals_build_from_scratch(tmp_path, backend):
    a = write_dataset(tmp_path / "a", "a", 12)
    b = write_dataset(tmp_path / "b", "b", 12, per_shard=3)
    ext = tmp_path / "extended"
    assert build_version(ext, [a], cfg(backend=backend), model_id="toy", probe={"divergence": "reference"}) == 1
    assert build_version(ext, [b], cfg(backend=backend), parent=1) == 2
    assert build_version(tmp_path / "scratch", [b, a], cfg(backend=backend), model_id="toy") == 1
    extended, scratch = Codebook.open(ext), Codebook.open(tmp_path / "scratch")
    np.testing.assert_array_equal(extended.vectors, scratch.vectors)
    assert extended.provenance.equals(scratch.provenance)
    assert extended.params["parent"] == 1 and extended.params["probe"] == {"divergence": "reference"}
    assert extended.params["pool"] == Codebook.open(ext, version=1).params["pool"] + scratch.params["pool"][:4]
    assert sum(e["n_candidates"] for e in extended.params["pool"]) == extended.params["clustering"]["n_candidates"]
    assert Codebook.open(ext, version=1).params["clustering"]["n_images"] == 12
    assert extended.params["clustering"]["n_images"] == 24


def test_extend_reads_the_pool_from_the_codebook_alone(tmp_path):
    """A copy of the codebook extends with its datasets gone; a changed or missing pool file is named."""
    a = write_dataset(tmp_path / "a", "a", 12)
    b = write_dataset(tmp_path / "b", "b", 12)
    build_version(tmp_path / "cb", [a], cfg(), model_id="toy")
    shutil.copytree(tmp_path / "cb", tmp_path / "copy")
    shutil.rmtree(a)
    assert build_version(tmp_path / "copy", [b], cfg(), parent=1) == 2
    build_version(tmp_path / "fresh", [write_dataset(tmp_path / "a", "a", 12), b], cfg(), model_id="toy")
    extended, fresh = Codebook.open(tmp_path / "copy"), Codebook.open(tmp_path / "fresh")
    np.testing.assert_array_equal(extended.vectors, fresh.vectors)
    assert extended.provenance.equals(fresh.provenance)

    first = extended.params["pool"][0]["candidates"]
    pooled = tmp_path / "cb" / "pool" / f"{first}.parquet"
    os.chmod(pooled, 0o644)
    pooled.write_bytes(pooled.read_bytes()[:-1])
    with pytest.raises(CodebookError, match=f"pool/{first}.parquet: checksum mismatch"):
        build_version(tmp_path / "cb", [b], cfg(), parent=1)
    pooled.unlink()
    with pytest.raises(CodebookError, match=f"pool/{first}.parquet: missing \\(listed in params.json of v0001\\)"):
        build_version(tmp_path / "cb", [b], cfg(), parent=1)
    with pytest.raises(ClusteringError, match="listed more than once"):
        build_version(tmp_path / "copy", [b, b], cfg(), parent=1)


def test_build_into_existing_codebook_checks_model_and_dim(tmp_path):
    a = write_dataset(tmp_path / "a", "a", 12)
    build_version(tmp_path / "cb", [a], cfg(), model_id="toy")
    with pytest.raises(CodebookError, match="is for model 'toy', not 'other'"):
        build_version(tmp_path / "cb", [a], cfg(), model_id="other")
    with pytest.raises(CodebookError, match="give the model id"):
        build_version(tmp_path / "new", [a], cfg())
    wide = write_dataset(tmp_path / "w", "w", 12, dim=4)
    with pytest.raises(CodebookError, match="dim mismatch: codebook .* has dim 8, the candidates .* has dim 4"):
        build_version(tmp_path / "cb", [wide], cfg())


def test_cli_list_show_diff_export_import(tmp_path, capsys):
    from vrc_dist.cli import main

    a = write_dataset(tmp_path / "a", "a", 12)
    b = write_dataset(tmp_path / "b", "b", 12)
    cb = str(tmp_path / "cb")
    build_version(cb, [a], cfg(), model_id="toy")
    build_version(cb, [b], cfg(prototype_mode="centers"), parent=1)
    capsys.readouterr()
    assert main(["codebook", "list", "--codebook", str(tmp_path)]) == 0
    assert "cb  model=toy  dim=8  latest=v0002  (2 versions)" in capsys.readouterr().out
    assert main(["codebook", "show", "--codebook", cb, "--version", "1"]) == 0
    out = capsys.readouterr().out
    assert "checksums verified" in out and "36 prototypes" in out and "2 of 4 clusters kept" in out
    assert main(["codebook", "diff", "--codebook", cb, "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "+ pool shard b/b-000" in out and 'cluster.prototype_mode: "members" -> "centers"' in out
    prefix = str(tmp_path / "ref")
    assert main(["codebook", "export", "--codebook", cb, "--out", prefix]) == 0
    assert main(["codebook", "import", "--codebook", str(tmp_path / "imp"), prefix + ".pt", prefix + ".json",
                 "--model-id", "toy"]) == 0
    np.testing.assert_array_equal(Codebook.open(tmp_path / "imp").vectors, Codebook.open(cb).vectors)
    capsys.readouterr()
    assert main(["codebook", "show", "--codebook", cb, "--version", "7"]) == 2
    assert "v0007 not in codebook" in capsys.readouterr().err


def test_rebuilding_the_same_inputs_commits_nothing(tmp_path):
    a = write_dataset(tmp_path / "a", "a", 12)
    probe = {"model": "toy", "k_global": 8, "device": "cpu"}
    assert build_version(tmp_path / "cb", [a], cfg(), model_id="toy", probe=probe) == 1
    with pytest.raises(AlreadyCommitted, match="v0001 already holds exactly these candidates"):
        build_version(tmp_path / "cb", [a], cfg(use_gpu=True), probe={**probe, "device": "cuda"})  # speed only
    assert Codebook.at(tmp_path / "cb").versions() == [1]
    assert build_version(tmp_path / "cb", [a], cfg(n_clusters=3), probe=probe) == 2  # other cluster settings


def test_build_with_other_probe_settings_needs_new_lineage(tmp_path):
    a = write_dataset(tmp_path / "a", "a", 12)
    build_version(tmp_path / "cb", [a], cfg(), model_id="toy", probe={"model": "toy", "k_global": 8})
    with pytest.raises(CodebookError, match=r"other probe settings \(probe.k_global: 8 -> 4\).*--new-lineage"):
        build_version(tmp_path / "cb", [a], cfg(), probe={"model": "toy", "k_global": 4})
    assert Codebook.at(tmp_path / "cb").versions() == [1]
    assert build_version(tmp_path / "cb", [a], cfg(), probe={"model": "toy", "k_global": 4}, new_lineage=True) == 2
    assert Codebook.open(tmp_path / "cb").params["new_lineage"] is True


def test_a_build_overtaken_while_clustering_is_refused(tmp_path):
    a, b = write_dataset(tmp_path / "a", "a", 12), write_dataset(tmp_path / "b", "b", 12)
    build_version(tmp_path / "cb", [a], cfg(), model_id="toy")
    build_version(tmp_path / "cb", [b], cfg(), parent=1)  # another run, committed after ours started on v0001
    with pytest.raises(StaleParent, match=r"v0001 is no longer the latest version .*\(v0002 is"):
        build_version(tmp_path / "cb", [b], cfg(), parent=1, latest=1)
    assert Codebook.at(tmp_path / "cb").versions() == [1, 2]

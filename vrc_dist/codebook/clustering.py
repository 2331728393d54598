"""Global clustering stage (docs/METHOD.md step 8): candidates of metric datasets -> a codebook version.

All candidates are sorted by (key, token_index) before clustering, so the result depends only on the set of
candidates, not on file or dataset order. That is what makes extending v1 (datasets A) with B produce exactly
the prototypes of a fresh build on A + B: both cluster the same sorted pool with the same seed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vrc_dist.arrays import nonfinite_rows
from vrc_dist.codebook.format import ANY, FORMAT, MANIFEST, PROVENANCE_SCHEMA, CodebookError, sha256_file
from vrc_dist.codebook.store import Codebook
from vrc_dist.config import ClusterConfig, recorded_probe
from vrc_dist.probe.dpc import dpc_knn

CANDIDATE_COLUMNS = ["key", "shard", "token_index", "vector"]
# Settings that change how fast a version is computed, not what it is.
PROBE_SPEED_ONLY = ("token_budget", "device")
CLUSTER_SPEED_ONLY = ("use_gpu",)


class ClusteringError(ValueError):
    pass


@dataclass
class CandidatePool:
    """Every candidate of a parent version's pool and some metric datasets, sorted by (key, token_index)."""

    ids: pa.Table  # key, shard, token_index
    vectors: np.ndarray  # float32 [N, D]
    entries: list[dict]  # the pool as recorded in a version (codebook module doc): the parent's, then the new
    sources: dict[str, Path]  # sha256 -> a new dataset's file with that content, to add to the codebook's pool


@dataclass
class Prototypes:
    vectors: np.ndarray  # float32 [P, D]
    provenance: pa.Table  # PROVENANCE_SCHEMA
    stats: dict


def _read_candidate_file(path: Path) -> tuple[pa.Table, np.ndarray]:
    try:
        table = pq.read_table(path, columns=CANDIDATE_COLUMNS)
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise ClusteringError(f"{path}: not a candidates file with columns {CANDIDATE_COLUMNS}: {e}") from None
    vtype = table.schema.field("vector").type
    if not pa.types.is_fixed_size_list(vtype) or not pa.types.is_floating(vtype.value_type):
        raise ClusteringError(f"{path}: column vector must be fixed_size_list<float16>[D], got {vtype}")
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = flat.astype(np.float32).reshape(table.num_rows, vtype.list_size)
    bad = nonfinite_rows(vectors)
    if bad.size:
        first = table.slice(int(bad[0]), 1).to_pylist()[0]
        raise ClusteringError(f"{path}: {bad.size} candidate vector(s) with NaN or inf, the first "
                              f"{first['key']}:{first['token_index']}")
    ids = table.select(["key", "shard", "token_index"]).cast(
        pa.schema([("key", pa.string()), ("shard", pa.string()), ("token_index", pa.int32())])
    )
    return ids, vectors


def read_candidates(dataset_dirs: list[str | Path], base: Codebook | None = None) -> CandidatePool:
    """Read the pool of version `base` (each file verified against its sha256) and the candidates of every
    shard of `dataset_dirs`; all must share one embedding dimension."""
    paths = [Path(d).resolve() for d in dataset_dirs]
    repeated = sorted({str(p) for p in paths if paths.count(p) > 1})
    if repeated:
        raise ClusteringError(f"dataset listed more than once: {repeated}")
    entries = list(base.params["pool"]) if base is not None else []
    parent = f"v{base.version:04d}" if base is not None else None
    files = [base.pool_file(e["candidates"], f"params.json of {parent}") for e in entries]
    sources: dict[str, Path] = {}
    for d in paths:
        new, found = dataset_entries(d)
        if not new:
            raise ClusteringError(f"no candidates/*.parquet with images in metric dataset {d}")
        check_new_images(entries, new, f"{parent}'s pool" if parent else "this build")
        entries += new
        sources |= found
        files += [found[e["candidates"]] for e in new]
    id_tables, vector_blocks = [], []
    dim, dim_source = None, None
    for i, f in enumerate(files):
        ids, vectors = _read_candidate_file(f)
        if dim is None:
            dim, dim_source = vectors.shape[1], f
        elif vectors.shape[1] != dim:
            raise ClusteringError(f"{f}: vectors have dimension {vectors.shape[1]}, but {dim_source} has {dim}")
        id_tables.append(ids.append_column("file", pa.array(np.full(ids.num_rows, i, np.int32))))
        vector_blocks.append(vectors)
    if not files or sum(map(len, vector_blocks)) == 0:
        raise ClusteringError(f"no candidates in {[str(p) for p in paths]}: nothing to cluster")
    ids = pa.concat_tables(id_tables).append_column("row", pa.array(np.arange(sum(map(len, vector_blocks)))))
    ids = ids.sort_by([("key", "ascending"), ("token_index", "ascending")])
    _check_unique(ids, files)
    order = ids.column("row").to_numpy()
    vectors = np.concatenate(vector_blocks)[order]
    return CandidatePool(ids.select(["key", "shard", "token_index"]), vectors, entries, sources)


def dataset_entries(d: Path) -> tuple[list[dict], dict[str, Path]]:
    """Pool entries of a metric dataset's shards, and the files behind their digests.

    A shard with no image (extend: every image of it was known) adds nothing and gets no entry; without a
    run manifest there are no images files, and a candidates file stands alone (`images` null)."""
    entries, files = [], {}
    for shard, cand, images in _shard_files(d):
        n_images = pq.read_metadata(images).num_rows if images else None
        n_candidates = pq.read_metadata(cand).num_rows
        if (n_images if images else n_candidates) == 0:
            continue
        entry = {"dataset": d.name, "shard": shard, "candidates": sha256_file(cand),
                 "images": sha256_file(images) if images else None,
                 "n_candidates": n_candidates, "n_images": n_images}
        files[entry["candidates"]] = cand
        if images:
            files[entry["images"]] = images
        entries.append(entry)
    return entries, files


def check_new_images(pool: list[dict], new: list[dict], where: str) -> None:
    """Refuse a shard whose images file is already in the pool: the same images probed into it again."""
    known = {e["images"]: e for e in pool if e["images"]}
    for e in new:
        if e["images"] in known:
            old = known[e["images"]]
            raise ClusteringError(f"shard {e['shard']} of dataset {e['dataset']} holds the images of shard "
                                  f"{old['shard']} of dataset {old['dataset']}, already in {where}")


def _shard_files(d: Path) -> list[tuple[str, Path, Path | None]]:
    """(shard, candidates file, images file) of the shards that count: with a run manifest, those it lists as
    done (a file left by an interrupted or overwritten run is not part of the dataset); without one, every
    candidates file, with no images file."""
    from vrc_dist.build.manifest import Manifest
    from vrc_dist.build.schema import MANIFEST, table_path

    if not (d / MANIFEST).exists():
        return [(f.stem, f, None) for f in sorted((d / "candidates").glob("*.parquet"))]
    try:
        manifest = Manifest.load(d)
    except ValueError as e:
        raise ClusteringError(str(e)) from None
    shards = [(s, table_path(d, "candidates", s), table_path(d, "images", s)) for s in manifest.done()]
    missing = [str(f) for _, *pair in shards for f in pair if not f.exists()]
    if missing:
        raise ClusteringError(f"{d / MANIFEST} lists shards as done whose files are missing: {missing[:5]}")
    return shards


def _check_unique(ids: pa.Table, files: list[Path]) -> None:
    """A token probed twice (the same image in two datasets) would count double; refuse it, naming both files."""
    if ids.num_rows < 2:
        return
    key, tok = ids.column("key"), ids.column("token_index")
    same = pc.and_(pc.equal(key[1:], key[:-1]), pc.equal(tok[1:], tok[:-1])).to_numpy(zero_copy_only=False)
    if same.any():
        i = int(np.flatnonzero(same)[0])
        f = ids.column("file")
        raise ClusteringError(f"candidate {key[i]}:{tok[i]} appears twice: in {files[f[i].as_py()]} "
                              f"and {files[f[i + 1].as_py()]}")


def cluster_candidates(pool: CandidatePool, cfg: ClusterConfig) -> Prototypes:
    """DPC-KNN over the pool; keep clusters seen in more than cfg.min_images distinct images."""
    if cfg.prototype_mode not in ("members", "centers"):
        raise ClusteringError(f"cluster.prototype_mode must be members or centers, got {cfg.prototype_mode!r}")
    n = len(pool.vectors)
    result = dpc_knn(pool.vectors, k=cfg.k, n_clusters=cfg.n_clusters, seed=cfg.seed, backend=cfg.backend,
                     use_gpu=cfg.use_gpu)
    labels, n_clusters = np.asarray(result.labels, np.int64), len(result.centers)  # fewer when N < n_clusters
    keys = pool.ids.column("key")
    # The pool is sorted by key, so image codes are a running count of key changes.
    image = np.concatenate([[0], np.cumsum(pc.not_equal(keys[1:], keys[:-1]).to_numpy(zero_copy_only=False))])
    n_images = int(image[-1]) + 1
    pairs = np.unique(labels * n_images + image)
    support = np.bincount(pairs // n_images, minlength=n_clusters)
    size = np.bincount(labels, minlength=n_clusters)
    kept = support > cfg.min_images
    clusters = [{"cluster": c, "size": int(size[c]), "support": int(support[c]), "kept": bool(kept[c])}
                for c in range(n_clusters)]
    if not kept.any():
        raise ClusteringError(f"no cluster has more than cluster.min_images={cfg.min_images} distinct images "
                              f"(largest support: {support.max()} of {n_images} images); lower min_images")

    members = np.flatnonzero(kept[labels])
    members = members[np.argsort(labels[members], kind="stable")]  # grouped by cluster, pool order within
    if cfg.prototype_mode == "members":
        chosen = members
    else:
        chosen = np.array([_medoid(pool.vectors, group) for group in
                           np.split(members, np.cumsum(size[np.flatnonzero(kept)])[:-1])])
    cl = labels[chosen]
    provenance = pool.ids.take(pa.array(chosen)).append_column("cluster", pa.array(cl, pa.int32()))
    provenance = provenance.append_column("support", pa.array(support[cl], pa.int32()))
    provenance = provenance.append_column("cluster_size", pa.array(size[cl], pa.int32())).cast(PROVENANCE_SCHEMA)
    stats = {"n_candidates": n, "n_images": n_images, "n_clusters": n_clusters,
             "n_kept_clusters": int(kept.sum()), "n_prototypes": len(chosen), "clusters": clusters}
    return Prototypes(pool.vectors[chosen], provenance, stats)


def _medoid(vectors: np.ndarray, members: np.ndarray) -> int:
    """The member closest to the cluster mean: a real token, so the prototype keeps its provenance."""
    x = vectors[members].astype(np.float64)
    return int(members[np.argmin(((x - x.mean(axis=0)) ** 2).sum(axis=1))])


class AlreadyCommitted(CodebookError):
    """The latest version already holds exactly this build's candidates and settings."""

    def __init__(self, message: str, version: int):
        super().__init__(message)
        self.version = version


def build_version(codebook_dir: str | Path, dataset_dirs: list[str | Path], cluster_cfg: ClusterConfig,
                  parent: int | None = None, model_id: str | None = None, name: str | None = None,
                  probe: dict | None = None, latest=ANY, new_lineage: bool = False) -> int:
    """Cluster the candidates of `dataset_dirs` (plus the parent version's pool) and commit the next version.

    With a parent this is *extend*: the parent's pool is read from the codebook's pool/, every file checked
    against its sha256 (a changed pool would make the new version silently different from a fresh build), and
    clustered together with the new datasets. `probe` (probe config, divergence convention) is recorded as given;
    an extension without one inherits the parent's. The codebook is created when it does not exist yet.

    `latest` is the latest version the caller started from (Codebook.commit). A build without a parent into an
    existing codebook is checked against its latest version (compare_with_latest) and, by default, must not
    have been overtaken by another commit while it clustered.
    """
    codebook_dir = Path(codebook_dir)
    base = None
    if parent is not None:
        base = Codebook.open(codebook_dir, version=parent)
        check_extendable(base)
        probe = base.params.get("probe") if probe is None else probe
    elif latest is ANY:
        latest = latest_version(codebook_dir)
    pool = read_candidates(dataset_dirs, base)
    source = f"the candidates of {[str(d) for d in dataset_dirs]}"
    if parent is None and latest not in (ANY, None) and not new_lineage:
        # An existing codebook: model and dim are checked first, and a no-op build should not cluster at all.
        existing = Codebook.open_or_create(codebook_dir, pool.vectors.shape[1], source, model_id, name)
        compare_with_latest(existing, latest, pool.entries, cluster_cfg, probe)
    protos = cluster_candidates(pool, cluster_cfg)
    store = Codebook.open_or_create(codebook_dir, pool.vectors.shape[1], source, model_id, name)
    for digest, src in pool.sources.items():
        store.add_to_pool(src, digest)
    params = {"cluster": dataclasses.asdict(cluster_cfg), "probe": probe, "clustering": protos.stats}
    if new_lineage:
        params["new_lineage"] = True
    return store.commit(protos.vectors, protos.provenance, params, parent=parent, pool=pool.entries, latest=latest)


def latest_version(codebook_dir: Path) -> int | None:
    """The latest complete version of a codebook, None when it does not exist or has none."""
    if not (codebook_dir / MANIFEST).exists():
        return None
    return (Codebook.at(codebook_dir).versions() or [None])[-1]


def compare_with_latest(store: Codebook, latest: int, entries: list[dict], cluster_cfg: ClusterConfig,
                        probe: dict | None) -> None:
    """Refuse a build whose probe settings differ from the latest version's (its candidates would silently
    replace a different kind); raise AlreadyCommitted when the latest already holds exactly this build."""
    recorded = store.version_params(latest)
    where = f"codebook {store.path} v{latest:04d}"
    if isinstance(recorded.get("probe"), dict) and probe is not None:
        changed = _changed(recorded_probe(recorded["probe"]), recorded_probe(probe), PROBE_SPEED_ONLY)
        if changed:
            detail = ", ".join(f"probe.{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise CodebookError(f"{where} was built with other probe settings ({detail}); use another --codebook, "
                                "or --new-lineage to make this build its latest version anyway")
    digests = lambda es: sorted((e["candidates"], e["images"] or "") for e in es)  # noqa: E731
    if (digests(recorded.get("pool", [])) == digests(entries) and _same_probe(recorded.get("probe"), probe)
            and not _changed(recorded.get("cluster") or {}, dataclasses.asdict(cluster_cfg), CLUSTER_SPEED_ONLY)):
        raise AlreadyCommitted(f"{where} already holds exactly these candidates and settings; nothing committed",
                               latest)


def _same_probe(recorded: dict | None, probe: dict | None) -> bool:
    if isinstance(recorded, dict) and isinstance(probe, dict):
        return not _changed(recorded_probe(recorded), recorded_probe(probe), PROBE_SPEED_ONLY)
    return recorded == probe


def _changed(recorded: dict, new: dict, ignored: tuple[str, ...]) -> dict:
    """key -> (recorded, new) for every setting that differs, except the speed-only ones."""
    return {k: (recorded.get(k), new.get(k)) for k in sorted(set(recorded) | set(new))
            if k not in ignored and recorded.get(k) != new.get(k)}


def check_extendable(base: Codebook) -> None:
    """A version extension can start from: one with a candidate pool in the codebook."""
    where = f"v{base.version:04d} of {base.path}"
    if "imported_from" in base.params:
        raise CodebookError(f"{where} was imported and has no candidate pool to extend")
    if "pool" not in base.params:
        raise CodebookError(f"{where} predates the codebook format {FORMAT} (its candidate pool lives outside "
                            "the codebook, if anywhere): rebuild it with `vrc build`")

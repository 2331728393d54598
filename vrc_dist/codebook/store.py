"""The versioned codebook store and its search: create, commit, list and load versions (docs/CONTRACTS.md).

The directory layout and its rules are in vrc_dist/codebook/format.py.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vrc_dist.arrays import nonfinite_rows
from vrc_dist.atomic import fsync_path, place_atomic, write_json_atomic
from vrc_dist.codebook.format import (
    ANY,
    CHECKSUMS,
    FORMAT,
    MANIFEST,
    POOL,
    PROVENANCE_SCHEMA,
    RESERVED_PARAMS,
    VERSION_DIR,
    VERSION_FILES,
    CodebookError,
    StaleParent,
    has_version_dirs,
    normalise,
    parse_version,
    read_checksums,
    read_vectors,
    resolve_path,
    sha256_file,
    verify_file,
    version_dir_name,
    version_names,
)


class Codebook:
    """A codebook directory, and (after `open`) one loaded, verified version of it."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.name: str = manifest["name"]
        self.model_id: str = manifest["model_id"]
        self.dim: int = int(manifest["dim"])
        self.version: int | None = None
        self.vectors = np.zeros((0, self.dim), np.float32)
        self.provenance = PROVENANCE_SCHEMA.empty_table()
        self.params: dict = {}
        self._index = None

    # ---- the store -------------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, name: str, model_id: str, dim: int) -> Codebook:
        """A new codebook with no versions."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise CodebookError(f"codebook already exists: {path}")
        if not isinstance(dim, int) or dim < 1:
            raise CodebookError(f"embedding dim must be a positive integer, got {dim!r}")
        path.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "name": name, "model_id": model_id, "dim": dim, "versions": []}
        cb = cls(path, manifest)
        cb._write_manifest()
        return cb

    @classmethod
    def open_or_create(cls, path: str | Path, dim: int, source: str, model_id: str | None = None,
                       name: str | None = None) -> Codebook:
        """The store to commit `source`'s vectors into: an existing one must match model and dim."""
        path = resolve_path(path)
        if not (path / MANIFEST).exists():
            if model_id is None:
                raise CodebookError(f"{path} does not exist yet: give the model id to create it")
            return cls.create(path, name or path.name, model_id, dim)
        cb = cls.at(path)
        if model_id is not None and model_id != cb.model_id:
            raise CodebookError(f"codebook {path} is for model {cb.model_id!r}, not {model_id!r}")
        cb.check_dim(dim, source)
        return cb

    @classmethod
    def at(cls, path: str | Path) -> Codebook:
        """The store at `path`, with no version loaded (to list or commit versions)."""
        path = resolve_path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            if has_version_dirs(path):
                raise CodebookError(f"{path}: {MANIFEST} is missing but version directories are there; rebuild it "
                                    f"with `vrc codebook repair {path}`") from None
            raise CodebookError(f"not a codebook (no {MANIFEST}): {path}") from None
        except json.JSONDecodeError as e:
            raise CodebookError(f"{path / MANIFEST}: not valid JSON: {e}") from None
        missing = [k for k in ("name", "model_id", "dim") if k not in manifest]
        if missing:
            raise CodebookError(f"{path / MANIFEST}: missing {missing}")
        return cls(path, manifest)

    @classmethod
    def repair(cls, path: str | Path, name: str | None = None, model_id: str | None = None) -> Codebook:
        """Rebuild a lost or damaged manifest from the complete versions (the truth, see the module doc); name,
        model id and dim come from the latest version's params.json (versions older than that record give
        `name` and `model_id`)."""
        path = resolve_path(path)
        probe = cls(path, {"name": name, "model_id": model_id, "dim": 1})
        versions = probe.versions() if path.is_dir() else []
        if not versions:
            raise CodebookError(f"{path}: no complete version to rebuild {MANIFEST} from")
        params = probe.version_params(versions[-1])
        recorded = params.get("codebook") or {}
        manifest = {"name": name or recorded.get("name"), "model_id": model_id or recorded.get("model_id"),
                    "dim": params["dim"]}
        missing = [f"--{k.replace('_', '-')}" for k in ("name", "model_id") if not manifest[k]]
        if missing:
            raise CodebookError(f"{path}: v{versions[-1]:04d} does not record the codebook's name and model id; "
                                f"give {' and '.join(missing)}")
        cb = cls(path, manifest)
        cb._write_manifest()
        return cb

    def _numbered_dirs(self) -> dict[int, Path]:
        return {int(m.group(1)): e for e in self.path.iterdir() if (m := VERSION_DIR.match(e.name)) and e.is_dir()}

    def versions(self) -> list[int]:
        """Complete versions, from the directories themselves (the manifest may lag behind after a crash)."""
        return sorted(v for v, d in self._numbered_dirs().items() if read_checksums(d) is not None)

    def version_params(self, version: int) -> dict:
        """params.json of a version, unverified (for listings; `open` verifies)."""
        return json.loads((self.path / version_dir_name(version) / "params.json").read_text())

    def _write_manifest(self) -> None:
        # Rebuilt from the directories under a lock (on the directory itself: no lock file to leave behind),
        # so concurrent writers cannot drop each other's entries.
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entries = []
            for v in self.versions():
                p = self.version_params(v)
                entries.append(
                    {"version": v, "dir": version_dir_name(v), "parent": p["parent"],
                     "n_prototypes": p["n_prototypes"], "created": p["created"]}
                )
            manifest = {"format": FORMAT, "name": self.name, "model_id": self.model_id, "dim": self.dim,
                        "versions": entries}
            write_json_atomic(self.path / MANIFEST, manifest)
        finally:
            os.close(fd)  # releases the lock

    def pool_path(self, digest: str) -> Path:
        return self.path / POOL / f"{digest}.parquet"

    def pool_file(self, digest: str, listed_in: str) -> Path:
        """A pool file, verified: its sha256 must be its name."""
        f = self.pool_path(digest)
        verify_file(f, digest, listed_in)
        return f

    def add_to_pool(self, src: Path, digest: str) -> None:
        """Put `src` (whose sha256 was `digest` when it was read) into the pool, unless a file of that digest is
        already there. Hard-linked when on the same filesystem (a pool of a million LLaVA-7B candidates is
        ~8 GB: not copied per codebook), else copied; under a temporary name until its content is checked, so a
        writer killed mid-copy never leaves a partial file under a digest name."""
        final = self.pool_path(digest)
        if final.exists():
            return

        def fill(tmp: Path) -> None:
            try:
                os.link(src, tmp)
            except OSError:  # another filesystem (EXDEV), or no hard links there
                shutil.copyfile(src, tmp)
            found = sha256_file(tmp)
            if found != digest:
                raise CodebookError(f"{src} changed while the version was built (sha256 {digest[:12]}... when "
                                    f"read, {found[:12]}... now); build again")
            os.chmod(tmp, 0o444)  # a linked source goes read-only too: metric files are replaced, never edited

        place_atomic(final, fill)
        fsync_path(final.parent)

    def commit(self, vectors: np.ndarray, provenance: pa.Table, params: dict,
               parent: int | None = None, pool: list[dict] | tuple = (), latest=ANY) -> int:
        """Publish the next version atomically and return its number.

        `pool` entries (see the module doc) must name files already added with `add_to_pool`. `latest` is the
        latest version the caller saw when it started (None: none); if another has been committed since, the
        commit raises StaleParent instead of forking the lineage (optimistic concurrency).

        Raises CodebookError if another writer published that number first: the caller built on a state
        that is no longer the latest, so it must re-read and retry rather than silently overwrite.
        """
        vectors, provenance = self._checked(vectors, provenance, params, pool)
        existing = self.versions()
        if parent is not None and parent not in existing:
            raise CodebookError(f"parent version {parent} not in {self.path}; available: {version_names(existing)}")
        # Numbered after every vNNNN directory, complete or not: a damaged one is skipped, never reused.
        # The number is chosen before the staleness check looks, and a published version is complete the moment
        # it appears, so two writers on one base either pick the same number (the rename lets one win) or the
        # later one sees the other's version in the check.
        version = max(self._numbered_dirs(), default=0) + 1
        self._check_latest(latest, self.versions())
        meta = {"version": version, "parent": parent, "created": datetime.now(timezone.utc).isoformat(),
                "dim": self.dim, "n_prototypes": len(vectors), "pool": list(pool),
                "codebook": {"name": self.name, "model_id": self.model_id}}  # so `repair` can rebuild the manifest
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version_dir_name(version)}-", dir=self.path))
        try:
            self._write_version(tmp, vectors, provenance, {**meta, **params})
            self._publish(tmp, version)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_path(self.path)  # the rename itself
        self._write_manifest()
        return version

    def _checked(self, vectors, provenance: pa.Table, params: dict, pool) -> tuple[np.ndarray, pa.Table]:
        """The commit's prototypes and provenance in their stored types, or CodebookError saying what is wrong."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise CodebookError(f"prototypes must be [N, {self.dim}] for codebook {self.path}, got {vectors.shape}")
        if len(vectors) == 0:
            raise CodebookError("refusing to commit a version with no prototypes")
        if nonfinite_rows(vectors).size:
            raise CodebookError("prototype vectors contain NaN or inf")
        if provenance.num_rows != len(vectors):
            raise CodebookError(f"provenance has {provenance.num_rows} rows for {len(vectors)} prototypes")
        shadowed = sorted(set(params) & set(RESERVED_PARAMS))
        if shadowed:
            raise CodebookError(f"params may not set {shadowed}: the store writes them")
        try:
            provenance = provenance.select(PROVENANCE_SCHEMA.names).cast(PROVENANCE_SCHEMA)
        except (KeyError, pa.ArrowInvalid) as e:
            raise CodebookError(f"provenance must have columns {PROVENANCE_SCHEMA.names}: {e}") from None
        absent = sorted({d for e in pool for d in (e["candidates"], e["images"]) if d} - self._pool_digests())
        if absent:
            raise CodebookError(f"pool entries name files not in {self.path / POOL}: {absent[:3]}")
        return vectors, provenance

    def _write_version(self, tmp: Path, vectors: np.ndarray, provenance: pa.Table, params: dict) -> None:
        """A complete version in the staging directory `tmp`: its files, read-only and on disk, SHA256SUMS last."""
        np.save(tmp / "vectors.npy", vectors, allow_pickle=False)
        pq.write_table(provenance, tmp / "provenance.parquet")
        index = faiss.IndexFlatIP(self.dim)
        index.add(normalise(vectors))
        faiss.write_index(index, str(tmp / "index.faiss"))
        (tmp / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        sums = "".join(f"{sha256_file(tmp / f)}  {f}\n" for f in VERSION_FILES)
        (tmp / CHECKSUMS).write_text(sums)
        for f in (*VERSION_FILES, CHECKSUMS):
            os.chmod(tmp / f, 0o444)  # read-only: a version is never edited in place
            fsync_path(tmp / f)  # on disk before the rename makes the version visible
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700

    def _publish(self, tmp: Path, version: int) -> None:
        """Rename the staged version into place: exactly one of two writers racing for a number wins."""
        try:
            os.rename(tmp, self.path / version_dir_name(version))
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise StaleParent(
                    f"{version_dir_name(version)} of {self.path} was committed by another writer first; "
                    "re-open the codebook and rebuild on the new latest version", version) from None
            raise

    def _check_latest(self, latest, existing: list[int]) -> None:
        now = existing[-1] if existing else None
        if latest is not ANY and now != latest:
            seen = version_dir_name(latest) if latest else "no version"
            raise StaleParent(f"{seen} is no longer the latest version of {self.path} ({version_dir_name(now)} "
                              "is, committed by another run)", now)

    def _pool_digests(self) -> set[str]:
        return {f.name.removesuffix(".parquet") for f in (self.path / POOL).glob("*.parquet")}

    # ---- one loaded version ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, version: int | str | None = None, expected_dim: int | None = None) -> Codebook:
        """Load a version (default: the latest), verifying its checksums and embedding dimension."""
        cb = cls.at(resolve_path(path))
        if expected_dim is not None:
            cb.check_dim(expected_dim, "the model")
        available = cb.versions()
        if not available:
            raise CodebookError(f"codebook {cb.path} has no versions yet")
        number = available[-1] if version is None else parse_version(version)
        if number not in available:
            raise CodebookError(f"version {version_dir_name(number)} not in codebook {cb.path}; "
                                f"available: {version_names(available)}")
        cb._load(number)
        return cb

    def check_dim(self, dim: int, source: str) -> None:
        if dim != self.dim:
            raise CodebookError(f"embedding dim mismatch: codebook {self.path} has dim {self.dim}, "
                                f"{source} has dim {dim}")

    def _load(self, version: int) -> None:
        vdir = self.path / version_dir_name(version)
        sums = read_checksums(vdir)
        for name, digest in sums.items():
            verify_file(vdir / name, digest, CHECKSUMS)
        vectors = read_vectors(vdir, self.dim)
        provenance = pq.read_table(vdir / "provenance.parquet")
        index = faiss.read_index(str(vdir / "index.faiss"))
        if not (provenance.num_rows == index.ntotal == len(vectors)) or index.d != self.dim:
            raise CodebookError(f"{vdir}: inconsistent version: {len(vectors)} vectors, {provenance.num_rows} "
                                f"provenance rows, index of {index.ntotal} x {index.d}")
        self.version = version
        self.vectors = vectors
        self.provenance = provenance
        self.params = json.loads((vdir / "params.json").read_text())
        self._index = index

    def search(self, vectors: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarity to the k nearest prototypes: (sims [n, k] float32, ids [n, k] int64), best first."""
        if self._index is None:
            raise CodebookError(f"no version of {self.path} is loaded: use Codebook.open")
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim != 2:
            raise CodebookError(f"query vectors must be [n, D], got shape {q.shape}")
        self.check_dim(q.shape[1], "the query")
        bad = nonfinite_rows(q)
        if bad.size:  # FAISS would answer them with id -1 and similarity -3.4e38: a silently wrong result
            raise CodebookError(f"{bad.size} query vector(s) contain NaN or inf (rows {bad[:10].tolist()})")
        k = min(int(k), self._index.ntotal)
        return self._index.search(normalise(q), k)

    def max_similarity(self, vectors: np.ndarray) -> np.ndarray:
        """s(v) = max over prototypes of cos(v, prototype) (docs/METHOD.md step 9)."""
        return self.search(vectors, 1)[0][:, 0]

    def lookup(self, ids) -> pa.Table:
        """Provenance rows of prototype ids, in the order given."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.provenance.num_rows):
            raise CodebookError(f"prototype ids out of range [0, {self.provenance.num_rows}): {ids}")
        return self.provenance.take(pa.array(ids))


"""The versioned codebook store (docs/CONTRACTS.md): immutable versions v0001, v0002, ... of redundant prototypes.

Layout of a codebook directory:
    manifest.json          format, name, model id, embedding dim, and an index of the versions
    pool/<sha256>.parquet  the candidate pool, content-addressed: each metric dataset shard's candidates file
                           (key, shard, token_index, vector float16) and its images file (every image key
                           seen, ok or error), named by their sha256 and shared by every version that uses them
    v0001/ vectors.npy     prototypes, float32 [N, D], as clustered (not normalised)
           provenance.parquet  key, shard, token_index, cluster, support, cluster_size (one row per prototype)
           index.faiss     IndexFlatIP over the L2-normalised vectors: inner product = cosine
           params.json     version, parent, created, dim, n_prototypes, pool, + the caller's params
           SHA256SUMS      sha256 of every other file; written last, so its presence marks a complete version

A version's `pool` lists the whole candidate pool it was clustered from (its parent's entries, then the new
ones): {"dataset": run directory name, "shard", "candidates": sha256, "images": sha256 or null,
"n_candidates", "n_images"}. The pool travels with the directory, so a copied codebook can be extended
anywhere; no path of the machine that built it is recorded. Pool files go in before the version that lists
them and are never removed, so a crashed commit leaves at most an unlisted (harmless, reused) pool file.

A version is built in a hidden temp directory and published with one `os.rename`, which cannot replace a
non-empty directory: of two writers racing for the same number exactly one wins. The manifest is only an
index, rewritten after the rename; the truth is the set of version directories with a SHA256SUMS file, so a
crash at any point leaves every earlier version loadable.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vrc_dist.metrics_store import place_atomic

MANIFEST = "manifest.json"
CHECKSUMS = "SHA256SUMS"
VERSION_FILES = ("vectors.npy", "provenance.parquet", "index.faiss", "params.json")
FORMAT = "vrc-codebook/2"  # /2: the candidate pool lives in pool/ (was: absolute paths of metric datasets)
POOL = "pool"
PROVENANCE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("token_index", pa.int32()),
        ("cluster", pa.int32()),
        ("support", pa.int32()),  # distinct images in the prototype's cluster
        ("cluster_size", pa.int32()),  # members of that cluster (how many tokens a `centers` prototype stands for)
    ]
)
# params.json keys the store itself writes; a caller's params may not shadow them.
RESERVED_PARAMS = ("version", "parent", "created", "dim", "n_prototypes", "pool", "codebook")
_VERSION_DIR = re.compile(r"^v(\d{4,})$")


class CodebookError(ValueError):
    pass


class StaleParent(CodebookError):
    """A commit built on a version that another run has since superseded: committing would fork the lineage."""

    def __init__(self, message: str, latest: int):
        super().__init__(message)
        self.latest = latest


# `commit(latest=ANY)`: the caller does not care what the latest version is (imports, tests of the store).
ANY = object()


def codebooks_root() -> Path:
    """Where bare codebook names are looked up: $VRC_CODEBOOKS, else ./codebooks."""
    return Path(os.environ.get("VRC_CODEBOOKS", "codebooks"))


def resolve_path(path: str | Path) -> Path:
    """`toy` names the toy model's codebook (package data); another bare name not found as a path is looked
    up under codebooks_root()."""
    if str(path) == "toy":
        from vrc_dist.toy import TOY_CODEBOOK_DIR

        return TOY_CODEBOOK_DIR
    p = Path(path)
    if not p.exists() and (codebooks_root() / p).is_dir():
        return codebooks_root() / p
    return p


def has_version_dirs(path: Path) -> bool:
    return path.is_dir() and any(_VERSION_DIR.match(e.name) and e.is_dir() for e in path.iterdir())


def version_dir_name(version: int) -> str:
    return f"v{version:04d}"


def parse_version(version: int | str) -> int:
    """Accept 3, "3" or "v0003"."""
    s = str(version)
    m = _VERSION_DIR.match(s) or re.match(r"^(\d+)$", s)
    if not m or int(m.group(1)) < 1:
        raise CodebookError(f"not a version: {version!r} (expected a positive number or vNNNN)")
    return int(m.group(1))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(f: Path, digest: str, listed_in: str) -> None:
    """Raise CodebookError unless `f` exists with sha256 `digest` (as recorded in `listed_in`)."""
    if not f.is_file():
        raise CodebookError(f"{f}: missing (listed in {listed_in})")
    actual = sha256_file(f)
    if actual != digest:
        raise CodebookError(f"{f}: checksum mismatch (recorded {digest[:12]}..., found {actual[:12]}...): "
                            "the file changed after commit")


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; an all-zero row stays zero (cosine 0 to everything) instead of NaN."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)


def _read_checksums(vdir: Path) -> dict[str, str] | None:
    """File name -> sha256, or None when the version is incomplete (no or unreadable SHA256SUMS)."""
    try:
        lines = (vdir / CHECKSUMS).read_text().splitlines()
    except OSError:
        return None
    sums = {}
    for line in lines:
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            return None
        sums[name] = digest
    return sums if all(f in sums for f in VERSION_FILES) else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
        return {int(m.group(1)): e for e in self.path.iterdir() if (m := _VERSION_DIR.match(e.name)) and e.is_dir()}

    def versions(self) -> list[int]:
        """Complete versions, from the directories themselves (the manifest may lag behind after a crash)."""
        return sorted(v for v, d in self._numbered_dirs().items() if _read_checksums(d) is not None)

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
            _write_json_atomic(self.path / MANIFEST, manifest)
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
        _fsync(final.parent)

    def commit(self, vectors: np.ndarray, provenance: pa.Table, params: dict,
               parent: int | None = None, pool: list[dict] | tuple = (), latest=ANY) -> int:
        """Publish the next version atomically and return its number.

        `pool` entries (see the module doc) must name files already added with `add_to_pool`. `latest` is the
        latest version the caller saw when it started (None: none); if another has been committed since, the
        commit raises StaleParent instead of forking the lineage (optimistic concurrency).

        Raises CodebookError if another writer published that number first: the caller built on a state
        that is no longer the latest, so it must re-read and retry rather than silently overwrite.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise CodebookError(f"prototypes must be [N, {self.dim}] for codebook {self.path}, got {vectors.shape}")
        if len(vectors) == 0:
            raise CodebookError("refusing to commit a version with no prototypes")
        if not np.isfinite(vectors).all():
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
        existing = self.versions()
        if parent is not None and parent not in existing:
            raise CodebookError(f"parent version {parent} not in {self.path}; available: {_names(existing)}")
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
            np.save(tmp / "vectors.npy", vectors, allow_pickle=False)
            pq.write_table(provenance, tmp / "provenance.parquet")
            index = faiss.IndexFlatIP(self.dim)
            index.add(normalise(vectors))
            faiss.write_index(index, str(tmp / "index.faiss"))
            (tmp / "params.json").write_text(json.dumps({**meta, **params}, indent=2, sort_keys=True) + "\n")
            sums = "".join(f"{sha256_file(tmp / f)}  {f}\n" for f in VERSION_FILES)
            (tmp / CHECKSUMS).write_text(sums)
            for f in (*VERSION_FILES, CHECKSUMS):
                os.chmod(tmp / f, 0o444)  # read-only: a version is never edited in place
                _fsync(tmp / f)  # on disk before the rename makes the version visible
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            try:
                os.rename(tmp, self.path / version_dir_name(version))
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise StaleParent(
                        f"{version_dir_name(version)} of {self.path} was committed by another writer first; "
                        "re-open the codebook and rebuild on the new latest version", version) from None
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync(self.path)  # the rename itself
        self._write_manifest()
        return version

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
                                f"available: {_names(available)}")
        cb._load(number)
        return cb

    def check_dim(self, dim: int, source: str) -> None:
        if dim != self.dim:
            raise CodebookError(f"embedding dim mismatch: codebook {self.path} has dim {self.dim}, "
                                f"{source} has dim {dim}")

    def _load(self, version: int) -> None:
        vdir = self.path / version_dir_name(version)
        sums = _read_checksums(vdir)
        for name, digest in sums.items():
            verify_file(vdir / name, digest, CHECKSUMS)
        try:
            vectors = np.load(vdir / "vectors.npy", allow_pickle=False)
        except (ValueError, OSError) as e:  # e.g. an object array: refused, never unpickled
            raise CodebookError(f"{vdir / 'vectors.npy'}: not a plain numeric array: {e}") from None
        if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
            raise CodebookError(f"{vdir / 'vectors.npy'}: expected float [N, {self.dim}], got {vectors.dtype} "
                                f"{vectors.shape}")
        self.check_dim(vectors.shape[1], f"{vdir / 'vectors.npy'}")
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
        bad = np.flatnonzero(~np.isfinite(q).all(axis=1))
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


def _names(versions: list[int]) -> str:
    return ", ".join(version_dir_name(v) for v in versions) or "none"


# ---- interchange with the reference code: a .pt tensor [N, D] and a .json list of sample ids -------------

def export_reference(codebook: Codebook, out_prefix: str | Path) -> tuple[Path, Path]:
    """Write <prefix>.pt (a CPU tensor [N, D]) and <prefix>.json (sample ids), giving back exactly what an
    import read: the imported dtype (float32 for a built version) and bare ids where token_index is -1."""
    import torch  # only interchange needs torch

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    pt, js = out_prefix.with_name(out_prefix.name + ".pt"), out_prefix.with_name(out_prefix.name + ".json")
    dtype = codebook.params.get("imported_from", {}).get("dtype", "float32")
    torch.save(torch.from_numpy(codebook.vectors.copy()).to(getattr(torch, dtype)), pt)
    rows = codebook.provenance.select(["key", "token_index"]).to_pylist()
    ids = [r["key"] if r["token_index"] == -1 else f"{r['key']}:{r['token_index']}" for r in rows]
    js.write_text(json.dumps(ids) + "\n")
    return pt, js


def load_reference(pt: str | Path, json_path: str | Path | None = None) -> tuple[np.ndarray, pa.Table, str]:
    """Read a reference-format codebook into (vectors float32 [N, D], provenance, the tensor's dtype name).

    `torch.load(weights_only=True)` refuses any pickle global that is not a tensor building block, so a
    crafted file is rejected, never executed. Sample ids "key:token_index" give provenance; the reference's
    own ids are bare image ids (token_index -1). Cluster and support are unknown (-1). A tensor whose values
    float32 cannot hold exactly (float64) is refused: export could not give it back.
    """
    import torch

    try:
        tensor = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, or OSError depending on the damage
        # Keep torch's reason (e.g. "Unsupported global: GLOBAL io.open"), not its advice to disable the check.
        lines = str(e).splitlines() or [type(e).__name__]
        reason = next((ln.strip().split(" was not an allowed")[0] for ln in lines if "WeightsUnpickler" in ln),
                      f"{type(e).__name__}: {lines[0]}")
        raise CodebookError(f"{pt}: not loadable as plain tensor data (weights_only=True): {reason}") from None
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or not tensor.is_floating_point():
        what = f"tensor {tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise CodebookError(f"{pt}: expected a 2-D float tensor [N, D], got {what}")
    tensor = tensor.detach().cpu()
    vectors = tensor.to(torch.float32)
    bad = np.flatnonzero(~np.isfinite(vectors.numpy()).all(axis=1))
    if bad.size:
        raise CodebookError(f"{pt}: {bad.size} row(s) with NaN or inf (rows {bad[:10].tolist()})")
    if not torch.equal(vectors.to(tensor.dtype), tensor):
        raise CodebookError(f"{pt}: {tensor.dtype} values that float32 does not hold exactly; convert the "
                            "tensor to float32 first if that rounding is acceptable")
    vectors = vectors.numpy()
    n = len(vectors)
    ids = [str(i) for i in range(n)]
    if json_path is not None:
        try:
            ids = json.loads(Path(json_path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CodebookError(f"{json_path}: not a readable JSON list: {e}") from None
        if not isinstance(ids, list) or len(ids) != n:
            raise CodebookError(f"{json_path}: expected a list of {n} sample ids (one per row of {pt})")
    keys, tokens = [], []
    for sample in map(str, ids):
        key, sep, tok = sample.rpartition(":")
        is_pair = sep and tok.isdigit()
        keys.append(key if is_pair else sample)
        tokens.append(int(tok) if is_pair else -1)
    unknown = pa.array(np.full(n, -1, np.int32))
    provenance = pa.table(
        [pa.array(keys, pa.string()), pa.array([""] * n, pa.string()), pa.array(tokens, pa.int32()),
         unknown, unknown, unknown],
        schema=PROVENANCE_SCHEMA,
    )
    return vectors, provenance, str(tensor.dtype).removeprefix("torch.")


def import_reference(pt: str | Path, json_path: str | Path | None, codebook_dir: str | Path,
                     model_id: str | None = None, name: str | None = None) -> int:
    """Commit a reference-format codebook as the next version of `codebook_dir` (created if needed)."""
    vectors, provenance, dtype = load_reference(pt, json_path)
    cb = Codebook.open_or_create(codebook_dir, vectors.shape[1], str(pt), model_id, name)
    # File names and checksums only: a path of this machine would mean nothing where the codebook goes.
    source = {"pt": Path(pt).name, "pt_sha256": sha256_file(Path(pt)), "dtype": dtype}
    if json_path is not None:
        source |= {"json": Path(json_path).name, "json_sha256": sha256_file(Path(json_path))}
    return cb.commit(vectors, provenance, {"imported_from": source})

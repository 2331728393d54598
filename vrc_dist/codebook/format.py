"""The codebook directory format (docs/CONTRACTS.md): immutable versions v0001, v0002, ... of redundant
prototypes.

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

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

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
VERSION_DIR = re.compile(r"^v(\d{4,})$")


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
    return path.is_dir() and any(VERSION_DIR.match(e.name) and e.is_dir() for e in path.iterdir())


def version_dir_name(version: int) -> str:
    return f"v{version:04d}"


def parse_version(version: int | str) -> int:
    """Accept 3, "3" or "v0003"."""
    s = str(version)
    m = VERSION_DIR.match(s) or re.match(r"^(\d+)$", s)
    if not m or int(m.group(1)) < 1:
        raise CodebookError(f"not a version: {version!r} (expected a positive number or vNNNN)")
    return int(m.group(1))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class VersionFileError(CodebookError):
    """A file of a version (or of the pool) is missing, changed or malformed; the message is `path: reason`."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# The one validation of a version's files: Codebook._load raises on the first problem, the doctor reports each.

def verify_file(f: Path, digest: str, listed_in: str) -> None:
    """Raise VersionFileError unless `f` exists with sha256 `digest` (as recorded in `listed_in`)."""
    if not f.is_file():
        raise VersionFileError(f, f"missing (listed in {listed_in})")
    actual = sha256_file(f)
    if actual != digest:
        raise VersionFileError(f, f"checksum mismatch (recorded {digest[:12]}..., found {actual[:12]}...): "
                                  "the file changed after commit")


def read_vectors(vdir: Path, dim: int) -> np.ndarray:
    """A version's prototypes: refused (VersionFileError) unless a plain float array [N, dim]; never unpickled."""
    path = vdir / "vectors.npy"
    try:
        vectors = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:  # e.g. an object array
        raise VersionFileError(path, f"not a plain numeric array: {e}") from None
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise VersionFileError(path, f"shape {vectors.shape}, expected [N, {dim}]")
    if not np.issubdtype(vectors.dtype, np.floating):
        raise VersionFileError(path, f"dtype {vectors.dtype}, expected float")
    return vectors


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; an all-zero row stays zero (cosine 0 to everything) instead of NaN."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)


def read_checksums(vdir: Path) -> dict[str, str] | None:
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


def version_names(versions: list[int]) -> str:
    return ", ".join(version_dir_name(v) for v in versions) or "none"

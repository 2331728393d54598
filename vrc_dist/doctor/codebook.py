"""The doctor's checks of a codebook directory (format: vrc_dist/codebook/format.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vrc_dist.arrays import nonfinite_rows
from vrc_dist.codebook import format as cb
from vrc_dist.doctor.findings import Report, examples, schema_diff

# ---- codebook directory --------------------------------------------------------------------------------


def check_codebook(path: Path, report: Report) -> None:
    import faiss


    mpath = path / cb.MANIFEST
    manifest = json.loads(mpath.read_text())
    missing = [k for k in ("name", "model_id", "dim", "versions") if k not in manifest]
    if missing:
        report.error(mpath, f"missing fields {missing}")
        return
    dim = manifest["dim"]
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        report.error(mpath, f"dim must be a positive integer, got {dim!r}")
        return
    listed = {}
    for e in manifest["versions"] if isinstance(manifest["versions"], list) else []:
        if isinstance(e, dict) and isinstance(e.get("version"), int):
            listed[e["version"]] = e
        else:
            report.error(mpath, f"malformed versions entry {e!r:.200}")
    dirs = {}
    for entry in sorted(path.iterdir()):
        m = re.match(r"^v(\d{4,})$", entry.name)
        if m and entry.is_dir():
            dirs[int(m.group(1))] = entry
        elif entry.name.startswith(".tmp-v") and entry.is_dir():
            report.warn(entry, "temporary directory of an interrupted commit (ignored by readers; safe to delete "
                               "when no commit is running)")
        elif entry.name.startswith(".") and entry.name.endswith(".tmp"):
            report.warn(entry, "temporary file of an interrupted manifest update")

    complete = {}
    for v, vdir in sorted(dirs.items()):
        sums = cb.read_checksums(vdir)
        if sums is None:
            report.warn(vdir, f"incomplete version (no valid {cb.CHECKSUMS}): skipped by readers, number never reused")
            continue
        complete[v] = vdir
        _check_version(vdir, v, dim, sums, set(dirs), report, faiss, cb)
    for v in sorted(set(listed) - set(complete)):
        report.error(mpath, f"lists {cb.version_dir_name(v)}, which is not a complete version directory")
    for v in sorted(set(complete) - set(listed)):
        report.warn(mpath, f"does not list {cb.version_dir_name(v)} (the manifest lags after an interrupted "
                           "commit; readers use the directories)")
    if not complete:
        report.warn(path, "no complete versions")
    _check_pool(path, complete, report, cb)


def _check_pool(path: Path, versions: dict[int, Path], report: Report, cb) -> None:
    files = {}  # digest -> pool file named by it
    for f in sorted((path / cb.POOL).iterdir()) if (path / cb.POOL).is_dir() else []:
        if f.name.endswith(".tmp"):
            report.warn(f, "temporary file of an interrupted pool write (ignored by readers; safe to delete when "
                           "no commit is running)")
        elif not re.fullmatch(r"[0-9a-f]{64}\.parquet", f.name):
            report.warn(f, "not a pool file (<sha256>.parquet): ignored by readers")
        else:
            files[f.name.removesuffix(".parquet")] = f
            if cb.sha256_file(f) != f.name.removesuffix(".parquet"):
                report.error(f, "checksum mismatch: the pool file changed after it was added")
    listed = set()
    for vdir in versions.values():
        try:
            pool = json.loads((vdir / "params.json").read_text()).get("pool")
        except ValueError:
            continue  # reported with the version
        if not isinstance(pool, list) or not all(isinstance(e, dict) for e in pool):
            report.error(vdir / "params.json", f"no candidate pool list (a format before {cb.FORMAT}?): rebuild it")
            continue
        digests = {d for e in pool for d in (e.get("candidates"), e.get("images")) if d}
        listed |= digests
        if digests - files.keys():
            report.error(vdir / "params.json",
                         f"pool files missing from {path / cb.POOL}: {examples(sorted(digests - files.keys()))}")
    for digest in sorted(files.keys() - listed):
        report.warn(files[digest], "in no version's pool (left by an interrupted commit; a commit of the same "
                                   "shard reuses it)")


def _check_version(vdir: Path, v: int, dim: int, sums: dict, numbers: set, report: Report, faiss, cb) -> None:
    try:
        for name, digest in sorted(sums.items()):
            cb.verify_file(vdir / name, digest, cb.CHECKSUMS)
    except cb.VersionFileError as e:
        report.error(e.path, e.reason)
        return
    extra = sorted(p.name for p in vdir.iterdir() if p.name not in sums and p.name != cb.CHECKSUMS)
    if extra:
        report.warn(vdir, f"files not covered by {cb.CHECKSUMS}: {extra}")
    try:
        vectors = cb.read_vectors(vdir, dim)
    except cb.VersionFileError as e:
        report.error(e.path, e.reason)
        return
    bad = nonfinite_rows(vectors)
    if bad.size:
        report.error(vdir / "vectors.npy", f"{bad.size} prototype rows with NaN or inf: rows {examples(bad.tolist())}")
    n = len(vectors)
    try:
        prov = pq.read_table(vdir / "provenance.parquet")
        if prov.num_rows != n:
            report.error(vdir / "provenance.parquet", f"{prov.num_rows} rows for {n} prototypes")
        why = schema_diff(prov.schema, cb.PROVENANCE_SCHEMA)
        if why:
            report.error(vdir / "provenance.parquet", why)
    except (pa.ArrowException, OSError) as e:
        report.error(vdir / "provenance.parquet", f"unreadable: {e}")
    try:
        index = faiss.read_index(str(vdir / "index.faiss"))
        if index.ntotal != n or index.d != dim:
            report.error(vdir / "index.faiss", f"index of {index.ntotal} x {index.d}, expected {n} x {dim}")
    except RuntimeError as e:
        report.error(vdir / "index.faiss", f"unreadable FAISS index: {str(e).splitlines()[0] if str(e) else e}")
    try:
        params = json.loads((vdir / "params.json").read_text())
    except ValueError as e:
        report.error(vdir / "params.json", f"not valid JSON: {e}")
        return
    want = {"version": v, "dim": dim, "n_prototypes": n}
    for k, val in want.items():
        if params.get(k) != val:
            report.error(vdir / "params.json", f"{k} is {params.get(k)!r}, expected {val!r}")
    parent = params.get("parent")
    if parent is not None and (not isinstance(parent, int) or parent not in numbers or parent >= v):
        report.error(vdir / "params.json", f"parent {parent!r} is not an earlier version of this codebook")

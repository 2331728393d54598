"""Consistency checks of what vrc-dist wrote: a metrics output directory or a codebook directory.

`check(path)` returns findings; `vrc doctor PATH` prints them and exits non-zero when any is an error.
Nothing here writes or repairs: the doctor reads, and says what is wrong and where.

Metrics directory (metrics_store): the manifest's format and version fields; for every shard the manifest
lists as done, its three Parquet files exist, have the contract schemas, hold exactly the row counts the
manifest records, and agree with each other (tokens of ok images only, one candidate row per token flagged
`candidate`); no (key, token_index) twice over the whole dataset; finite candidate vectors; no temporary
files left by a killed writer; files of shards the manifest does not count are reported.

Codebook directory (codebook): manifest fields; every vNNNN directory complete (SHA256SUMS) with matching
checksums; manifest versions vs directories; vectors [N, dim], finite; provenance, FAISS index and
params.json consistent with them; temporary directories left by a crashed commit; every pool file's sha256
equal to its name, every version's pool entries present, pool files no version lists and temporary pool
files (both left by a crashed commit, harmless) reported.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ERROR, WARNING = "error", "warning"
COUNT_FIELDS = ("images_ok", "images_error", "tokens", "candidates")
_SHOWN = 5  # examples listed per finding


@dataclass
class Finding:
    level: str  # error | warning
    where: str  # the file or directory concerned
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper()}: {self.where}: {self.message}"


class _Report:
    def __init__(self):
        self.findings: list[Finding] = []

    def error(self, where, message: str) -> None:
        self.findings.append(Finding(ERROR, str(where), message))

    def warn(self, where, message: str) -> None:
        self.findings.append(Finding(WARNING, str(where), message))


def _examples(items) -> str:
    items = list(items)
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(map(str, items[:_SHOWN])) + more


def kind_of(path: Path) -> str | None:
    """'metrics', 'codebook', or None, from the directory's manifest."""
    try:
        data = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    from vrc_dist import codebook, metrics_store

    if data.get("format") == metrics_store.FORMAT:
        return "metrics"
    if data.get("format") == codebook.FORMAT:
        return "codebook"
    return None


def check(path: str | Path) -> tuple[str | None, list[Finding]]:
    """(kind, findings) for a metrics or codebook directory."""
    path = Path(path)
    report = _Report()
    if not path.is_dir():
        report.error(path, "not a directory")
        return None, report.findings
    if not (path / "manifest.json").exists():
        from vrc_dist.codebook import has_version_dirs

        if has_version_dirs(path):
            report.error(path, f"no manifest.json but codebook version directories: rebuild it with "
                               f"`vrc codebook repair {path}`")
        else:
            report.error(path, "no manifest.json: neither a metrics output directory nor a codebook")
        return None, report.findings
    kind = kind_of(path)
    if kind == "metrics":
        check_metrics(path, report)
    elif kind == "codebook":
        check_codebook(path, report)
    else:
        try:
            data = json.loads((path / "manifest.json").read_text())
            fmt = data.get("format") if isinstance(data, dict) else None
            from vrc_dist.codebook import FORMAT

            report.error(path / "manifest.json", f"codebook format {fmt!r}, this code reads {FORMAT!r}: rebuild it"
                         if str(fmt).startswith("vrc-codebook/") else
                         f"unknown format {fmt!r}: not a vrc-dist metrics or codebook manifest")
        except (OSError, ValueError) as e:
            report.error(path / "manifest.json", f"not valid JSON: {e}")
    return kind, report.findings


# ---- metrics output directory --------------------------------------------------------------------------


def _type_name(t: pa.DataType) -> str:
    # Parquet renames a list's child field (item -> element); only the value type and size matter.
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{t.value_type}>[{t.list_size}]"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{t.value_type}>"
    return str(t)


def _schema_diff(actual: pa.Schema, expected: pa.Schema) -> str | None:
    got = [(f.name, _type_name(f.type)) for f in actual]
    want = [(f.name, _type_name(f.type)) for f in expected]
    if got == want:
        return None
    missing = [n for n, _ in want if n not in dict(got)]
    wrong = [f"{n}: {t} (expected {dict(want)[n]})" for n, t in got if n in dict(want) and dict(want)[n] != t]
    extra = [n for n, _ in got if n not in dict(want)]
    parts = ([f"missing {missing}"] if missing else []) + ([f"wrong types {wrong}"] if wrong else []) + (
        [f"unexpected {extra}"] if extra else [])
    return "schema differs from the contract: " + ("; ".join(parts) or "column order differs")


def check_metrics(out: Path, report: _Report) -> None:
    from vrc_dist import metrics_store as ms

    mpath = out / ms.MANIFEST
    data = json.loads(mpath.read_text())
    if data.get("format_version") != ms.FORMAT_VERSION:
        report.error(mpath, f"format_version {data.get('format_version')!r}; this code reads {ms.FORMAT_VERSION}")
        return
    for key in ("config", "versions", "shards", "model_info", "created"):
        if key not in data:
            report.error(mpath, f"missing field {key!r}")
    shards = data.get("shards")
    if not isinstance(shards, dict):
        report.error(mpath, "`shards` is not a mapping")
        return
    versions = data.get("versions") or {}
    if not versions.get("vrc-dist"):
        report.warn(mpath, "no vrc-dist version recorded in `versions`")
    info = data.get("model_info") or {}
    dim = info.get("embed_dim")
    done = []
    for name, entry in sorted(shards.items()):
        if not isinstance(entry, dict) or entry.get("status") not in ("done", "failed"):
            report.error(mpath, f"shard {name!r}: status must be done or failed, got {entry!r:.200}")
            continue
        bad = [k for k in COUNT_FIELDS if not isinstance(entry.get(k), int) or entry[k] < 0]
        if bad:
            report.error(mpath, f"shard {name!r}: missing or invalid counts {bad}")
            continue
        if entry["status"] == "failed":
            report.warn(mpath, f"shard {name!r} failed (the next run retries it): {entry.get('error')}")
        else:
            done.append(name)
    if done and not isinstance(dim, int):
        report.error(mpath, "model_info.embed_dim missing although shards are done")
        return

    # Files on disk that the manifest does not account for.
    for table in ms.TABLES:
        tdir = out / table
        if not tdir.is_dir():
            if done:
                report.error(tdir, "table directory missing")
            continue
        for f in sorted(tdir.iterdir()):
            if f.name.startswith(".") and f.name.endswith(".tmp"):
                report.error(f, "temporary file left by a killed writer (harmless to readers; delete it "
                                "once no run is writing to this directory)")
            elif f.suffix != ".parquet":
                report.warn(f, "unexpected file in a table directory")
            elif f.stem not in shards:
                report.warn(f, "shard not in the manifest: no reader counts it (left by an interrupted run?)")
            elif shards[f.stem].get("status") != "done":
                report.warn(f, f"shard {f.stem!r} is {shards[f.stem].get('status')} in the manifest: "
                               "this file is not counted and the next run rewrites it")

    schemas = {"tokens": ms.TOKENS_SCHEMA, "images": ms.IMAGES_SCHEMA,
               "candidates": ms.candidates_schema(dim) if isinstance(dim, int) else None}
    token_ids, cand_ids, image_keys = [], [], []  # per done shard, for duplicate checks over the dataset
    for name in done:
        entry = shards[name]
        tables = {}
        for table in ms.TABLES:
            f = ms.table_path(out, table, name)
            if not f.exists():
                report.error(f, f"missing: the manifest lists shard {name!r} as done")
                continue
            try:
                t = pq.read_table(f)
            except (pa.ArrowException, OSError) as e:
                report.error(f, f"unreadable Parquet: {e}")
                continue
            why = _schema_diff(t.schema, schemas[table])
            if why:
                report.error(f, why)
                continue
            tables[table] = t
        if len(tables) < 3:
            continue
        _check_shard(out, name, entry, tables, report)
        ok = tables["images"].filter(pc.equal(tables["images"]["status"], "ok"))
        image_keys.append((name, ok.column("key")))  # error rows may repeat a key (that is why they failed)
        token_ids.append((name, tables["tokens"].select(["key", "token_index"])))
        cand_ids.append((name, tables["candidates"].select(["key", "token_index"])))

    _check_unique_keys(out, image_keys, report)
    for table, parts in (("tokens", token_ids), ("candidates", cand_ids)):
        _check_unique_ids(out / table, parts, report)


def _check_shard(out: Path, name: str, entry: dict, t: dict, report: _Report) -> None:
    from vrc_dist import metrics_store as ms

    images, tokens, cands = t["images"], t["tokens"], t["candidates"]
    status = Counter(images.column("status").to_pylist())
    expect = {"images": (images.num_rows, entry["images_ok"] + entry["images_error"]),
              "images with status ok": (status.get("ok", 0), entry["images_ok"]),
              "images with status error": (status.get("error", 0), entry["images_error"]),
              "tokens": (tokens.num_rows, entry["tokens"]), "candidates": (cands.num_rows, entry["candidates"])}
    for what, (got, want) in expect.items():
        if got != want:
            report.error(ms.table_path(out, "images" if "images" in what else what, name),
                         f"{got} {what} rows, the manifest records {want}")
    other = set(status) - {"ok", "error"}
    if other:
        report.error(ms.table_path(out, "images", name), f"unknown status values {sorted(other)}")
    for table, tab in t.items():
        wrong = pc.sum(pc.not_equal(tab.column("shard"), name)).as_py() or 0
        if wrong:
            report.error(ms.table_path(out, table, name), f"{wrong} rows have a shard column other than {name!r}")
    no_error = images.filter(pc.and_kleene(pc.equal(images["status"], "error"), pc.is_null(images["error"])))
    if no_error.num_rows:
        report.error(ms.table_path(out, "images", name), f"{no_error.num_rows} error rows without a reason: "
                     f"{_examples(no_error.column('key').to_pylist())}")
    ok_keys = set(images.filter(pc.equal(images["status"], "ok")).column("key").to_pylist())
    tok_keys = set(tokens.column("key").unique().to_pylist())
    if tok_keys != ok_keys:
        report.error(ms.table_path(out, "tokens", name),
                     f"token keys differ from the ok images: only in tokens {_examples(sorted(tok_keys - ok_keys))}; "
                     f"ok images without tokens {_examples(sorted(ok_keys - tok_keys))}")
    flagged = tokens.filter(tokens["candidate"]).select(["key", "token_index"])
    got = set(zip(cands.column("key").to_pylist(), cands.column("token_index").to_pylist()))
    want = set(zip(flagged.column("key").to_pylist(), flagged.column("token_index").to_pylist()))
    if got != want:
        report.error(ms.table_path(out, "candidates", name),
                     f"candidate rows differ from tokens flagged candidate: extra {_examples(sorted(got - want))}; "
                     f"missing {_examples(sorted(want - got))}")
    if cands.num_rows:
        flat = cands.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        rows = ~np.isfinite(flat.reshape(cands.num_rows, -1)).all(axis=1)
        if rows.any():
            bad = cands.filter(pa.array(rows)).select(["key", "token_index"]).to_pylist()
            report.error(ms.table_path(out, "candidates", name),
                         f"{int(rows.sum())} candidate vectors with NaN or inf: "
                         f"{_examples(_ids(bad))}")


def _ids(rows: list[dict]) -> list[str]:
    return [f"{r['key']}:{r['token_index']}" for r in rows]


def _check_unique_keys(out: Path, parts: list[tuple[str, pa.ChunkedArray]], report: _Report) -> None:
    where: dict[str, list[str]] = {}
    for shard, keys in parts:
        counts = Counter(keys.to_pylist())
        for k, c in counts.items():
            where.setdefault(k, []).extend([shard] * c)
    dup = {k: v for k, v in where.items() if len(v) > 1}
    if dup:
        report.error(out / "images", f"{len(dup)} image key(s) probed more than once: "
                     f"{_examples(f'{k!r} in ' + ', '.join(s) for k, s in sorted(dup.items()))} (the clustering stage refuses "
                     "a token twice; rename the keys or keep those shards in separate datasets)")


def _check_unique_ids(tdir: Path, parts: list[tuple[str, pa.Table]], report: _Report) -> None:
    if not parts:
        return
    ids = pa.concat_tables(t for _, t in parts)
    if ids.num_rows < 2:
        return
    counted = ids.group_by(["key", "token_index"]).aggregate([("key", "count")])
    dup = counted.filter(pc.greater(counted["key_count"], 1))
    if dup.num_rows:
        report.error(tdir, f"{dup.num_rows} (key, token_index) pairs appear more than once: "
                     f"{_examples(_ids(dup.to_pylist()))}")


# ---- codebook directory --------------------------------------------------------------------------------


def check_codebook(path: Path, report: _Report) -> None:
    import faiss

    from vrc_dist import codebook as cb

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
        sums = cb._read_checksums(vdir)
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


def _check_pool(path: Path, versions: dict[int, Path], report: _Report, cb) -> None:
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
                         f"pool files missing from {path / cb.POOL}: {_examples(sorted(digests - files.keys()))}")
    for digest in sorted(files.keys() - listed):
        report.warn(files[digest], "in no version's pool (left by an interrupted commit; a commit of the same "
                                   "shard reuses it)")


def _check_version(vdir: Path, v: int, dim: int, sums: dict, numbers: set, report: _Report, faiss, cb) -> None:
    for name, digest in sorted(sums.items()):
        f = vdir / name
        if not f.is_file():
            report.error(f, f"missing (listed in {cb.CHECKSUMS})")
            return
        if cb.sha256_file(f) != digest:
            report.error(f, "checksum mismatch: the file changed after commit")
            return
    extra = sorted(p.name for p in vdir.iterdir() if p.name not in sums and p.name != cb.CHECKSUMS)
    if extra:
        report.warn(vdir, f"files not covered by {cb.CHECKSUMS}: {extra}")
    try:
        vectors = np.load(vdir / "vectors.npy", allow_pickle=False)
    except (ValueError, OSError) as e:
        report.error(vdir / "vectors.npy", f"not a plain numeric array: {e}")
        return
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        report.error(vdir / "vectors.npy", f"shape {vectors.shape}, expected [N, {dim}]")
        return
    if not np.issubdtype(vectors.dtype, np.floating):
        report.error(vdir / "vectors.npy", f"dtype {vectors.dtype}, expected float")
        return
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        report.error(vdir / "vectors.npy", f"{bad.size} prototype rows with NaN or inf: rows {_examples(bad.tolist())}")
    n = len(vectors)
    try:
        prov = pq.read_table(vdir / "provenance.parquet")
        if prov.num_rows != n:
            report.error(vdir / "provenance.parquet", f"{prov.num_rows} rows for {n} prototypes")
        why = _schema_diff(prov.schema, cb.PROVENANCE_SCHEMA)
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


def format_findings(path, kind: str | None, findings: list[Finding]) -> str:
    errors = sum(f.level == ERROR for f in findings)
    warnings = len(findings) - errors
    lines = [str(f) for f in findings]
    what = {"metrics": "metrics output", "codebook": "codebook"}.get(kind, "directory")
    lines.append(f"{what} {path}: " + ("OK" if not findings else f"{errors} error(s), {warnings} warning(s)"))
    return "\n".join(lines)


def findings_json(path, kind, findings) -> str:
    return json.dumps({"path": str(path), "kind": kind, "ok": not any(f.level == ERROR for f in findings),
                       "findings": [asdict(f) for f in findings]}, indent=1)

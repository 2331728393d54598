"""The doctor's checks of a metrics output directory (format: vrc_dist/build/schema.py)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vrc_dist.arrays import nonfinite_rows
from vrc_dist.build import schema as ms
from vrc_dist.doctor.findings import Report, examples, schema_diff

COUNT_FIELDS = ("images_ok", "images_error", "tokens", "candidates")


# ---- metrics output directory --------------------------------------------------------------------------


def check_metrics(out: Path, report: Report) -> None:
    """Every check of a metrics output directory (module doc of vrc_dist.doctor)."""
    manifest = _check_manifest(out, report)
    if manifest is None:
        return
    shards, done, dim = manifest
    _check_stray_files(out, shards, done, report)
    schemas = {"tokens": ms.TOKENS_SCHEMA, "images": ms.IMAGES_SCHEMA,
               "candidates": ms.candidates_schema(dim) if isinstance(dim, int) else None}
    token_ids, cand_ids, image_keys = [], [], []  # per done shard, for duplicate checks over the dataset
    for name in done:
        tables = _read_shard(out, name, schemas, report)
        if len(tables) < 3:
            continue
        _check_shard(out, name, shards[name], tables, report)
        ok = tables["images"].filter(pc.equal(tables["images"]["status"], "ok"))
        image_keys.append((name, ok.column("key")))  # error rows may repeat a key (that is why they failed)
        token_ids.append((name, tables["tokens"].select(["key", "token_index"])))
        cand_ids.append((name, tables["candidates"].select(["key", "token_index"])))

    _check_unique_keys(out, image_keys, report)
    for table, parts in (("tokens", token_ids), ("candidates", cand_ids)):
        _check_unique_ids(out / table, parts, report)


def _check_manifest(out: Path, report: Report) -> tuple[dict, list[str], int | None] | None:
    """(shards, names of the done shards, embed_dim) from a manifest fit to check the files by; None if not."""
    mpath = out / ms.MANIFEST
    data = json.loads(mpath.read_text())
    if data.get("format_version") != ms.FORMAT_VERSION:
        report.error(mpath, f"format_version {data.get('format_version')!r}; this code reads {ms.FORMAT_VERSION}")
        return None
    for key in ("config", "versions", "shards", "model_info", "created"):
        if key not in data:
            report.error(mpath, f"missing field {key!r}")
    shards = data.get("shards")
    if not isinstance(shards, dict):
        report.error(mpath, "`shards` is not a mapping")
        return None
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
        return None
    return shards, done, dim


def _check_stray_files(out: Path, shards: dict, done: list[str], report: Report) -> None:
    """Files on disk that the manifest does not account for."""
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


def _read_shard(out: Path, name: str, schemas: dict, report: Report) -> dict:
    """The done shard's tables that exist, read and have their contract schema (the rest are reported)."""
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
        why = schema_diff(t.schema, schemas[table])
        if why:
            report.error(f, why)
            continue
        tables[table] = t
    return tables


def _check_shard(out: Path, name: str, entry: dict, t: dict, report: Report) -> None:

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
                     f"{examples(no_error.column('key').to_pylist())}")
    ok_keys = set(images.filter(pc.equal(images["status"], "ok")).column("key").to_pylist())
    tok_keys = set(tokens.column("key").unique().to_pylist())
    if tok_keys != ok_keys:
        report.error(ms.table_path(out, "tokens", name),
                     f"token keys differ from the ok images: only in tokens {examples(sorted(tok_keys - ok_keys))}; "
                     f"ok images without tokens {examples(sorted(ok_keys - tok_keys))}")
    flagged = tokens.filter(tokens["candidate"]).select(["key", "token_index"])
    got = set(zip(cands.column("key").to_pylist(), cands.column("token_index").to_pylist()))
    want = set(zip(flagged.column("key").to_pylist(), flagged.column("token_index").to_pylist()))
    if got != want:
        report.error(ms.table_path(out, "candidates", name),
                     f"candidate rows differ from tokens flagged candidate: extra {examples(sorted(got - want))}; "
                     f"missing {examples(sorted(want - got))}")
    if cands.num_rows:
        flat = cands.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        rows = nonfinite_rows(flat.reshape(cands.num_rows, -1))
        if rows.size:
            bad = cands.take(pa.array(rows)).select(["key", "token_index"]).to_pylist()
            report.error(ms.table_path(out, "candidates", name),
                         f"{rows.size} candidate vectors with NaN or inf: "
                         f"{examples(_ids(bad))}")


def _ids(rows: list[dict]) -> list[str]:
    return [f"{r['key']}:{r['token_index']}" for r in rows]


def _check_unique_keys(out: Path, parts: list[tuple[str, pa.ChunkedArray]], report: Report) -> None:
    where: dict[str, list[str]] = {}
    for shard, keys in parts:
        counts = Counter(keys.to_pylist())
        for k, c in counts.items():
            where.setdefault(k, []).extend([shard] * c)
    dup = {k: v for k, v in where.items() if len(v) > 1}
    if dup:
        report.error(out / "images", f"{len(dup)} image key(s) probed more than once: "
                     f"{examples(f'{k!r} in ' + ', '.join(s) for k, s in sorted(dup.items()))} (the clustering stage refuses "
                     "a token twice; rename the keys or keep those shards in separate datasets)")


def _check_unique_ids(tdir: Path, parts: list[tuple[str, pa.Table]], report: Report) -> None:
    if not parts:
        return
    ids = pa.concat_tables(t for _, t in parts)
    if ids.num_rows < 2:
        return
    counted = ids.group_by(["key", "token_index"]).aggregate([("key", "count")])
    dup = counted.filter(pc.greater(counted["key_count"], 1))
    if dup.num_rows:
        report.error(tdir, f"{dup.num_rows} (key, token_index) pairs appear more than once: "
                     f"{examples(_ids(dup.to_pylist()))}")

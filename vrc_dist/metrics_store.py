"""Writer and reader of a metrics dataset: per-shard Parquet tables plus the run manifest (CONTRACTS.md).

Layout of one run directory: `tokens/<shard>.parquet`, `images/<shard>.parquet`,
`candidates/<shard>.parquet`, `manifest.json`. Every file is written under a temporary name in its
final directory and moved into place with os.replace, so a reader (or a retry after a crash) sees a
whole file or none. The manifest is the commit point: a shard's files count only once the manifest
lists the shard as done, so files left by a killed attempt can never add rows twice.
"""
from __future__ import annotations

import json
import os
import platform
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

TABLES = ("tokens", "images", "candidates")
MANIFEST = "manifest.json"
FORMAT = "vrc-dist/metrics"
FORMAT_VERSION = 1

TOKEN_FIELDS = [
    ("token_index", pa.int32()),
    ("row", pa.int32()),
    ("col", pa.int32()),
    ("cls_sim", pa.float32()),
    ("cls_sim_rank", pa.int32()),
    ("top1_prob", pa.float32()),
    ("top1_token_id", pa.int32()),
    ("jsd_region", pa.float32()),
    ("jsd_global", pa.float32()),
    ("score", pa.float32()),
    ("low_info", pa.bool_()),
    ("image_cluster", pa.int32()),
    ("image_cluster_size", pa.int32()),
    ("candidate", pa.bool_()),
]
TOKENS_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), *TOKEN_FIELDS])
IMAGES_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("answer", pa.string()),
        ("answer_token_id", pa.int32()),
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),  # why the image has no metrics (status error)
        ("warning", pa.string()),  # processed, but something about the sample was off (e.g. bad sidecar)
    ]
)


def candidates_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("key", pa.string()),
            ("shard", pa.string()),
            ("token_index", pa.int32()),
            ("vector", pa.list_(pa.float16(), dim)),
        ]
    )


def table_path(out_dir: str | Path, table: str, shard: str) -> Path:
    return Path(out_dir) / table / f"{shard}.parquet"


def _temp_beside(path: Path) -> Path:
    # Same directory as the target, so os.replace is an atomic rename on the same filesystem.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _fsync_replace(tmp: Path, path: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def place_atomic(path: str | Path, fill) -> None:
    """Make `path` by `fill(temp path)` under a temporary name beside it, then fsync and rename: a reader,
    or a retry after a crash, sees the whole file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        fill(tmp)
        _fsync_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes) -> None:
    place_atomic(path, lambda tmp: tmp.write_bytes(data))


# --- one shard's tables --------------------------------------------------------------------------------


class ShardWriter:
    """Streams one shard's rows into temporary Parquet files; commit() moves all three into place.

    Rows are flushed as a row group every `flush_images` images, so memory stays bounded however
    big the shard is (candidate vectors dominate: n x D float16 per image).
    """

    def __init__(self, out_dir: str | Path, shard: str, dim: int, flush_images: int = 64):
        self.shard, self.flush_images = shard, flush_images
        self.schemas = {"tokens": TOKENS_SCHEMA, "images": IMAGES_SCHEMA, "candidates": candidates_schema(dim)}
        self.dim = dim
        self.paths = {t: table_path(out_dir, t, shard) for t in TABLES}
        self.temps = {t: _temp_beside(p) for t, p in self.paths.items()}
        self.writers: dict[str, pq.ParquetWriter] = {}
        # Leftovers of an attempt killed mid-write: the driver runs one attempt per shard at a time,
        # so any temp file of this shard's tables is dead.
        for t in TABLES:
            self.paths[t].parent.mkdir(parents=True, exist_ok=True)
            for stale in self.paths[t].parent.glob(f".{self.paths[t].name}.*.tmp"):
                stale.unlink(missing_ok=True)
        try:
            for t in TABLES:
                self.writers[t] = pq.ParquetWriter(self.temps[t], self.schemas[t])
        except BaseException:  # e.g. a full disk after the first file opened: leave nothing behind
            self.abort()
            raise
        self.buffers: dict[str, list[pa.Table]] = {t: [] for t in TABLES}
        self.buffered_images = 0
        self.counts = {"images_ok": 0, "images_error": 0, "tokens": 0, "candidates": 0}

    def add_result(self, result, width: int, height: int, warnings: list[str] | None = None) -> None:
        """Add one probed image (an ImageResult, CONTRACTS.md)."""
        n = len(result.tokens["token_index"])
        cols = {"key": [result.key] * n, "shard": [self.shard] * n}
        for name, typ in TOKEN_FIELDS:
            if name not in result.tokens:
                raise ValueError(f"image {result.key!r}: ImageResult.tokens lacks column {name!r}")
            values = np.asarray(result.tokens[name])
            if len(values) != n:
                raise ValueError(f"image {result.key!r}: column {name!r} has {len(values)} rows, expected {n}")
            cols[name] = pa.array(values, type=typ)
        self._add("tokens", pa.table(cols, schema=TOKENS_SCHEMA))

        vectors = np.asarray(result.candidate_vectors, dtype=np.float16).reshape(-1, self.dim)
        index = np.asarray(result.candidate_index, dtype=np.int32)
        m = len(index)
        if vectors.shape[0] != m:
            raise ValueError(f"image {result.key!r}: {m} candidate indices but {vectors.shape[0]} vectors")
        flat = pa.array(vectors.reshape(-1), type=pa.float16())
        self._add(
            "candidates",
            pa.table(
                {
                    "key": [result.key] * m,
                    "shard": [self.shard] * m,
                    "token_index": index,
                    "vector": pa.FixedSizeListArray.from_arrays(flat, self.dim),
                },
                schema=self.schemas["candidates"],
            ),
        )
        gh, gw = result.grid
        self._add_image(
            key=result.key, width=width, height=height, grid_h=gh, grid_w=gw, answer=result.answer,
            answer_token_id=result.answer_token_id, status="ok", error=None,
            warning="; ".join(warnings) if warnings else None,
        )
        self.counts["images_ok"] += 1
        self.counts["tokens"] += n
        self.counts["candidates"] += m

    def add_error(self, key: str, error: str, width: int | None = None, height: int | None = None) -> None:
        """Record an image that could not be probed, with the reason."""
        self._add_image(
            key=key, width=width, height=height, grid_h=None, grid_w=None, answer=None,
            answer_token_id=None, status="error", error=error, warning=None,
        )
        self.counts["images_error"] += 1

    def _add_image(self, **row) -> None:
        self._add("images", pa.Table.from_pylist([dict(row, shard=self.shard)], schema=IMAGES_SCHEMA))
        self.buffered_images += 1
        if self.buffered_images >= self.flush_images:
            self._flush()

    def _add(self, table: str, rows: pa.Table) -> None:
        self.buffers[table].append(rows)

    def _flush(self) -> None:
        for t in TABLES:
            if self.buffers[t]:
                self.writers[t].write_table(pa.concat_tables(self.buffers[t]))
                self.buffers[t] = []
        self.buffered_images = 0

    def commit(self) -> dict:
        """Close the temporary files and move them into place; returns the row counts."""
        try:
            self._flush()
            for t in TABLES:
                self.writers[t].close()
            for t in TABLES:
                _fsync_replace(self.temps[t], self.paths[t])
        except BaseException:  # e.g. the disk filled up: leave no temporary files behind
            self.abort()
            raise
        return dict(self.counts)

    def abort(self) -> None:
        """Drop the temporary files. Every table is cleaned even if closing one fails (a full disk)."""
        for t in TABLES:
            try:
                if t in self.writers:
                    self.writers[t].close()
            except Exception:  # the file is being thrown away: its write error changes nothing
                pass
            self.temps[t].unlink(missing_ok=True)


def mark_duplicates(out_dir: str | Path, shard: str, reasons: dict[str, str]) -> None:
    """Turn the ok rows of `reasons`' keys in one committed shard into error rows with that reason, and drop
    their tokens and candidates. Each table is rewritten row group by row group (a shard's candidates may
    not fit in memory) and replaced atomically; running it again changes nothing."""
    keys = pa.array(sorted(reasons), pa.string())

    def drop(t: pa.Table) -> pa.Table:
        return t.filter(pc.invert(pc.is_in(t["key"], value_set=keys)))

    def mark(t: pa.Table) -> pa.Table:
        rows = t.to_pylist()
        for r in rows:
            if r["status"] == "ok" and r["key"] in reasons:
                r.update(status="error", error=reasons[r["key"]], grid_h=None, grid_w=None, answer=None,
                         answer_token_id=None)
        return pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)

    for table, change in (("tokens", drop), ("candidates", drop), ("images", mark)):
        path = table_path(out_dir, table, shard)
        tmp = _temp_beside(path)
        try:
            with pq.ParquetFile(path) as src, pq.ParquetWriter(tmp, src.schema_arrow) as dst:
                for i in range(src.num_row_groups):
                    dst.write_table(change(src.read_row_group(i)))
            _fsync_replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def shard_counts(out_dir: str | Path, shard: str, images: pa.Table) -> dict:
    """A committed shard's row counts, from its files (`images`: its images table, status column at least)."""
    status = images["status"]
    rows = {t: pq.ParquetFile(table_path(out_dir, t, shard)).metadata.num_rows for t in ("tokens", "candidates")}
    return {"images_ok": pc.sum(pc.equal(status, "ok")).as_py() or 0,
            "images_error": pc.sum(pc.equal(status, "error")).as_py() or 0, **rows}


# --- manifest ------------------------------------------------------------------------------------------


def versions() -> dict:
    """Versions that change the numbers: recorded with every run so results can be traced."""
    out = {"python": platform.python_version()}
    for dist in ("vrc-dist", "torch", "transformers", "ray", "pyarrow", "webdataset", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    """`manifest.json`: run configuration, model info, versions and per-shard status.

    Only the driver writes it (single writer), after each finished shard, atomically.
    A shard entry: url, status (done | failed), error, images_ok, images_error, tokens, candidates,
    seconds, attempts. `done` means its three files are in place; `error` on a done shard notes input
    that broke off (truncated, empty); `failed` shards are run again by the next run.
    """

    path: Path
    data: dict = field(default_factory=dict)

    @classmethod
    def create(cls, out_dir: str | Path, config: dict) -> Manifest:
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": utc_now(),
            "updated": utc_now(),
            "config": config,
            "divergence": config.get("probe", {}).get("divergence"),
            "model_info": None,
            "versions": versions(),
            "shards": {},
            "runs": [],
        }
        return cls(Path(out_dir) / MANIFEST, data)

    @classmethod
    def load(cls, out_dir: str | Path) -> Manifest | None:
        path = Path(out_dir) / MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a vrc-dist metrics manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {data.get('format_version')}, this code reads {FORMAT_VERSION}")
        return cls(path, data)

    @property
    def shards(self) -> dict:
        return self.data["shards"]

    def done(self) -> list[str]:
        return sorted(name for name, entry in self.shards.items() if entry["status"] == "done")

    def record_shard(self, name: str, entry: dict) -> None:
        self.shards[name] = entry
        self.save()

    def save(self) -> None:
        self.data["updated"] = utc_now()
        write_atomic(self.path, (json.dumps(self.data, indent=1, sort_keys=True) + "\n").encode())


# --- reading -------------------------------------------------------------------------------------------


def read_table(out_dir: str | Path, table: str, columns: list[str] | None = None) -> pa.Table:
    """One table over every shard the manifest lists as done, in shard-name order."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; tables: {TABLES}")
    manifest = Manifest.load(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"{Path(out_dir) / MANIFEST}: no metrics manifest (not a build output?)")
    files = [table_path(out_dir, table, s) for s in manifest.done()]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"manifest lists shards as done but files are missing: {missing[:5]}")
    if not files:
        schema = TOKENS_SCHEMA if table == "tokens" else IMAGES_SCHEMA if table == "images" else None
        if schema is None:
            dim = (manifest.data.get("model_info") or {}).get("embed_dim", 0)
            schema = candidates_schema(int(dim))
        return schema.empty_table().select(columns) if columns else schema.empty_table()
    return pa.concat_tables(pq.read_table(f, columns=columns) for f in files)

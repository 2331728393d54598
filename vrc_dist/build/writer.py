"""Writer of one shard's three tables, and the in-place rewrites of a committed shard (duplicates)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vrc_dist.atomic import fsync_replace, temp_beside
from vrc_dist.build.schema import IMAGES_SCHEMA, TABLES, TOKEN_FIELDS, TOKENS_SCHEMA, candidates_schema, table_path


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
        self.temps = {t: temp_beside(p) for t, p in self.paths.items()}
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
                fsync_replace(self.temps[t], self.paths[t])
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
        tmp = temp_beside(path)
        try:
            with pq.ParquetFile(path) as src, pq.ParquetWriter(tmp, src.schema_arrow) as dst:
                for i in range(src.num_row_groups):
                    dst.write_table(change(src.read_row_group(i)))
            fsync_replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def shard_counts(out_dir: str | Path, shard: str, images: pa.Table) -> dict:
    """A committed shard's row counts, from its files (`images`: its images table, status column at least)."""
    status = images["status"]
    rows = {t: pq.ParquetFile(table_path(out_dir, t, shard)).metadata.num_rows for t in ("tokens", "candidates")}
    return {"images_ok": pc.sum(pc.equal(status, "ok")).as_py() or 0,
            "images_error": pc.sum(pc.equal(status, "error")).as_py() or 0, **rows}

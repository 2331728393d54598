"""Reading a metrics dataset: one table over the shards its manifest lists as done."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from vrc_dist.build.manifest import Manifest
from vrc_dist.build.schema import IMAGES_SCHEMA, MANIFEST, TABLES, TOKENS_SCHEMA, candidates_schema, table_path


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
    # One dataset over the files, read in the order given (shard-name order).
    return ds.dataset([str(f) for f in files], format="parquet").to_table(columns=columns)

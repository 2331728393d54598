"""The metrics dataset's on-disk format (docs/CONTRACTS.md): its tables, their schemas, where each file goes.

Layout of one run directory: `tokens/<shard>.parquet`, `images/<shard>.parquet`,
`candidates/<shard>.parquet`, `manifest.json`. Every file is written under a temporary name in its
final directory and moved into place atomically (vrc_dist.atomic), so a reader (or a retry after a crash)
sees a whole file or none. The manifest is the commit point: a shard's files count only once the manifest
lists the shard as done, so files left by a killed attempt can never add rows twice.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

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

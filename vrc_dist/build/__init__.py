"""The build: shards -> per-shard probe work -> the metrics dataset (Parquet + manifest) -> a codebook version.

schema/writer/manifest/read: the metrics dataset's format, its writer, its manifest and its reader; work: the
Ray-free per-shard work; ray_executor: the probe actors; pipeline: the stages; extend: extending a codebook.
"""
from vrc_dist.build.manifest import Manifest
from vrc_dist.build.read import read_table
from vrc_dist.build.schema import IMAGES_SCHEMA, TABLES, TOKEN_FIELDS, TOKENS_SCHEMA, candidates_schema, table_path
from vrc_dist.build.writer import ShardWriter

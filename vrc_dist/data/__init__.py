"""Input: shard listing (`expand_shards`), the one tar reader (`iter_samples`), and image decoding."""
from vrc_dist.data.images import ImageError, load_image
from vrc_dist.data.shards import (
    SHARDS_HELP,
    Sample,
    ShardError,
    ShardOpenError,
    ShardReadError,
    ShardSpec,
    expand_shards,
    iter_samples,
    shard_name,
)

"""One shard through a loaded prober: read samples, probe each image, write the shard's three tables.

Plain Python, no Ray: the executors (executor.py, ray_executor.py) run it, in this process or in Ray actors.
Every bad sample becomes an `images` row with status error; only a shard that cannot be opened
comes back as failed, with nothing written.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Container
from pathlib import Path

from vrc_dist.build.writer import ShardWriter
from vrc_dist.data import shards
from vrc_dist.data.images import ImageError, load_image


def process_shard(
    prober,
    spec: shards.ShardSpec,
    out_dir: str | Path,
    max_member_bytes: int = shards.MAX_MEMBER_BYTES,
    on_progress: Callable[[int, int], None] | None = None,
    skip_keys: Container[str] = frozenset(),
) -> dict:
    """Probe every image of one shard and commit its tables; returns the shard's manifest entry.

    Samples whose key is in `skip_keys` (images an earlier dataset already holds: extending a codebook)
    are neither probed nor written; the entry then counts them as `images_skipped`.
    """
    start = time.time()
    writer = ShardWriter(out_dir, spec.name, dim=int(prober.model_info["embed_dim"]))
    shard_error = None
    images = tokens = skipped = 0
    try:
        for sample in shards.iter_samples(spec.url, max_member_bytes):
            if sample.key in skip_keys:
                skipped += 1
                continue
            images += 1
            if sample.error:
                writer.add_error(sample.key, sample.error)
            else:
                tokens += _probe_one(prober, writer, sample, f"{spec.url}:{sample.image_member}")
            if on_progress:
                on_progress(images, tokens)
    except shards.ShardOpenError as e:
        writer.abort()
        return _entry(spec, "failed", str(e), None, start)
    except shards.ShardReadError as e:
        shard_error = str(e)  # what was read before the break is kept
    except BaseException:
        writer.abort()
        raise
    entry = _entry(spec, "done", shard_error, writer.commit(), start)
    if skip_keys:
        entry["images_skipped"] = skipped
    return entry


def _probe_one(prober, writer: ShardWriter, sample: shards.Sample, name: str) -> int:
    try:
        image = load_image(sample.image, name)
    except ImageError as e:
        writer.add_error(sample.key, str(e))
        return 0
    try:
        result = prober.probe(image, sample.key)
    except Exception as e:  # one pathological image must not cost the shard
        writer.add_error(sample.key, f"probe failed: {type(e).__name__}: {e}", *image.size)
        return 0
    writer.add_result(result, *image.size, warnings=sample.warnings)
    return len(result.tokens["token_index"])


def _entry(spec: shards.ShardSpec, status: str, error: str | None, counts: dict | None, start: float) -> dict:
    counts = counts or {"images_ok": 0, "images_error": 0, "tokens": 0, "candidates": 0}
    return {"url": spec.url, "status": status, "error": error, **counts, "seconds": round(time.time() - start, 3)}

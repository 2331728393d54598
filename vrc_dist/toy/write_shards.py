"""Write the toy world as WebDataset tar shards: `{key}.png` + `{key}.json` per sample."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import webdataset as wds

from vrc_dist.atomic import place_atomic
from vrc_dist.toy.world import SPLITS, WorldSpec, render


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.tar"


def _check_args(out: Path, shards: int, per_shard: int, split: str) -> None:
    if shards < 1:
        raise ValueError(f"--shards must be at least 1, got {shards}")
    if per_shard < 1:
        raise ValueError(f"--per-shard must be at least 1, got {per_shard}")
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create output directory {out}: {e.strerror}") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {out} is not writable")


def write_shard(path: Path, split: str, seed: int, shard: int, per_shard: int, spec: WorldSpec) -> None:
    def fill(tmp: Path) -> None:
        # A fixed mtime makes shards byte-for-byte reproducible from their seed.
        with wds.TarWriter(str(tmp), mtime=0) as sink:
            for i in range(per_shard):
                image, meta = render(split, seed, shard, i, spec)
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                sink.write({"__key__": meta["key"], "png": buf.getvalue(), "json": json.dumps(meta).encode()})

    place_atomic(path, fill)  # a reader never sees half a tar


def make_shards(out, shards: int, per_shard: int, seed: int = 0, split: str = "train",
                spec: WorldSpec = WorldSpec(), progress: bool = False) -> list[Path]:
    """Write `shards` tar files of `per_shard` samples each; returns their paths."""
    out = Path(out)
    _check_args(out, shards, per_shard, split)
    paths = [out / shard_name(split, s) for s in range(shards)]
    iterator = range(shards)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc=f"{split} shards", unit="shard")
    for s in iterator:
        write_shard(paths[s], split, seed, s, per_shard, spec)
    return paths

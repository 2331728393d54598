"""Executors of the per-shard work (vrc_dist/build/work.py): the bookkeeping they share, and the local one.

An executor takes the shards still to do, runs each through `process_shard`, and returns RunStats. Only the
driver records finished shards in the manifest (single writer, docs/CONTRACTS.md). `LocalExecutor` runs the
shards one after another in this process, with one loaded prober and no Ray: one machine without a cluster,
and fast tests of the pipeline. The Ray executor (actors, dynamic hand-out, retries) is in ray_executor.py.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

from vrc_dist.build.manifest import Manifest
from vrc_dist.build.schema import TABLES, table_path
from vrc_dist.build.work import process_shard
from vrc_dist.config import BuildConfig
from vrc_dist.data.shards import ShardSpec

log = logging.getLogger(__name__)
MODEL_INFO_VOLATILE = ("device",)  # may differ between runs without changing the metrics' meaning


@dataclass
class RunStats:
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    images_ok: int = 0
    images_error: int = 0
    images_skipped: int = 0  # known keys not probed (extend)
    tokens: int = 0
    candidates: int = 0
    actor_deaths: int = 0
    probe_seconds: float = 0.0  # from the model(s) being loaded to the last shard


def check_model(manifest: Manifest, info: dict) -> None:
    """A run directory holds one model's metrics: refuse to mix in another's."""
    recorded = manifest.data.get("model_info")
    if recorded is None:
        manifest.data["model_info"] = info
        manifest.save()
        return
    stable = lambda d: {k: v for k, v in d.items() if k not in MODEL_INFO_VOLATILE}  # noqa: E731
    if stable(recorded) != stable(info):
        raise ValueError(
            f"{manifest.path}: recorded for model {stable(recorded)}, this run has {stable(info)}; "
            "use another output directory or --overwrite"
        )


def failed_entry(spec: ShardSpec, error: str) -> dict:
    """The manifest entry of a shard that produced nothing."""
    return {"url": spec.url, "status": "failed", "error": error, "seconds": None,
            "images_ok": 0, "images_error": 0, "tokens": 0, "candidates": 0}


class ShardRecorder:
    """Adds each finished shard's entry to the run's stats and the manifest (the driver's only write)."""

    def __init__(self, stats: RunStats, manifest: Manifest, out_dir: Path):
        self.stats, self.manifest, self.out_dir = stats, manifest, Path(out_dir)

    def record(self, spec: ShardSpec, entry: dict, n_attempts: int) -> None:
        stats = self.stats
        entry["attempts"] = n_attempts
        if entry["status"] == "done":
            missing = [t for t in TABLES if not table_path(self.out_dir, t, spec.name).exists()]
            if missing:  # the work ran on a node that does not share this directory
                raise RuntimeError(f"shard {spec.name} finished but its {missing} files are not in {self.out_dir}: "
                                   "`out` must be a directory every node can write and the driver can read")
            stats.done.append(spec.name)
        else:
            stats.failed.append(spec.name)
            log.warning("shard %s failed: %s", spec.name, entry["error"])
        for k in ("images_ok", "images_error", "tokens", "candidates"):
            setattr(stats, k, getattr(stats, k) + entry[k])
        stats.images_skipped += entry.get("images_skipped", 0)
        self.manifest.record_shard(spec.name, entry)


class LocalExecutor:
    """Every shard in turn, in this process, through one prober (loaded from cfg.probe unless given)."""

    def __init__(self, cfg: BuildConfig, prober=None):
        self.cfg, self.prober = cfg, prober

    def run(self, specs: list[ShardSpec], out_dir: Path, manifest: Manifest,
            skip_keys: Container[str] = frozenset()) -> RunStats:
        stats = RunStats()
        if not specs:
            return stats
        if self.prober is None:
            from vrc_dist.probe.prober import Prober  # torch and the model load only when there is work

            self.prober = Prober(self.cfg.probe)
        check_model(manifest, self.prober.model_info)
        recorder = ShardRecorder(stats, manifest, out_dir)
        start = time.time()
        for spec in specs:
            entry = process_shard(self.prober, spec, out_dir, self.cfg.max_image_bytes, skip_keys=skip_keys)
            recorder.record(spec, entry, 1)
        stats.probe_seconds = time.time() - start
        return stats

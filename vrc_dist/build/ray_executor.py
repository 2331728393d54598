"""Distributor: probe actors on Ray, whole shards handed out dynamically, retried when an actor dies.

One actor per GPU (or N CPU actors on a CPU-only cluster) loads the model once. The driver keeps one
shard in flight per actor and gives the next shard to whichever actor finishes first, so fast actors
take more. An actor that dies mid-shard is restarted by Ray (max_restarts); the driver re-queues the
shard, which any actor may pick up. Only the driver writes the manifest, after each finished shard.
"""
from __future__ import annotations

import logging
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ray
from tqdm import tqdm

from vrc_dist.build.manifest import Manifest
from vrc_dist.build.schema import TABLES, table_path
from vrc_dist.build.work import FaultSwitch, process_shard
from vrc_dist.config import BuildConfig
from vrc_dist.data.shards import ShardSpec

log = logging.getLogger(__name__)
MODEL_INFO_VOLATILE = ("device",)  # may differ between runs without changing the metrics' meaning


class ProbeActor:
    """Holds one loaded Prober; wrapped with ray.remote at launch so resources come from the config."""

    def __init__(self, cfg: BuildConfig, out_dir: str, fault: FaultSwitch):
        from transformers.utils import logging as hf_logging

        from vrc_dist.probe.prober import Prober  # imported in the actor: torch and the model load on the worker

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor start, amid the run's own bar
        self.prober = Prober(cfg.probe)
        self.cfg, self.out_dir, self.fault = cfg, out_dir, fault

    def model_info(self) -> dict:
        return self.prober.model_info

    # Retried through a restart (Ray fails other calls to a restarting actor at once), so it returns
    # when the actor is back with its model loaded, and raises only if the actor is gone for good.
    @ray.method(max_task_retries=-1)
    def ready(self) -> bool:
        return True

    # The progress actor comes with each call, not to the constructor: Ray keeps an actor handle given to a
    # constructor in the object store, where a restart may find it gone (and logs an error for every actor).
    def run_shard(self, spec: ShardSpec, progress, skip_keys: frozenset = frozenset()) -> dict:
        last = [0.0]

        def report(images: int, tokens: int) -> None:
            if time.time() - last[0] > 0.5:  # a report per image would flood the progress actor
                last[0] = time.time()
                progress.report.remote(spec.name, images, tokens)

        entry = process_shard(self.prober, spec, self.out_dir, self.cfg.max_image_bytes, self.fault, report,
                              skip_keys)
        progress.report.remote(spec.name, entry["images_ok"] + entry["images_error"], entry["tokens"])
        return entry


@ray.remote(num_cpus=0)
class Progress:
    """Images and tokens per shard, as absolute counts: a retried shard overwrites its dead attempt's."""

    def __init__(self):
        self.counts: dict[str, tuple[int, int]] = {}

    def report(self, shard: str, images: int, tokens: int) -> None:
        self.counts[shard] = (images, tokens)

    def totals(self) -> tuple[int, int]:
        return sum(c[0] for c in self.counts.values()), sum(c[1] for c in self.counts.values())


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
    probe_seconds: float = 0.0  # from the actors being ready (model loaded) to the last shard


def actor_options(cfg: BuildConfig) -> tuple[int, dict]:
    """How many probe actors, and the resources of each: GPUs when the cluster has them."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus and cfg.gpus_per_actor > 0:
        n = cfg.actors or max(1, int(gpus // cfg.gpus_per_actor))
        return n, {"num_gpus": cfg.gpus_per_actor, "num_cpus": cfg.cpus_per_actor}
    return cfg.actors or 2, {"num_cpus": cfg.cpus_per_actor}


def start_actors(cfg: BuildConfig, out_dir: Path) -> tuple[list, dict]:
    n, resources = actor_options(cfg)
    cpus = ray.cluster_resources().get("CPU", 0)
    if "num_gpus" not in resources and n * cfg.cpus_per_actor > cpus:
        log.warning("%d actors x %s CPUs exceed the cluster's %s CPUs: some wait for resources", n, cfg.cpus_per_actor, cpus)
    remote = ray.remote(ProbeActor).options(max_restarts=cfg.max_retries, max_task_retries=0, **resources)
    fault = FaultSwitch.from_env()
    actors = [remote.remote(cfg, str(out_dir), fault) for _ in range(n)]
    try:
        infos = ray.get([a.model_info.remote() for a in actors])
    except ray.exceptions.RayError as e:
        raise RuntimeError(f"probe actors could not load model {cfg.probe.model!r}: {e}") from e
    log.info("%d probe actors ready (%s each)", n, resources)
    return actors, infos[0]


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


def run_shards(cfg: BuildConfig, specs: list[ShardSpec], out_dir: Path, manifest: Manifest,
               skip_keys: frozenset = frozenset()) -> RunStats:
    """Probe `specs` on the connected Ray cluster, recording each finished shard in the manifest.

    Images whose key is in `skip_keys` are not probed (extend: already in the parent's datasets). The set
    goes to the object store once; every shard call reads it from there.
    """
    stats = RunStats()
    if not specs:
        return stats
    skip = ray.put(frozenset(skip_keys)) if skip_keys else frozenset()
    progress = Progress.remote()
    actors, info = start_actors(cfg, out_dir)
    check_model(manifest, info)
    ready_at = time.time()

    queue = deque(specs)
    attempts: dict[str, int] = {}
    inflight: dict = {}  # ref -> (actor index, shard, or None for a ready() call)
    idle = set(range(len(actors)))

    def dispatch() -> None:
        while idle and queue:
            i, spec = idle.pop(), queue.popleft()
            inflight[actors[i].run_shard.remote(spec, progress, skip)] = (i, spec)

    def record(spec: ShardSpec, entry: dict, n_attempts: int) -> None:
        entry["attempts"] = n_attempts
        if entry["status"] == "done":
            missing = [t for t in TABLES if not table_path(out_dir, t, spec.name).exists()]
            if missing:  # the actor ran on a node that does not share this directory
                raise RuntimeError(f"shard {spec.name} finished but its {missing} files are not in {out_dir}: "
                                   "`out` must be a directory every node can write and the driver can read")
            stats.done.append(spec.name)
        else:
            stats.failed.append(spec.name)
            log.warning("shard %s failed: %s", spec.name, entry["error"])
        for k in ("images_ok", "images_error", "tokens", "candidates"):
            setattr(stats, k, getattr(stats, k) + entry[k])
        stats.images_skipped += entry.get("images_skipped", 0)
        manifest.record_shard(spec.name, entry)

    dispatch()
    bar = tqdm(total=None, unit="img", desc="probe", file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10)

    def show() -> None:
        images, tokens = ray.get(progress.totals.remote())
        bar.update(images - bar.n)
        elapsed = bar.format_dict["elapsed"]
        bar.set_postfix(shards=f"{len(stats.done) + len(stats.failed)}/{len(specs)}",
                        tok_s=f"{tokens / elapsed:.0f}" if elapsed else "-", refresh=False)

    try:  # the bar closes however the loop ends, so a Ctrl-C's message is the last line
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            show()
            for ref in ready:
                i, spec = inflight.pop(ref)
                if spec is None:  # a restarted actor's ready() call
                    try:
                        ray.get(ref)
                        idle.add(i)
                    except ray.exceptions.RayActorError:
                        log.warning("actor %d did not come back; retired", i)
                    continue
                try:
                    entry = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.ObjectLostError) as e:
                    died = isinstance(e, ray.exceptions.RayActorError)
                    stats.actor_deaths += died
                    attempts[spec.name] = attempts.get(spec.name, 0) + 1
                    reason = "the actor died" if died else (str(e).strip().splitlines() or [type(e).__name__])[-1]
                    if attempts[spec.name] > cfg.max_retries:
                        error = f"gave up after {attempts[spec.name]} attempts; last: {reason}"
                        record(spec, _failed(spec, error), attempts[spec.name])
                    else:
                        log.warning("shard %s attempt %d: %s; re-queued", spec.name, attempts[spec.name], reason)
                        queue.appendleft(spec)
                    if died:  # hand it work again once Ray has restarted it
                        inflight[actors[i].ready.remote()] = (i, None)
                        continue
                else:
                    record(spec, entry, attempts.get(spec.name, 0) + 1)
                idle.add(i)
            dispatch()
            if queue and not inflight and not idle:  # every actor retired: Ray gave up restarting them
                for spec in queue:
                    record(spec, _failed(spec, "no live probe actors left"), attempts.get(spec.name, 0))
                queue.clear()
        stats.probe_seconds = time.time() - ready_at
        show()
    finally:
        bar.close()
    for a in actors:
        ray.kill(a)
    ray.kill(progress)
    return stats


def _failed(spec: ShardSpec, error: str) -> dict:
    return {"url": spec.url, "status": "failed", "error": error, "seconds": None,
            "images_ok": 0, "images_error": 0, "tokens": 0, "candidates": 0}

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
from pathlib import Path

import ray
from tqdm import tqdm

from vrc_dist.build.executor import RunStats, ShardRecorder, check_model, failed_entry
from vrc_dist.build.manifest import Manifest
from vrc_dist.build.work import process_shard
from vrc_dist.config import BuildConfig
from vrc_dist.data.shards import ShardSpec

log = logging.getLogger(__name__)


class ProbeActor:
    """Holds one loaded Prober; wrapped with ray.remote at launch so resources come from the config."""

    def __init__(self, cfg: BuildConfig, out_dir: str):
        from transformers.utils import logging as hf_logging

        from vrc_dist.probe.prober import Prober  # imported in the actor: torch and the model load on the worker

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor start, amid the run's own bar
        self.prober = Prober(cfg.probe)
        self.cfg, self.out_dir = cfg, out_dir

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

        entry = process_shard(self.prober, spec, self.out_dir, self.cfg.max_image_bytes, on_progress=report,
                              skip_keys=skip_keys)
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
    actors = [remote.remote(cfg, str(out_dir)) for _ in range(n)]
    try:
        infos = ray.get([a.model_info.remote() for a in actors])
    except ray.exceptions.RayError as e:
        raise RuntimeError(f"probe actors could not load model {cfg.probe.model!r}: {e}") from e
    log.info("%d probe actors ready (%s each)", n, resources)
    return actors, infos[0]


class RayExecutor:
    """The shards on the connected Ray cluster: one in flight per probe actor, the next to whichever finishes
    first, a shard whose actor died re-queued (up to cfg.max_retries attempts), every finished one recorded.

    Images whose key is in `skip_keys` are not probed (extend: already in the parent's datasets). The set
    goes to the object store once; every shard call reads it from there.
    """

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg

    def run(self, specs: list[ShardSpec], out_dir: Path, manifest: Manifest,
            skip_keys: frozenset = frozenset()) -> RunStats:
        self.stats = RunStats()
        if not specs:
            return self.stats
        self.skip = ray.put(frozenset(skip_keys)) if skip_keys else frozenset()
        self.progress = Progress.remote()
        self.actors, info = start_actors(self.cfg, out_dir)
        check_model(manifest, info)
        ready_at = time.time()
        self.recorder = ShardRecorder(self.stats, manifest, out_dir)
        self.queue, self.attempts = deque(specs), {}
        self.inflight: dict = {}  # ref -> (actor index, shard, or None for a ready() call)
        self.idle = set(range(len(self.actors)))
        self._dispatch()
        bar = tqdm(total=None, unit="img", desc="probe", file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10)
        try:  # the bar closes however the loop ends, so a Ctrl-C's message is the last line
            while self.inflight:
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
                self._show(bar, len(specs))
                for ref in ready:
                    self._collect(ref)
                self._dispatch()
                if self.queue and not self.inflight and not self.idle:  # Ray gave up restarting every actor
                    for spec in self.queue:
                        self.recorder.record(spec, failed_entry(spec, "no live probe actors left"),
                                             self.attempts.get(spec.name, 0))
                    self.queue.clear()
            self.stats.probe_seconds = time.time() - ready_at
            self._show(bar, len(specs))
        finally:
            bar.close()
        for a in self.actors:
            ray.kill(a)
        ray.kill(self.progress)
        return self.stats

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            i, spec = self.idle.pop(), self.queue.popleft()
            self.inflight[self.actors[i].run_shard.remote(spec, self.progress, self.skip)] = (i, spec)

    def _show(self, bar, n_specs: int) -> None:
        images, tokens = ray.get(self.progress.totals.remote())
        bar.update(images - bar.n)
        elapsed = bar.format_dict["elapsed"]
        bar.set_postfix(shards=f"{len(self.stats.done) + len(self.stats.failed)}/{n_specs}",
                        tok_s=f"{tokens / elapsed:.0f}" if elapsed else "-", refresh=False)

    def _collect(self, ref) -> None:
        """Take one finished call: a restarted actor back, a shard's entry, or a shard's failed attempt."""
        i, spec = self.inflight.pop(ref)
        if spec is None:  # a restarted actor's ready() call
            try:
                ray.get(ref)
                self.idle.add(i)
            except ray.exceptions.RayActorError:
                log.warning("actor %d did not come back; retired", i)
            return
        try:
            entry = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.ObjectLostError) as e:
            if self._failed_attempt(i, spec, e):
                return
        else:
            self.recorder.record(spec, entry, self.attempts.get(spec.name, 0) + 1)
        self.idle.add(i)

    def _failed_attempt(self, i: int, spec: ShardSpec, e: Exception) -> bool:
        """Re-queue the shard, or record it as failed after its last attempt; True if the actor died (it
        gets work again once Ray has restarted it)."""
        died = isinstance(e, ray.exceptions.RayActorError)
        self.stats.actor_deaths += died
        n = self.attempts[spec.name] = self.attempts.get(spec.name, 0) + 1
        reason = "the actor died" if died else (str(e).strip().splitlines() or [type(e).__name__])[-1]
        if n > self.cfg.max_retries:
            self.recorder.record(spec, failed_entry(spec, f"gave up after {n} attempts; last: {reason}"), n)
        else:
            log.warning("shard %s attempt %d: %s; re-queued", spec.name, n, reason)
            self.queue.appendleft(spec)
        if died:
            self.inflight[self.actors[i].ready.remote()] = (i, None)
        return died

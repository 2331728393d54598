"""Extend a codebook (docs/CONTRACTS.md): probe only images its parent version has not seen, then re-cluster the
parent's candidate pool plus the new candidates and commit the next version.

The parent version's pool lives in the codebook directory (vrc_dist/codebook/format.py), so extension needs nothing
but the codebook and the new shards. The pool's images files give the image keys already seen, ok or error:
those are skipped one by one (so an image is never probed, or clustered, twice). A shard given again is read,
but all its images are skipped: shards are not recognised by URL, which would tie the codebook to the paths
of the machine that built it. Keys are image identity here, as in clustering and provenance: two different
images with one key count as one.

The probe settings are the parent's, always: a different model or different thresholds would mix two kinds
of candidates in one pool. A config or `--set` that changes them (anything but the speed-only
`probe.token_budget` and `probe.device`) is refused before any model runs. Cluster settings default to the
parent's too; overriding them is allowed (logged, and recorded in the new version's params), but then the
new version is no longer what a fresh build with the parent's settings gives.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pyarrow.parquet as pq

from vrc_dist import config
from vrc_dist.build.manifest import Manifest
from vrc_dist.build.pipeline import NothingProcessed, format_summary, run_metrics
from vrc_dist.codebook.clustering import (
    PROBE_SPEED_ONLY,
    ClusteringError,
    build_version,
    check_extendable,
    check_new_images,
    dataset_entries,
)
from vrc_dist.codebook.format import CodebookError, StaleParent, parse_version
from vrc_dist.codebook.store import Codebook
from vrc_dist.config import BuildConfig, ConfigError, to_dict

log = logging.getLogger(__name__)


class ExtendError(ValueError):
    """The extension cannot be made as asked (nothing new, a changed probe, an unusable parent)."""


def open_parent(codebook: str | Path, parent: int | str | None = None) -> Codebook:
    """The parent version (default: the latest), verified, with the probe settings extension needs."""
    base = Codebook.open(codebook, version=None if parent is None else parse_version(parent))
    try:
        check_extendable(base)
    except CodebookError as e:
        raise ExtendError(str(e)) from None
    probe = base.params.get("probe")
    if not isinstance(probe, dict) or "model" not in probe:
        raise ExtendError(f"v{base.version:04d} of {base.path} records no probe settings ({probe!r}), so new "
                          "images cannot be probed the way its candidates were; build a fresh codebook instead")
    return base


def extend_config(parent: Codebook, config_path: str | None = None, overrides: list[str] | None = None,
                  **flags) -> BuildConfig:
    """The run's BuildConfig: the parent's probe and cluster settings, then the config file, `--set` overrides
    and flags (model, shards, out, actors) on top. Refuses any change to what the probe computes."""
    data = {"probe": dict(parent.params["probe"]), "cluster": dict(parent.params.get("cluster") or {})}
    user = config.read_config_file(config_path) if config_path else {}
    for o in overrides or []:
        config.apply_override(user, o)
    for section in ("probe", "cluster"):
        if section in user:
            if not isinstance(user[section], dict):
                raise ConfigError(f"config.{section}: expected a mapping, got {type(user[section]).__name__}")
            data[section].update(user.pop(section))
    data.update(user)
    if flags.get("model"):
        data["probe"]["model"] = flags["model"]
    for key in ("shards", "out", "actors"):
        if flags.get(key) is not None:
            data[key] = flags[key]
    data["codebook"] = str(parent.path)
    cfg = config.from_dict(BuildConfig, data)

    where = f"v{parent.version:04d} of {parent.path}"
    recorded = config.to_dict(config.from_dict(config.ProbeConfig, parent.params["probe"], f"{where} probe"))
    changed = {k: (recorded[k], v) for k, v in to_dict(cfg.probe).items()
               if k not in PROBE_SPEED_ONLY and v != recorded[k]}
    if changed:
        detail = ", ".join(f"probe.{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ExtendError(f"extending {where} must probe with the settings it was built with; this run changes "
                          f"{detail}. Drop those settings, or build a new codebook")
    cluster = parent.params.get("cluster") or {}
    moved = {k: (cluster.get(k), v) for k, v in to_dict(cfg.cluster).items() if cluster.get(k) != v}
    if moved:
        log.warning("cluster settings differ from %s's: %s; the new version will not equal a fresh build with "
                    "the parent's settings", where, moved)
    return cfg


def known_images(parent: Codebook) -> frozenset[str]:
    """Image keys in the parent's pool, ok or error (from its images files; a candidates file stands in for a
    dataset that had none)."""
    keys: set[str] = set()
    for e in parent.params["pool"]:
        f = parent.pool_file(e["images"] or e["candidates"], f"params.json of v{parent.version:04d}")
        keys.update(pq.read_table(f, columns=["key"]).column("key").to_pylist())
    return frozenset(keys)


def run_extend(cfg: BuildConfig, parent: Codebook) -> dict:
    """Probe the new images of cfg.shards into cfg.out, then commit the next version of the parent's codebook.

    Returns the metrics summary with `extend` (the counts also written to the run's manifest) and `version`.
    """
    where = f"v{parent.version:04d}"
    latest = parent.versions()[-1]  # what this run starts from: a version committed meanwhile must not be forked
    out = Path(cfg.out).resolve()
    if Manifest.load(out) is not None:  # a resumed extension, or an --out that is already in the pool
        try:
            check_new_images(parent.params["pool"], dataset_entries(out)[0], f"{where}'s pool")
        except ClusteringError as e:
            raise ExtendError(f"--out {out}: {e} (was this extension committed as {where}?); give a new --out") \
                from None
    known = known_images(parent)
    log.info("extending %s of %s: %d known image keys are skipped", where, parent.path, len(known))

    summary = run_metrics(cfg, skip_keys=known)
    manifest = Manifest.load(out)
    done = [manifest.shards[n] for n in manifest.done()]
    counts = {
        "codebook": str(parent.path),
        "parent": parent.version,
        "images_skipped": sum(e.get("images_skipped", 0) for e in done),  # read, key known: not probed
        "images_probed": sum(e["images_ok"] + e["images_error"] for e in done),
        "version": None,
    }
    manifest.data["extend"] = counts
    manifest.save()

    model_id = (manifest.data.get("model_info") or {}).get("model_id")
    try:
        version = build_version(parent.path, [out], cfg.cluster, parent=parent.version, model_id=model_id,
                                probe=to_dict(cfg.probe), latest=latest)
    except StaleParent as e:
        raise ExtendError(f"{e}; re-run the extend on v{e.latest:04d} (--parent {e.latest}, or no --parent): "
                          "the metrics already probed in --out are reused") from None
    counts["version"] = version
    manifest.data["extend"] = counts
    manifest.save()
    return {**summary, "extend": counts, "version": version}


def format_extend(summary: dict) -> str:
    e = summary["extend"]
    return (f"extend: {e['images_probed']} images probed; skipped {e['images_skipped']} images already in "
            f"v{e['parent']:04d}\ncodebook: {e['codebook']} v{summary['version']:04d} (parent v{e['parent']:04d})")


def execute(parent: Codebook, cfg: BuildConfig) -> int:
    """Run on the already connected Ray; print the summaries; 1 if no new image could be processed."""
    try:
        summary = run_extend(cfg, parent)
    except NothingProcessed as e:
        print(f"extend failed: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary), flush=True)
    print(format_extend(summary), flush=True)
    return 0


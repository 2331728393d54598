"""Extend a codebook (DESIGN.md §5): probe only images its parent version has not seen, then re-cluster the
parent's candidate pool plus the new candidates and commit the next version.

The parent version's params record the metric datasets it was built from. Their manifests name the shards
they hold (skipped whole when given again: same URL, status done) and their `images` tables the image keys
(skipped one by one inside a new shard, so an image is never probed, or clustered, twice). Keys are image
identity here, as in clustering and provenance: two different images with one key count as one.

The probe settings are the parent's, always: a different model or different thresholds would mix two kinds
of candidates in one pool. A config or `--set` that changes them (anything but the speed-only
`probe.token_budget` and `probe.device`) is refused before any model runs. Cluster settings default to the
parent's too; overriding them is allowed (logged, and recorded in the new version's params), but then the
new version is no longer what a fresh build with the parent's settings gives.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from vrc_dist import build, config
from vrc_dist.codebook import Codebook, parse_version
from vrc_dist.config import BuildConfig, ConfigError, to_dict
from vrc_dist.metrics_store import Manifest, read_table
from vrc_dist.shards import SHARDS_HELP, expand_shards

log = logging.getLogger(__name__)


class ExtendError(ValueError):
    """The extension cannot be made as asked (nothing new, a changed probe, an unusable parent)."""


@dataclasses.dataclass
class Known:
    """What the parent's datasets already hold."""

    urls: dict[str, int]  # shard URL (status done) -> images it held (ok + error)
    keys: frozenset[str]  # image keys, ok or error


def open_parent(codebook: str | Path, parent: int | str | None = None) -> Codebook:
    """The parent version (default: the latest), verified, with the probe settings extension needs."""
    base = Codebook.open(codebook, version=None if parent is None else parse_version(parent))
    where = f"v{base.version:04d} of {base.path}"
    if "imported_from" in base.params:
        raise ExtendError(f"{where} was imported and has no candidate pool to extend")
    probe = base.params.get("probe")
    if not isinstance(probe, dict) or "model" not in probe:
        raise ExtendError(f"{where} records no probe settings ({probe!r}), so new images cannot be probed "
                          "the way its candidates were; build a fresh codebook instead")
    if not base.params.get("datasets"):
        raise ExtendError(f"{where} records no metric datasets")
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
               if k not in build.PROBE_SPEED_ONLY and v != recorded[k]}
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


def known_images(dataset_dirs: list[str]) -> Known:
    """Shard URLs and image keys already in the parent's metric datasets."""
    urls: dict[str, int] = {}
    keys: set[str] = set()
    for d in dataset_dirs:
        manifest = Manifest.load(d)
        if manifest is None:  # a bare candidates directory: its candidates' keys are all there is to know
            if not (Path(d) / "candidates").is_dir():
                raise ExtendError(f"parent dataset {d} is gone (no manifest.json, no candidates/)")
            log.warning("parent dataset %s has no manifest: skipping by candidate keys only", d)
            import pyarrow.parquet as pq

            for f in sorted((Path(d) / "candidates").glob("*.parquet")):
                keys.update(pq.read_table(f, columns=["key"]).column("key").to_pylist())
            continue
        for entry in manifest.shards.values():
            if entry["status"] == "done":
                urls[entry["url"]] = entry["images_ok"] + entry["images_error"]
        keys.update(read_table(d, "images", ["key"]).column("key").to_pylist())
    return Known(urls, frozenset(keys))


def run_extend(cfg: BuildConfig, parent: Codebook) -> dict:
    """Probe the new images of cfg.shards into cfg.out, then commit the next version of the parent's codebook.

    Returns the metrics summary with `extend` (the counts also written to the run's manifest) and `version`.
    """
    where = f"v{parent.version:04d}"
    datasets = [d["path"] for d in parent.params["datasets"]]
    out = Path(cfg.out).resolve()
    if str(out) in datasets:
        raise ExtendError(f"--out {out} is already a dataset of {where} (was this extension committed as "
                          f"{where}?); give a new --out")
    known = known_images(datasets)
    specs = expand_shards(cfg.shards)
    present = [s for s in specs if s.url in known.urls]
    todo = [s for s in specs if s.url not in known.urls]
    if not todo:
        raise ExtendError(f"all {len(specs)} shards are already in {where}'s datasets: nothing new to extend with")
    log.info("extending %s of %s: %d shards already in it, %d to read; %d known image keys skipped inside them",
             where, parent.path, len(present), len(todo), len(known.keys))

    summary = build.run_metrics(cfg, todo, known.keys)
    manifest = Manifest.load(out)
    done = [manifest.shards[n] for n in manifest.done()]
    counts = {
        "codebook": str(parent.path),
        "parent": parent.version,
        "parent_datasets": datasets,
        "shards_in_parent": {s.name: s.url for s in present},
        "images_in_parent_shards": sum(known.urls[s.url] for s in present),  # not read at all
        "images_skipped": sum(e.get("images_skipped", 0) for e in done),  # read, key known: not probed
        "images_probed": sum(e["images_ok"] + e["images_error"] for e in done),
        "version": None,
    }
    manifest.data["extend"] = counts
    manifest.save()

    from vrc_dist.clustering import build_version

    model_id = (manifest.data.get("model_info") or {}).get("model_id")
    version = build_version(parent.path, [out], cfg.cluster, parent=parent.version, model_id=model_id,
                            probe=to_dict(cfg.probe))
    counts["version"] = version
    manifest.data["extend"] = counts
    manifest.save()
    return {**summary, "extend": counts, "version": version}


def format_extend(summary: dict) -> str:
    e = summary["extend"]
    return (f"extend: {e['images_probed']} images probed; skipped {e['images_skipped']} known images in new shards "
            f"and {len(e['shards_in_parent'])} shards ({e['images_in_parent_shards']} images) already in "
            f"v{e['parent']:04d}\ncodebook: {e['codebook']} v{summary['version']:04d} (parent v{e['parent']:04d})")


# --- command line (shared by `vrc extend` and jobs/extend_codebook.py) --------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codebook", required=True, help="codebook directory to extend")
    p.add_argument("--parent", help="version to extend (default: the latest)")
    p.add_argument("--shards", action="append", required=True,
                   help=f"{SHARDS_HELP}; shards and images the parent has are skipped")
    p.add_argument("--out", required=True, help="new output directory for the new images' metrics dataset")
    p.add_argument("--actors", type=int, help="number of probe actors (default: one per GPU, else 2)")
    p.add_argument("--config", help="YAML/TOML BuildConfig; probe settings must equal the parent's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. actors=4 or cluster.use_gpu=true (probe settings must equal the parent's)")
    p.add_argument("--model", help="checked against the parent's model (it cannot change)")


def prepare(args: argparse.Namespace) -> tuple[Codebook, BuildConfig]:
    parent = open_parent(args.codebook, args.parent)
    cfg = extend_config(parent, args.config, args.set, model=args.model, shards=args.shards, out=args.out,
                        actors=args.actors)
    return parent, cfg


def execute(parent: Codebook, cfg: BuildConfig) -> int:
    """Run on the already connected Ray; print the summaries; 1 if no new image could be processed."""
    try:
        summary = run_extend(cfg, parent)
    except build.NothingProcessed as e:
        print(f"extend failed: {e}", file=sys.stderr)
        return 1
    print(build.format_summary(summary), flush=True)
    print(format_extend(summary), flush=True)
    return 0


"""`vrc build`: the Ray build on a local, loopback-only Ray instance (no cluster needed).

The same arguments drive `jobs/build_codebook.py` on a cluster: a config file, `--set key=value`
overrides, and flag shortcuts, applied in that order.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from vrc_dist.config import BuildConfig, check_ranges, config_source, load
from vrc_dist.shards import SHARDS_HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/TOML BuildConfig")
    p.add_argument("--preset", help="a shipped BuildConfig by name instead of --config, e.g. reference-llava15")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. probe.k_global=8")
    p.add_argument("--model", help="toy, or a LLaVA checkpoint directory (sets probe.model)")
    p.add_argument("--shards", action="append", help=f"{SHARDS_HELP}; sets the config's shards")
    p.add_argument("--out", help="output directory of the metrics dataset")
    p.add_argument("--actors", type=int, help="number of probe actors (default: one per GPU, else 2)")
    p.add_argument("--codebook", help="codebook directory to commit a version into after the metrics")
    p.add_argument("--overwrite", action="store_true", help="redo shards that are already done")
    p.add_argument("--new-lineage", action="store_true",
                   help="commit into --codebook even though its latest version was probed with other settings")


def reject_relative_paths(parser: argparse.ArgumentParser, paths: list[str]) -> None:
    """For Ray job entry points: a job runs in a temporary copy of the working dir, so relative paths
    would land (or be looked up) there."""
    relative = [p for p in paths if "://" not in p and not p.startswith(("pipe:", "/"))]
    if relative:
        parser.error(f"use absolute paths in a Ray job (it runs in a temporary copy of the working dir): {relative}")


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    cfg = load(BuildConfig, config_source(args.config, getattr(args, "preset", None)), args.set)
    # Flags are set directly, not as `key=value` overrides: a path or a brace glob is not always valid YAML.
    if args.model:
        cfg.probe.model = args.model
    if args.shards:
        cfg.shards = list(args.shards)
    for key in ("out", "actors", "codebook"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    cfg.overwrite = cfg.overwrite or args.overwrite
    cfg.new_lineage = cfg.new_lineage or args.new_lineage
    return check_ranges(cfg)  # the flags were set after load's checks


def execute(cfg: BuildConfig) -> int:
    """Run the pipeline on the already connected Ray; print the summary; 1 if nothing was processed."""
    from vrc_dist.build import NothingProcessed, format_summary, run_codebook, run_metrics

    try:
        summary = run_metrics(cfg)
    except NothingProcessed as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary), flush=True)  # before clustering, which can take a while or fail
    line = run_codebook(cfg)
    if line is not None:
        print(line)
    return 0


def _build(args) -> int:
    from vrc_dist.build import check_output

    cfg = config_from_args(args)
    check_output(cfg)  # before Ray takes its seconds to start
    return _on_local_ray(lambda: execute(cfg))


def _extend(args) -> int:
    from vrc_dist import extend

    parent, cfg = extend.prepare(args)  # settings are checked before Ray starts anything
    return _on_local_ray(lambda: extend.execute(parent, cfg))


def _on_local_ray(run) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if os.environ.get("RAY_ADDRESS"):
        import ray

        ray.init()
        try:
            return run()
        finally:
            ray.shutdown()
    from vrc_dist.local_ray import local_ray

    with local_ray():
        return run()


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help="probe shards into a metrics dataset (and a codebook) on local Ray")
    add_arguments(p)
    p.set_defaults(func=_build)

    from vrc_dist import extend

    p = subparsers.add_parser("extend", help="probe only new images, re-cluster with the parent's pool, commit the "
                                             "next codebook version (local Ray)")
    extend.add_arguments(p)
    p.set_defaults(func=_extend)

"""The arguments of a build and of an extension, shared by `vrc build` / `vrc extend` and their Ray jobs
(jobs/build_codebook.py, jobs/extend_codebook.py): a config file, `--set key=value` overrides, and flag
shortcuts, applied in that order.
"""
from __future__ import annotations

import argparse

from vrc_dist.build import extend
from vrc_dist.build.pipeline import check_output
from vrc_dist.codebook.store import Codebook
from vrc_dist.config import BuildConfig, add_config_arguments, check_ranges, config_source, load
from vrc_dist.data.shards import SHARDS_HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, "YAML/TOML BuildConfig", presets=True)
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



def add_extend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codebook", required=True, help="codebook directory to extend")
    p.add_argument("--parent", help="version to extend (default: the latest)")
    p.add_argument("--shards", action="append", required=True,
                   help=f"{SHARDS_HELP}; images the parent has are skipped")
    p.add_argument("--out", required=True, help="new output directory for the new images' metrics dataset")
    p.add_argument("--actors", type=int, help="number of probe actors (default: one per GPU, else 2)")
    add_config_arguments(p, "YAML/TOML BuildConfig; probe settings must equal the parent's",
                         "override, e.g. actors=4 or cluster.use_gpu=true (probe settings must equal the parent's)")
    p.add_argument("--model", help="checked against the parent's model (it cannot change)")


def prepare_extend(args: argparse.Namespace) -> tuple[Codebook, BuildConfig]:
    parent = extend.open_parent(args.codebook, args.parent)
    cfg = extend.extend_config(parent, args.config, args.set, model=args.model, shards=args.shards, out=args.out,
                        actors=args.actors)
    check_output(cfg)  # before Ray starts: an unusable --out is the user's to fix, in one line
    return parent, cfg

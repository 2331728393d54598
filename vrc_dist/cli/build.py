"""`vrc build`: the Ray build on a local, loopback-only Ray instance (no cluster needed).

The same arguments drive `jobs/build_codebook.py` on a cluster (vrc_dist/build/arguments.py).
"""
from __future__ import annotations

from vrc_dist.build.arguments import add_arguments, config_from_args


def _build(args) -> int:
    from vrc_dist.build.local_ray import run_on_ray
    from vrc_dist.build.pipeline import check_output, execute

    cfg = config_from_args(args)
    check_output(cfg)  # before Ray takes its seconds to start
    return run_on_ray(lambda: execute(cfg))


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help="probe shards into a metrics dataset (and a codebook) on local Ray")
    add_arguments(p)
    p.set_defaults(func=_build)

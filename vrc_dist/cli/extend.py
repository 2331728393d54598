"""`vrc extend`: probe only new images, re-cluster with the parent's pool, commit the next codebook version,
on a local Ray (the same arguments drive `jobs/extend_codebook.py` on a cluster)."""
from __future__ import annotations

from vrc_dist.build.arguments import add_extend_arguments, prepare_extend


def _extend(args) -> int:
    from vrc_dist.build.extend import execute
    from vrc_dist.build.local_ray import run_on_ray

    parent, cfg = prepare_extend(args)  # settings are checked before Ray starts anything
    return run_on_ray(lambda: execute(parent, cfg))


def register(subparsers) -> None:
    p = subparsers.add_parser("extend", help="probe only new images, re-cluster with the parent's pool, commit the "
                                             "next codebook version (local Ray)")
    add_extend_arguments(p)
    p.set_defaults(func=_extend)

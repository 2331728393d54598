"""The private Ray instance of `vrc build` and `vrc extend` on one machine (cluster/README.md, "Local").

It listens on loopback only, authenticates with a token that lives only in this process's environment
(and the processes Ray starts from it), and leaves nothing in the user's home: a token file in ~/.ray
would switch the user's next `ray start --head` to token mode, and `ray job submit` would then fail.
"""
from __future__ import annotations

import logging
import os
import secrets
from contextlib import contextmanager

LOOPBACK = "127.0.0.1"


@contextmanager
def local_ray(**init_kwargs):
    """ray.init() a fresh loopback-only Ray for the `with` block; ray.shutdown() after it."""
    env = {
        # Otherwise Ray swaps 127.0.0.1 for the machine's routable address and listens there.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # A token Ray finds in the environment is one it does not generate and save to ~/.ray/auth_token.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by every process Ray starts, at its import
    import ray
    from ray._private import ray_constants
    from ray._raylet import Config

    # This process may have imported ray before the variables were set (the CLI does, registering its
    # subcommands), and Ray reads both once: the cluster switch into ray_constants at import, the auth
    # mode into its cached config, which Ray itself refreshes this way when it enables token auth.
    cluster_switch = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    Config.initialize("")
    try:
        # "local": a new instance even where `ray start` left a cluster address on this machine, which an
        # address of None would join (ray._private.services.get_ray_address_from_environment).
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, **init_kwargs)
        try:
            node_ip = ray.util.get_node_ip_address()
            if node_ip != LOOPBACK:  # a Ray upgrade that moved the switch must not go unnoticed
                raise RuntimeError(f"local Ray came up on {node_ip}, not {LOOPBACK}; refusing to run on it")
            yield
        finally:
            ray.shutdown()
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_switch
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        Config.initialize("")


def run_on_ray(run) -> int:
    """`run()` on the Ray of $RAY_ADDRESS when set, else on a fresh loopback-only local Ray (`local_ray`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if os.environ.get("RAY_ADDRESS"):
        import ray

        ray.init()
        try:
            return run()
        finally:
            ray.shutdown()
    with local_ray():
        return run()

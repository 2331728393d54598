"""The `vrc` command. Each stage module contributes its subcommands through `register(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import sys

from vrc_dist.shards import ShardError

# One line per module that adds subcommands; each defines register(subparsers).
SUBCOMMAND_MODULES = [
    "vrc_dist.toy.cli",
    "vrc_dist.build_cli",
    "vrc_dist.codebook_cli",
    "vrc_dist.probe_cli",
    "vrc_dist.eval_cli",
    "vrc_dist.doctor_cli",
    "vrc_dist.lmms.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vrc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except BrokenPipeError:  # `vrc ... | head`: the reader has what it wanted
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # Ctrl-C is the user's decision, not a bug to show a traceback for
        print(f"vrc {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, ShardError) as e:
        # Clear, one-line errors for bad input (a shard that is missing or broken too); tracebacks are for bugs.
        print(f"vrc {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `vrc` command: one module per subcommand in this package, each adding it through `register(subparsers)`.

The shared option blocks live beside what they configure, for the Ray jobs to parse with too: the
--config/--set block in vrc_dist/config.py, the build and extend arguments in vrc_dist/build/arguments.py.
The library never imports this package."""
from __future__ import annotations

import argparse
import importlib
import sys

from vrc_dist.data.shards import ShardError

# One line per module that adds subcommands; each defines register(subparsers).
SUBCOMMAND_MODULES = [
    "vrc_dist.toy.cli",
    "vrc_dist.cli.build",
    "vrc_dist.cli.extend",
    "vrc_dist.cli.codebook",
    "vrc_dist.cli.probe",
    "vrc_dist.cli.eval",
    "vrc_dist.cli.report",
    "vrc_dist.cli.doctor",
    "vrc_dist.cli.lmms",
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

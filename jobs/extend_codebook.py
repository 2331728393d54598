"""Ray job entry point of extend: `ray job submit --working-dir . -- python jobs/extend_codebook.py
--codebook DIR [--parent N] --shards GLOB --out DIR [--actors N] [--config CFG] [--set k=v]`.

Probes only the images the parent version (default: the latest) has not seen into the new metrics dataset
--out, then re-clusters the parent's candidate pool with the new candidates and commits the next version.
The probe settings are the parent's; see vrc_dist/build/extend.py.
"""
import logging
import sys
from pathlib import Path

# The job runs from an unpacked copy of the working dir: import the library shipped with it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

import ray  # noqa: E402

from vrc_dist.build.arguments import add_extend_arguments, prepare_extend, reject_relative_paths  # noqa: E402
from vrc_dist.build.extend import execute  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_extend_arguments(parser)
    args = parser.parse_args()
    reject_relative_paths(parser, [args.out, args.codebook, *args.shards])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        parent, cfg = prepare_extend(args)  # settings are checked before Ray starts anything
        ray.init(address="auto")
        return execute(parent, cfg)
    except (ValueError, FileNotFoundError) as e:  # bad input or settings: one clear line, no traceback
        print(f"extend_codebook: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

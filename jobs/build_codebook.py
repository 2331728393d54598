"""Ray job entry point of the build: `ray job submit --working-dir . -- python jobs/build_codebook.py ...`.

Takes the arguments of `vrc build` (--config CFG or --preset NAME, --set k=v, --model, --shards, --out, --actors,
--codebook, --overwrite) and runs the same pipeline on the cluster the job was submitted to.
"""
import logging
import sys
from pathlib import Path

# The job runs from an unpacked copy of the working dir: import the library shipped with it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

import ray  # noqa: E402

from vrc_dist.build.arguments import add_arguments, config_from_args, reject_relative_paths  # noqa: E402
from vrc_dist.build.pipeline import execute  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args())
    reject_relative_paths(parser, [cfg.out, *cfg.shards, *([cfg.codebook] if cfg.codebook else [])])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ray.init(address="auto")
    try:
        return execute(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad input or settings: one clear line, no traceback
        print(f"build_codebook: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

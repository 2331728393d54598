"""`python -m vrc_dist.cli`: the `vrc` command."""
import sys

from vrc_dist.cli import main

sys.exit(main())

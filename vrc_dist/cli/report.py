"""`vrc report`: pictures of a metrics dataset (vrc_dist/eval/report.py)."""
from __future__ import annotations

from vrc_dist.data.shards import SHARDS_HELP


def _report(args) -> int:
    from vrc_dist.eval.report import build_report

    page = build_report(args.run_dir, out=args.out, codebook=args.codebook, shards=args.shards,
                        n_images=args.images, keep=args.keep)
    print(f"wrote {page}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="pictures of a metrics dataset (Figure 4 deciles, overlays, codebook)")
    p.add_argument("run_dir", help="metrics dataset directory (tokens/, images/, candidates/)")
    p.add_argument("--out", help="where to write (default RUN_DIR/report)")
    p.add_argument("--codebook", help="codebook to picture (and to mark pruned tokens in overlays)")
    p.add_argument("--shards", action="append",
                   help=f"{SHARDS_HELP}; the images, for overlays on pixels (default: the run's own shards)")
    p.add_argument("--images", type=int, default=6, help="images to overlay")
    p.add_argument("--keep", type=float, default=0.111, help="keep ratio for the pruned marks")
    p.set_defaults(func=_report)

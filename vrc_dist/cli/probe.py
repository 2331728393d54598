"""`vrc probe`: the per-token metrics of one image, as a table on stdout or a Parquet file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vrc_dist.atomic import place_atomic
from vrc_dist.config import add_config_arguments

SHOWN = {  # column -> printf format, in table order
    "token_index": "{:>5d}", "row": "{:>3d}", "col": "{:>3d}", "cls_sim": "{:>7.3f}", "top1_prob": "{:>9.4f}",
    "top1_token": "{:>10.10}", "jsd_region": "{:>10.3e}", "jsd_global": "{:>10.3e}", "score": "{:>10.3e}",
    "low_info": "{!s:>5.5}", "image_cluster": "{:>3d}", "image_cluster_size": "{:>4d}", "candidate": "{!s:>5.5}",
}  # fmt: skip
HEADERS = {"token_index": "token", "image_cluster": "cl", "image_cluster_size": "size", "low_info": "low", "candidate": "cand"}


def register(subparsers) -> None:
    p = subparsers.add_parser("probe", help="probe one image's visual tokens (docs/METHOD.md steps 1-7)")
    p.add_argument("--model", help="toy, a LLaVA checkpoint directory, or a hub id in the local cache (default: config's)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--out", help="write the tokens table to this Parquet file instead of printing it")
    add_config_arguments(p, "YAML/TOML ProbeConfig, or a BuildConfig whose probe section is used (default: "
                            "vrc_dist/configs/toy.yaml for --model toy, else the reference values)",
                         "override a ProbeConfig field", presets=True)
    p.add_argument("--engine", choices=("batched", "reference"), default="batched")
    p.set_defaults(func=run)


def run(args) -> int:
    from vrc_dist.config import config_source, load_probe_config
    from vrc_dist.data.images import load_image
    from vrc_dist.probe.prober import Prober

    overrides = ([f"model={args.model}"] if args.model else []) + args.set
    cfg = load_probe_config(config_source(args.config, args.preset), overrides)
    image = load_image(Path(args.image), args.image)
    prober = Prober(cfg, engine=args.engine)
    result = prober.probe(image, Path(args.image).name)
    t = result.tokens
    summary = (
        f"{args.image}: grid {result.grid[0]}x{result.grid[1]}, answer {result.answer!r}, "
        f"{int(t['low_info'].sum())} low-info, {int(t['candidate'].sum())} candidates of {len(t['score'])} tokens"
    )
    if args.out:
        write_parquet(result, prober.model_info, cfg, Path(args.out))
        print(f"{summary}; wrote {args.out}")
        return 0
    print(summary)
    print(f"model {json.dumps(prober.model_info)}")
    print(format_table(result, prober.adapter.decode))
    return 0


def format_table(result, decode) -> str:
    columns = {**result.tokens, "top1_token": [decode(i) if i >= 0 else "-" for i in result.tokens["top1_token_id"]]}  # -1: not probed
    widths = [len(fmt.format(_example(columns[c][0]))) for c, fmt in SHOWN.items()]
    head = " ".join(HEADERS.get(c, c)[:w].rjust(w) for c, w in zip(SHOWN, widths))
    rows = [" ".join(fmt.format(_example(columns[c][i])) for c, fmt in SHOWN.items()) for i in range(len(result.tokens["score"]))]
    return "\n".join([head, *rows])


def _example(value):
    """Plain Python value, so format specs like {:d} and {!s} apply to numpy scalars."""
    return value.item() if isinstance(value, np.generic) else value


def write_parquet(result, model_info: dict, cfg, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vrc_dist.config import to_dict

    table = pa.table({"key": [result.key] * len(result.tokens["score"]), **result.tokens})
    meta = {"model_info": json.dumps(model_info), "probe_config": json.dumps(to_dict(cfg))}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    place_atomic(path, lambda tmp: pq.write_table(table, tmp))

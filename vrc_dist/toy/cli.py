"""`vrc toy make-shards | make-image | train | eval | makeup`: the embedded default world and model."""
from __future__ import annotations

import json
from pathlib import Path

from vrc_dist.config import add_config_arguments
from vrc_dist.data.shards import SHARDS_HELP
from vrc_dist.toy import TOY_MODEL_DIR


def _make_shards(args) -> int:
    from vrc_dist.toy.write_shards import make_shards

    paths = make_shards(args.out, args.shards, args.per_shard, seed=args.seed, split=args.split, progress=True)
    print(f"wrote {len(paths)} {args.split} shards x {args.per_shard} images to {args.out}")
    return 0


def _make_image(args) -> int:
    from vrc_dist.toy.world import render

    image, meta = render(args.split, args.seed, 0, args.index)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    print(f"wrote {out}: toy image {meta['key']}, answer {meta['answer']!r}")
    return 0


def _train(args) -> int:
    from vrc_dist.config import load
    from vrc_dist.toy.train import TrainConfig, train

    cfg = load(TrainConfig, args.config, [f"out={args.out}", *args.set])
    if args.shards:  # set directly: a brace pattern is not valid YAML for an override
        cfg.shards = args.shards
    print(json.dumps(train(cfg), indent=2))
    return 0


def _eval(args) -> int:
    from vrc_dist.model.loading import load_checkpoint, resolve_checkpoint
    from vrc_dist.toy.data import load_toy_samples
    from vrc_dist.toy.evaluate import format_accuracy, toy_accuracy

    samples = load_toy_samples(args.shards)
    model, processor = load_checkpoint(args.model)
    result = toy_accuracy(model, processor, samples)
    print(f"held-out accuracy of {args.model} on {len(samples)} images from {' '.join(args.shards)}:")
    print(format_accuracy(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.write_card:
        from vrc_dist.toy.card import write_model_card

        write_model_card(resolve_checkpoint(args.model), result, " ".join(args.shards), len(samples))
    return 0


def _makeup(args) -> int:
    from vrc_dist.codebook import Codebook
    from vrc_dist.toy.makeup import format_makeup, prototype_makeup

    cb = Codebook.open(args.codebook, args.version)
    makeup = prototype_makeup(cb.provenance.select(["key", "token_index"]).to_pylist())
    print(f"ground-truth make-up of {cb.path} v{cb.version:04d} (toy-world keys only):")
    print(format_makeup(makeup, cb.provenance.num_rows))
    return 0


def register(sub) -> None:
    toy = sub.add_parser("toy", help="the toy world and its tiny LLaVA").add_subparsers(dest="toy_command", required=True)

    p = toy.add_parser("make-shards", help="write synthetic WebDataset shards")
    p.add_argument("--out", required=True)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("train", "eval"), default="train")
    p.set_defaults(func=_make_shards)

    p = toy.add_parser("make-image", help="write one toy image as a PNG (for `vrc probe` and `vrc codebook query`)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", type=int, default=0, help="which image of the seed's first shard")
    p.add_argument("--split", choices=("train", "eval"), default="eval")
    p.set_defaults(func=_make_image)

    p = toy.add_parser("train", help="train the tiny LLaVA on train shards (CPU, minutes)")
    p.add_argument("--shards", action="append",
                   help=f"{SHARDS_HELP}; toy samples (default: the config's, else out/toy/train)")
    p.add_argument("--out", default=str(TOY_MODEL_DIR))
    add_config_arguments(p, "YAML/TOML TrainConfig", "override, e.g. steps=3000")
    p.set_defaults(func=_train)

    p = toy.add_parser("eval", help="held-out accuracy per question type")
    p.add_argument("--model", default="toy")
    p.add_argument("--shards", action="append", required=True, help=f"{SHARDS_HELP}; toy samples (the eval split)")
    p.add_argument("--json", help="also write the result as JSON")
    p.add_argument("--write-card", action="store_true", help="write the accuracy into the model's README.md")
    p.set_defaults(func=_eval)

    p = toy.add_parser("makeup", help="object / background / distractor shares of a toy codebook's prototypes")
    p.add_argument("--codebook", default="toy", help="toy, or a codebook directory built from toy shards")
    p.add_argument("--version", default=None, help="codebook version (default: the latest)")
    p.set_defaults(func=_makeup)

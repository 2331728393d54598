"""`vrc codebook list|show|diff|export|import|query`: inspect, compare, convert and query codebooks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vrc_dist.codebook.format import MANIFEST, codebooks_root, has_version_dirs, resolve_path, version_dir_name
from vrc_dist.codebook.interchange import export_reference, import_reference
from vrc_dist.codebook.store import Codebook


def register(subparsers) -> None:
    p = subparsers.add_parser("codebook", help="inspect, compare, convert and query redundancy codebooks")
    sub = p.add_subparsers(dest="codebook_command", required=True)
    where = {"help": "codebook directory, or `toy` for the toy model's codebook"}

    s = sub.add_parser("list", help="the codebooks under a root, or the versions of one codebook")
    s.add_argument("path", nargs="?", help="a codebook or a folder of codebooks, like --codebook")
    s.add_argument("--codebook", default=None,
                   help=f"a codebook or a folder of codebooks (default: $VRC_CODEBOOKS or {codebooks_root()})")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("repair", help="rebuild a lost or damaged manifest.json from the complete versions")
    s.add_argument("path", help="the codebook directory")
    s.add_argument("--name", default=None, help="needed only when no version records it")
    s.add_argument("--model-id", default=None, help="needed only when no version records it")
    s.set_defaults(func=cmd_repair)

    s = sub.add_parser("show", help="one version: parameters, inputs, clusters (verifies checksums)")
    s.add_argument("--codebook", required=True, **where)
    s.add_argument("--version", default=None, help="default: the latest")
    s.add_argument("--json", action="store_true", help="print the version's params.json")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("diff", help="what changed between two versions of a codebook")
    s.add_argument("--codebook", required=True, **where)
    s.add_argument("old")
    s.add_argument("new")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_diff)

    s = sub.add_parser("export", help="write a version in the reference format: PREFIX.pt and PREFIX.json")
    s.add_argument("--codebook", required=True, **where)
    s.add_argument("--version", default=None)
    s.add_argument("--out", required=True, help="output prefix")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("import", help="commit a reference-format .pt (+ .json sample ids) as the next version")
    s.add_argument("--codebook", required=True, **where)
    s.add_argument("pt", help="tensor [N, D] saved with torch.save (loaded with weights_only=True)")
    s.add_argument("ids", nargs="?", help="JSON list of N sample ids (key or key:token_index)")
    s.add_argument("--model-id", default=None, help="required when the codebook does not exist yet")
    s.add_argument("--name", default=None)
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("query", help="each visual token of an image: its nearest prototypes and redundancy")
    s.add_argument("--codebook", required=True, **where)
    s.add_argument("--version", default=None)
    s.add_argument("--model", required=True, help="`toy`, a checkpoint directory, or a hub id in the local cache")
    s.add_argument("--image", required=True)
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_query)


def cmd_list(args) -> None:
    if args.path and args.codebook and args.path != args.codebook:
        raise ValueError(f"two codebooks given ({args.path} and --codebook {args.codebook}): give one")
    given = args.path or args.codebook
    root = resolve_path(given) if given else codebooks_root()
    if given and not root.exists():
        raise FileNotFoundError(f"{given}: no such codebook or folder of codebooks")
    if (root / MANIFEST).exists() or has_version_dirs(root):
        cb = Codebook.at(root)  # without its manifest: says how to repair it
        print(f"{cb.name}  model={cb.model_id}  dim={cb.dim}  {root}")
        for v in cb.versions():
            p = cb.version_params(v)
            parent = version_dir_name(p["parent"]) if p["parent"] else "-"
            print(f"  {version_dir_name(v)}  parent={parent}  prototypes={p['n_prototypes']}  "
                  f"pool={len(p.get('pool', []))} shards  {p['created']}")
        return
    books = sorted(d for d in root.iterdir() if (d / MANIFEST).exists()) if root.is_dir() else []
    if not books:
        print(f"no codebooks in {root}")
    for d in books:
        cb = Codebook.at(d)
        versions = cb.versions()
        latest = version_dir_name(versions[-1]) if versions else "no versions"
        print(f"{d.name}  model={cb.model_id}  dim={cb.dim}  latest={latest}  ({len(versions)} versions)")


def cmd_repair(args) -> None:
    cb = Codebook.repair(args.path, args.name, args.model_id)
    print(f"{cb.path / MANIFEST}: rebuilt with {len(cb.versions())} versions ({cb.name}, model={cb.model_id}, "
          f"dim={cb.dim})")


def cmd_show(args) -> None:
    cb = Codebook.open(args.codebook, version=args.version)
    if args.json:
        print(json.dumps(cb.params, indent=2, sort_keys=True))
        return
    p = cb.params
    print(f"{cb.name} {version_dir_name(cb.version)}  ({cb.path}, checksums verified)")
    print(f"  model {cb.model_id}, dim {cb.dim}, {len(cb.vectors)} prototypes, created {p['created']}")
    print(f"  parent: {version_dir_name(p['parent']) if p['parent'] else 'none'}")
    if "imported_from" in p:
        print(f"  imported from {p['imported_from']['pt']} ({p['imported_from'].get('dtype', 'float32')})")
    for name, shards in _by_dataset(p.get("pool", [])).items():
        images = sum(e["n_images"] or 0 for e in shards)
        print(f"  pool: dataset {name}: {len(shards)} shards, {sum(e['n_candidates'] for e in shards)} candidates"
              f", {images} images")
    if p.get("cluster"):
        print(f"  cluster: {json.dumps(p['cluster'], sort_keys=True)}")
    if p.get("probe"):
        print(f"  probe: {json.dumps(p['probe'], sort_keys=True)}")
    stats = p.get("clustering")
    if stats:
        print(f"  {stats['n_candidates']} candidates from {stats['n_images']} images -> "
              f"{stats['n_kept_clusters']} of {stats['n_clusters']} clusters kept")
        for c in sorted(stats["clusters"], key=lambda c: -c["support"]):
            print(f"    cluster {c['cluster']:3d}  size {c['size']:6d}  images {c['support']:6d}"
                  f"{'  kept' if c['kept'] else ''}")


def cmd_diff(args) -> None:
    old = Codebook.open(args.codebook, version=args.old)
    new = Codebook.open(args.codebook, version=args.new)

    def tokens(cb):
        return {f"{r['key']}:{r['token_index']}" for r in cb.provenance.select(["key", "token_index"]).to_pylist()}

    def shards(cb):
        return {f"{e['dataset']}/{e['shard']} ({e['candidates'][:12]})" for e in cb.params.get("pool", [])}

    ignore = {"version", "parent", "created", "pool", "n_prototypes", "clustering"}
    a, b = _flatten({k: v for k, v in old.params.items() if k not in ignore}), _flatten(
        {k: v for k, v in new.params.items() if k not in ignore})
    report = {
        "old": old.version, "new": new.version,
        "prototypes": {"old": len(old.vectors), "new": len(new.vectors),
                       "added": len(tokens(new) - tokens(old)), "removed": len(tokens(old) - tokens(new)),
                       "common": len(tokens(old) & tokens(new))},
        "pool": {"added": sorted(shards(new) - shards(old)), "removed": sorted(shards(old) - shards(new))},
        "params_changed": {k: {"old": a.get(k), "new": b.get(k)} for k in sorted(a.keys() | b.keys())
                           if a.get(k) != b.get(k)},
    }
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return
    pr = report["prototypes"]
    print(f"{version_dir_name(old.version)} -> {version_dir_name(new.version)}: prototypes {pr['old']} -> {pr['new']} "
          f"(+{pr['added']} -{pr['removed']}, {pr['common']} common tokens)")
    for d in report["pool"]["added"]:
        print(f"  + pool shard {d}")
    for d in report["pool"]["removed"]:
        print(f"  - pool shard {d}")
    for k, change in report["params_changed"].items():
        print(f"  {k}: {json.dumps(change['old'], sort_keys=True)} -> {json.dumps(change['new'], sort_keys=True)}")


def _by_dataset(pool: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in pool:
        out.setdefault(e["dataset"], []).append(e)
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"cluster": {"seed": 0}} -> {"cluster.seed": 0}, so a diff names the one setting that changed."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def cmd_export(args) -> None:
    cb = Codebook.open(args.codebook, version=args.version)
    pt, js = export_reference(cb, args.out)
    print(f"{cb.name} {version_dir_name(cb.version)}: {len(cb.vectors)} x {cb.dim} -> {pt}, {js}")


def cmd_import(args) -> None:
    version = import_reference(args.pt, args.ids, args.codebook, model_id=args.model_id, name=args.name)
    print(f"imported {args.pt} as {version_dir_name(version)} of {resolve_path(args.codebook)}")


def cmd_query(args) -> None:
    # Imported here: the model stack (torch, transformers) is only needed by this subcommand.
    from vrc_dist.config import ProbeConfig
    from vrc_dist.data.images import load_image
    from vrc_dist.probe.prober import Prober

    cb = Codebook.open(args.codebook, version=args.version)
    image = load_image(Path(args.image), args.image)
    tokens, grid = Prober(ProbeConfig(model=args.model)).visual_tokens(image)
    cb.check_dim(tokens.shape[1], f"model {args.model}")
    sims, ids = cb.search(tokens, args.k)
    prov = cb.provenance.to_pylist()
    gh, gw = grid
    result = {
        "codebook": str(cb.path), "version": cb.version, "model": args.model, "image": args.image, "grid": [gh, gw],
        "tokens": [
            {"token_index": i, "row": i // gw, "col": i % gw, "redundancy": float(sims[i, 0]),
             "neighbours": [{"id": int(j), "similarity": float(s), **prov[j]} for s, j in zip(sims[i], ids[i])]}
            for i in range(len(tokens))
        ],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.image}: {len(tokens)} visual tokens ({gh}x{gw}) vs {cb.name} {version_dir_name(cb.version)} "
          f"({len(cb.vectors)} prototypes); redundancy = cosine to the nearest prototype")
    for t in result["tokens"]:
        near = "  ".join(f"#{n['id']} {n['similarity']:.3f} {n['key']}:{n['token_index']}" for n in t["neighbours"])
        print(f"  {t['token_index']:4d} ({t['row']:2d},{t['col']:2d})  {t['redundancy']:.3f}  {near}")
    print("redundancy map (x10, rows top to bottom):")
    for row in np.clip(sims[:, 0] * 10, 0, 9).astype(int).reshape(gh, gw):
        print("  " + " ".join(map(str, row)))

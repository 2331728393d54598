"""`vrc report RUN_DIR`: pictures of a metrics dataset, and of a codebook, on one Markdown page.

- deciles.png: top1_prob and the two divergences by [CLS]-similarity rank decile (the paper's Figure 4):
  does "the ViT finds it unimportant" agree with "the language model finds it uninformative"?
- overlay_<key>.png: per image, candidate tokens (redundant by the probe) and, with a codebook, the
  tokens codebook pruning removes at the given keep ratio (needs the pixels and the run's model).
- codebook_support.png, codebook_pca.png: distinct-image support of the prototypes, and their 2-D PCA.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vrc_dist.build.manifest import Manifest
from vrc_dist.build.read import read_table
from vrc_dist.data.images import ImageError, load_image
from vrc_dist.data.shards import ShardError, expand_shards, iter_samples

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def decile_table(tokens: dict[str, np.ndarray], grid_size: np.ndarray) -> dict[str, np.ndarray]:
    """Mean (and standard error) of each metric per decile of the per-image cls_sim rank (0 = most similar)."""
    decile = np.minimum(9, (10 * tokens["cls_sim_rank"] / grid_size).astype(int))
    table = {"decile": np.arange(10)}
    for col in ("top1_prob", "jsd_region", "jsd_global", "score"):
        v = tokens[col].astype(np.float64)
        groups = [v[(decile == d) & ~np.isnan(v)] for d in range(10)]  # NaN: a token probe.tokens left out
        table[col] = np.array([g.mean() if len(g) else np.nan for g in groups])
        table[col + "_se"] = np.array([g.std() / np.sqrt(len(g)) if len(g) > 1 else 0 for g in groups])
    return table


def plot_deciles(table: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    x = table["decile"] + 1
    panels = [("top1_prob", "single-input top-1 probability"),
              ("jsd_region", "region leave-one-out divergence"),
              ("jsd_global", "global leave-one-out divergence")]
    for ax, (col, title) in zip(axes, panels):
        ax.bar(x, table[col], yerr=table[col + "_se"], color="tab:blue", alpha=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("[CLS]-similarity rank decile (1 = most similar)")
        ax.set_xticks(x)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_overlay(key: str, grid: tuple[int, int], candidate: np.ndarray, pruned: np.ndarray | None,
                 pixels: np.ndarray | None, path: Path) -> None:
    """Candidates hatched red; pruned tokens greyed out (what the LLM no longer sees)."""
    plt = _plt()
    gh, gw = grid
    fig, ax = plt.subplots(figsize=(4, 4))
    if pixels is not None:
        ax.imshow(pixels, extent=(0, gw, gh, 0))
    else:
        ax.imshow(np.ones((gh, gw, 3)), extent=(0, gw, gh, 0))
    for i in range(gh * gw):
        r, c = divmod(i, gw)
        if pruned is not None and pruned[i]:
            ax.add_patch(plt.Rectangle((c, r), 1, 1, color="black", alpha=0.55, lw=0))
        if candidate[i]:
            ax.add_patch(plt.Rectangle((c + 0.05, r + 0.05), 0.9, 0.9, fill=False, ec="red", lw=1.2, hatch="//"))
    kept = "" if pruned is None else f", kept {int((~pruned).sum())}/{gh * gw} (dark: pruned)"
    ax.set_title(f"{key}\ncandidates {int(candidate.sum())} (red){kept}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_codebook(codebook, out: Path) -> list[tuple[str, str]]:
    plt = _plt()
    support = np.asarray(codebook.provenance.column("support").to_numpy(), dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(support, bins=30, color="tab:green")
    ax.set_xlabel("distinct images in the prototype's cluster (support)")
    ax.set_ylabel("prototypes")
    ax.set_title(f"{codebook.name} v{codebook.version:04d}: {len(support)} prototypes", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "codebook_support.png", dpi=110)
    plt.close(fig)

    x = codebook.vectors - codebook.vectors.mean(0)
    _, sv, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    explained = (sv[:2] ** 2).sum() / (sv ** 2).sum()
    fig, ax = plt.subplots(figsize=(5, 4))
    pts = ax.scatter(xy[:, 0], xy[:, 1], c=support, s=8, cmap="viridis")
    fig.colorbar(pts, label="support")
    ax.set_title(f"prototypes, PCA ({explained:.0%} of variance)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "codebook_pca.png", dpi=110)
    plt.close(fig)
    return [("Codebook support", "codebook_support.png"), ("Codebook prototypes, PCA", "codebook_pca.png")]


def read_pixels(shard_urls: list[str], keys: set[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The RGB arrays of `keys` from WebDataset shards (any image member), and why shards could not be read."""
    found, problems = {}, []
    for url in shard_urls:
        if len(found) == len(keys):
            break
        try:
            for sample in iter_samples(url):
                if sample.key in keys and sample.image is not None:
                    try:
                        found[sample.key] = np.asarray(load_image(sample.image, f"{url}:{sample.image_member}"))
                    except ImageError as e:
                        problems.append(str(e))
        except ShardError as e:  # samples read before the break count; the rest are reported as missing
            problems.append(str(e))
    return found, problems


def overlay_pixels(chosen: list[str], manifest, shards: list[str] | None) -> tuple[dict[str, np.ndarray], str]:
    """The pixels of the chosen images, from `shards` (any --shards form) or else the run's own shards, and a
    note naming the images not found there ('' if none). Not found in shards the user named is an error,
    since the overlays asked for would be blank; the run's own shards may have moved, so that is a warning."""
    urls = ([s.url for s in expand_shards(shards)] if shards else
            [e["url"] for e in manifest.shards.values() if e.get("url")])
    pixels, problems = read_pixels(urls, set(chosen))
    missing = [k for k in chosen if k not in pixels]
    if not missing:
        return pixels, ""
    where = f"--shards {' '.join(shards)}" if shards else "the run's recorded shards"
    note = (f"{len(missing)} of {len(chosen)} images not found in {where} ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}){''.join('; ' + p for p in problems)}")
    if shards:
        raise ValueError(note)
    note += ": their overlays have no pixels"
    log.warning("%s", note)
    return pixels, note


def pruned_masks(model_id: str, codebook, pixels: dict[str, np.ndarray], keep: float) -> dict[str, np.ndarray]:
    """Which tokens codebook pruning at `keep` removes from each image (the run's model computes the tokens,
    `vrc_dist.prune.CodebookMethod` chooses them, as at inference)."""
    import torch
    from PIL import Image

    from vrc_dist.model.loading import load_llava
    from vrc_dist.prune.methods import CodebookMethod

    adapter = load_llava(model_id, device="cpu", dtype="float32")
    method = CodebookMethod(codebook, keep=keep)
    method.attach(adapter.model)
    masks = {}
    with torch.no_grad():
        for key, arr in pixels.items():
            tokens = adapter.encode_image(Image.fromarray(arr)).tokens.float()
            pruned = np.ones(len(tokens), bool)
            pruned[method.reduce(tokens, 0)[1].numpy()] = False
            masks[key] = pruned
    return masks


def build_report(run_dir, out=None, codebook=None, shards=None, n_images: int = 6, keep: float = 0.111) -> Path:
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(run_dir)
    if manifest is None:
        raise FileNotFoundError(f"{run_dir}: no metrics manifest")
    table = read_table(run_dir, "tokens")
    tokens = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    images = read_table(run_dir, "images").to_pylist()
    ok = [im for im in images if im["status"] == "ok"]
    if not ok or not len(tokens["key"]):
        raise ValueError(f"{run_dir}: no successfully probed images to report on")
    grid_of = {im["key"]: (im["grid_h"], im["grid_w"]) for im in ok}
    size = np.array([grid_of[k][0] * grid_of[k][1] if k in grid_of else 1 for k in tokens["key"]])

    sections = []
    table = decile_table(tokens, size)
    plot_deciles(table, out / "deciles.png")
    rows = ["| decile | " + " | ".join(("top1_prob", "jsd_region", "jsd_global", "score")) + " |", "|---" * 5 + "|"]
    rows += [f"| {d + 1} | " + " | ".join(f"{table[c][d]:.4g}" for c in ("top1_prob", "jsd_region", "jsd_global",
                                                                         "score")) + " |" for d in range(10)]
    sections.append(("Metrics by [CLS]-similarity decile (paper Fig. 4)", "deciles.png", "\n".join(rows)))

    from vrc_dist.codebook.store import Codebook

    cb = None if codebook is None else Codebook.open(codebook)
    chosen = [im["key"] for im in ok[:n_images]]
    pixels, missing = overlay_pixels(chosen, manifest, shards)
    pruned = {}
    if cb is not None and pixels:
        pruned = pruned_masks(manifest.data["config"].get("probe", {}).get("model", "toy"), cb, pixels, keep)
        wrong = [k for k, m in pruned.items() if len(m) != grid_of[k][0] * grid_of[k][1]]
        if wrong:
            raise ValueError(f"the run's model gives {len(pruned[wrong[0]])} tokens for image {wrong[0]}, "
                             f"the metrics say {grid_of[wrong[0]]}: is the manifest's model the one probed?")
    for key in chosen:
        sel = tokens["key"] == key
        order = np.argsort(tokens["token_index"][sel])
        name = f"overlay_{key.replace('/', '_')}.png"
        plot_overlay(key, grid_of[key], tokens["candidate"][sel][order], pruned.get(key), pixels.get(key), out / name)
        sections.append((f"Image {key}", name, ""))
    if cb is not None:
        sections += [(title, name, "") for title, name in plot_codebook(cb, out)]

    n_cand = int(tokens["candidate"].sum())
    lines = [f"# vrc report: {run_dir}", "",
             f"{len(ok)} images ok ({len(images) - len(ok)} failed), {len(tokens['key'])} tokens, {n_cand} candidates; "
             f"divergence convention: {manifest.data.get('divergence')}."
             + ("" if cb is None else f" Codebook {cb.name} v{cb.version:04d}; pruned marks at keep {keep}.")
             + (f" Warning: {missing}." if missing else ""), ""]
    for title, image, text in sections:
        lines += [f"## {title}", "", f"![{title}]({image})", ""] + ([text, ""] if text else [])
    page = out / "index.md"
    page.write_text("\n".join(lines))
    return page

"""The build pipeline: metrics stage on Ray (shards -> Parquet) with its summary, then the codebook stage.

The caller connects to Ray first (`vrc build` starts a local one; a Ray job connects to its cluster).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from vrc_dist.build.manifest import Manifest, utc_now
from vrc_dist.build.schema import TABLES, table_path
from vrc_dist.build.writer import mark_duplicates, shard_counts
from vrc_dist.codebook.clustering import PROBE_SPEED_ONLY
from vrc_dist.config import BuildConfig, recorded_probe, to_dict
from vrc_dist.data.shards import ShardSpec, expand_shards

log = logging.getLogger(__name__)
DUPLICATE_MARK = "the earlier one in the run's shard order"  # ends the error of a duplicate's row
DUPLICATE_OF = "duplicate key {key!r}: kept in shard {owner}, " + DUPLICATE_MARK


class NothingProcessed(RuntimeError):
    """The run ended with no successfully probed image in the output: the job must fail, saying why."""


def check_output(cfg: BuildConfig) -> None:
    """Refuse an output directory that cannot be one, in a line naming it: cheap, so callers run it before Ray."""
    out = Path(cfg.out).resolve()
    if cfg.codebook and Path(cfg.codebook).resolve() == out:
        raise ValueError(f"--out and --codebook are both {out}: a metrics dataset and a codebook each need "
                         "a directory of their own (both have a manifest.json)")
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {cfg.out}: {parent} is a file, not a directory")
            return


def open_run(cfg: BuildConfig, specs: list[ShardSpec]) -> Manifest:
    """The output's manifest: fresh for a new directory or --overwrite, else the existing one, checked
    to have been made with the same probe settings (mixing two settings in one dataset is never right)."""
    check_output(cfg)
    out = Path(cfg.out)
    old = Manifest.load(out)
    config = to_dict(cfg)
    if old is None or cfg.overwrite:
        if old is not None:  # files this run will not rewrite would otherwise linger beside the new ones
            for name in old.shards:
                for t in TABLES:
                    table_path(out, t, name).unlink(missing_ok=True)
        manifest = Manifest.create(out, config)
        manifest.save()
        return manifest
    same = lambda probe: {k: v for k, v in recorded_probe(probe).items() if k not in PROBE_SPEED_ONLY}  # noqa: E731
    if same(old.data["config"]["probe"]) != same(config["probe"]):
        raise ValueError(f"{old.path} was made with probe settings {same(old.data['config']['probe'])}, "
                         f"this run has {same(config['probe'])}: use another --out, or --overwrite")
    for spec in specs:
        recorded = old.shards.get(spec.name, {}).get("url")
        if recorded not in (None, spec.url):
            raise ValueError(f"shard name {spec.name!r} is {recorded} in {old.path}, now {spec.url}: "
                             "use another --out, or --overwrite")
    return old


def run_metrics(cfg: BuildConfig, specs: list[ShardSpec] | None = None,
                skip_keys: frozenset[str] = frozenset(), executor=None) -> dict:
    """Probe every shard not yet done; returns this run's summary (also appended to the manifest).

    `specs` defaults to cfg.shards expanded; images whose key is in `skip_keys` are not probed (extend).
    `executor` runs the shards: the Ray executor on the connected cluster by default, or a LocalExecutor.
    """
    if executor is None:
        from vrc_dist.build.ray_executor import RayExecutor

        executor = RayExecutor(cfg)
    specs = expand_shards(cfg.shards) if specs is None else specs
    manifest = open_run(cfg, specs)
    done = set(manifest.done())
    todo = [s for s in specs if s.name not in done]
    log.info("%d shards: %d already done, %d to run", len(specs), len(specs) - len(todo), len(todo))
    start = time.time()
    stats = executor.run(todo, Path(cfg.out), manifest, skip_keys)
    duplicates = drop_duplicate_keys(Path(cfg.out), manifest, [s.name for s in specs])
    seconds = time.time() - start
    summary = {
        "shards": len(specs),
        "shards_skipped": len(specs) - len(todo),
        "shards_done": len(stats.done),
        "shards_failed": len(stats.failed),
        "images_ok": stats.images_ok,
        "images_error": stats.images_error,
        "images_duplicate": duplicates,  # in the whole output, this run's shards and earlier runs'
        "tokens": stats.tokens,
        "candidates": stats.candidates,
        "actor_deaths": stats.actor_deaths,
        "seconds": round(seconds, 2),
        "images_per_s": round(stats.images_ok / seconds, 3) if stats.images_ok else 0.0,
        "tokens_per_s": round(stats.tokens / seconds, 1) if stats.tokens else 0.0,
        # the same, excluding actor start-up and model loading: the rate a long run settles at
        "images_per_s_loaded": round(stats.images_ok / stats.probe_seconds, 3) if stats.images_ok else 0.0,
        "shard_errors": {n: e["error"] for n, e in manifest.shards.items() if e.get("error")},
        "out": str(Path(cfg.out).resolve()),
    }
    if skip_keys:
        summary["images_skipped"] = stats.images_skipped
    manifest.data["runs"].append({"finished": utc_now(), **summary})
    manifest.save()
    if sum(e["images_ok"] for e in manifest.shards.values() if e["status"] == "done") == 0:
        reasons = summary["shard_errors"]
        if not reasons:
            skipped = sum(e.get("images_skipped", 0) for e in manifest.shards.values())
            probed = sum(e["images_ok"] + e["images_error"] for e in manifest.shards.values())
            reasons = {"(images)": f"all {skipped} images are already in the parent's datasets: nothing new"
                       if skipped and not probed else "every image failed; see the images table's error column"}
        raise NothingProcessed(f"no image could be processed in {len(specs)} shards: {reasons}")
    return summary


def drop_duplicate_keys(out: Path, manifest: Manifest, order: list[str]) -> int:
    """Keys are image identity (README, "What a run writes"): an image key probed ok in two done shards keeps
    its rows in the first shard of `order` (then the other done shards, by name) and becomes an error row
    naming that shard in the others. Decided here, after every shard is in, from the files alone, so neither
    the actors' timing nor a resume can change which copy stays. Returns the duplicates in the output.

    Counts are taken from the files, so a manifest left behind by a driver killed between a rewrite and
    its record is corrected by the next run."""
    done = set(manifest.done())
    ranked = [n for n in dict.fromkeys(order) if n in done] + sorted(done - set(order))
    owner: dict[str, str] = {}
    total = 0
    for name in ranked:
        images = _read_images(out, name)
        reasons = {}
        for key in images.filter(pc.equal(images["status"], "ok"))["key"].to_pylist():
            if key in owner:
                reasons[key] = DUPLICATE_OF.format(key=key, owner=owner[key])
            else:
                owner[key] = name
        if reasons:
            log.warning("shard %s: %d image keys already in earlier shards, kept there", name, len(reasons))
            mark_duplicates(out, name, reasons)
            images = _read_images(out, name)
        errors = images.filter(pc.equal(images["status"], "error"))["error"].to_pylist()
        counts = {**shard_counts(out, name, images),
                  "images_duplicate": sum((e or "").endswith(DUPLICATE_MARK) for e in errors)}
        total += counts["images_duplicate"]
        entry = manifest.shards[name]
        if any(entry.get(k, 0) != v for k, v in counts.items()):
            manifest.record_shard(name, {**entry, **counts})
    return total


def _read_images(out: Path, shard: str):
    return pq.read_table(table_path(out, "images", shard), columns=["key", "status", "error"])


def run_codebook(cfg: BuildConfig) -> str | None:
    """Cluster the run's candidates into the next codebook version, when a codebook is configured; returns the
    line to report (the version committed, or why none was)."""
    if not cfg.codebook:
        return None
    from vrc_dist.codebook.clustering import AlreadyCommitted, build_version
    from vrc_dist.codebook.format import StaleParent

    model_info = Manifest.load(cfg.out).data.get("model_info") or {}
    try:
        version = build_version(cfg.codebook, [cfg.out], cfg.cluster, model_id=model_info.get("model_id"),
                                name=cfg.codebook_name, probe=to_dict(cfg.probe), new_lineage=cfg.new_lineage)
    except AlreadyCommitted as e:
        return str(e)
    except StaleParent as e:
        raise StaleParent(f"{e}; re-run the build to compare with v{e.latest:04d} (the metrics already probed "
                          "in --out are reused)", e.latest) from None
    return f"codebook: {cfg.codebook} v{version:04d}"


def format_summary(summary: dict) -> str:
    lines = [
        f"shards: {summary['shards_done']} done, {summary['shards_failed']} failed, "
        f"{summary['shards_skipped']} skipped (already done) of {summary['shards']}",
        f"images: {summary['images_ok']} ok, {summary['images_error']} with errors; "
        f"{summary['tokens']} tokens, {summary['candidates']} candidates"
        + (f"; {summary['images_duplicate']} duplicate keys in the output (kept in their first shard)"
           if summary.get("images_duplicate") else ""),
        f"metrics stage: {summary['seconds']:.1f} s, {summary['images_per_s']:.2f} images/s, "
        f"{summary['tokens_per_s']:.0f} tokens/s ({summary['images_per_s_loaded']:.2f} images/s once models were loaded)",
    ]
    if "images_skipped" in summary:
        lines[1] += f"; {summary['images_skipped']} skipped (already in the parent's datasets)"
    lines += [f"  shard {n}: {e}" for n, e in summary["shard_errors"].items()]
    lines.append(f"output: {summary['out']}")
    return "\n".join(lines)


def execute(cfg: BuildConfig) -> int:
    """Run the pipeline on the already connected Ray; print the summary; 1 if nothing was processed."""
    try:
        summary = run_metrics(cfg)
    except NothingProcessed as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary), flush=True)  # before clustering, which can take a while or fail
    line = run_codebook(cfg)
    if line is not None:
        print(line)
    return 0

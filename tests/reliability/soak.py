"""Soak run of the Ray build: many toy images, 2 actors; RSS per actor over time and throughput start vs end.

    .venv/bin/python tests/reliability/soak.py --images 5000 --per-shard 100 --json out/soak.json

Starts its own loopback Ray head (tests/ray_head.py: own temp dir, stopped by process tree in a finally),
writes toy shards, submits jobs/build_codebook.py with `ray job submit`, and every few seconds samples each
probe actor's RSS (/proc/PID/status VmRSS) and the images finished (the manifest's done shards). Prints a
table and writes the samples as JSON. `--model` defaults to the committed toy checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE.parent), str(HERE)]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def actor_pids(head) -> list[int]:
    from ray_head import process_tree

    pids = []
    for pid in process_tree(head.proc.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::ProbeActor"):
            pids.append(pid)
    return sorted(pids)


def images_done(out: Path) -> int:
    try:
        shards = json.loads((out / "manifest.json").read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(e["images_ok"] + e["images_error"] for e in shards.values() if e["status"] == "done")


def rate(samples: list[dict], lo: int, hi: int) -> float:
    """Images per second between the first samples at or past `lo` and `hi` images done."""
    a = next(s for s in samples if s["images"] >= lo)
    b = next(s for s in samples if s["images"] >= hi)
    return (b["images"] - a["images"]) / max(b["t"] - a["t"], 1e-9)


def soak(images: int, per_shard: int, model: str, work: Path, interval: float = 5.0, actors: int = 2,
         overrides: list[str] = ()) -> dict:
    from ray_head import LocalHead
    from rel_helpers import job_status

    from vrc_dist.toy.write_shards import make_shards

    n_shards = -(-images // per_shard)
    shards_dir, out = work / "shards", work / "out"
    if not shards_dir.exists():
        make_shards(shards_dir, shards=n_shards, per_shard=per_shard, seed=4242, split="train")
    head = LocalHead(num_cpus=actors)
    samples, sid = [], f"soak-{int(time.time())}"
    try:
        entry = ["python", "jobs/build_codebook.py", "--model", model, "--out", str(out), "--actors", str(actors),
                 "--shards", str(shards_dir / "*.tar")] + [a for o in overrides for a in ("--set", o)]
        r = head.submit(entry, str(REPO), wait=False, submission_id=sid)
        if r.returncode != 0:
            raise RuntimeError(r.stdout + r.stderr)
        t0 = time.time()
        while True:
            status = job_status(head, sid)
            pids = actor_pids(head)
            samples.append({"t": round(time.time() - t0, 2), "images": images_done(out),
                            "rss_mb": {str(p): rss_mb(p) for p in pids}})
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(interval)
        logs = head.ray("job", "logs", "--address", head.address, sid).stdout
    finally:
        head.stop()
    rows = {}
    if status == "SUCCEEDED":
        from vrc_dist.build.read import read_table
        from vrc_dist.build.schema import TABLES

        for t in TABLES:
            ids = read_table(out, t, columns=["shard", "key"] + (["token_index"] if t != "images" else []))
            rows[t] = {"rows": ids.num_rows, "distinct": ids.group_by(ids.column_names).aggregate([]).num_rows}
    return {"status": status, "images": images, "rows": rows, "shards": n_shards, "actors": actors, "samples": samples,
            "summary": summarize(samples, images), "log_tail": logs[-3000:], "out": str(out)}


def summarize(samples: list[dict], images: int) -> dict:
    loaded = [s for s in samples if s["images"] > 0 and s["rss_mb"]]  # models loaded, first shards done
    first, last = loaded[0], [s for s in loaded if s["rss_mb"]][-1]
    total = samples[-1]["images"]
    tenth = max(1, total // 10)
    start_rate = rate(samples, first["images"], first["images"] + 2 * tenth) if total > 3 * tenth else None
    end_rate = rate(samples, total - 2 * tenth, total) if total > 3 * tenth else None
    per_actor_start = {p: v for p, v in first["rss_mb"].items() if v}
    per_actor_end = {p: v for p, v in last["rss_mb"].items() if v}
    peak = max((v for s in samples for v in s["rss_mb"].values() if v), default=None)
    return {"images_done": total, "seconds": samples[-1]["t"], "images_per_s_start": start_rate,
            "images_per_s_end": end_rate, "rss_mb_start": per_actor_start, "rss_mb_end": per_actor_end,
            "rss_mb_peak": peak, "actor_pids_seen": sorted({p for s in samples for p in s["rss_mb"]})}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--model", default="toy")
    p.add_argument("--work", default="/tmp/vrc-soak")
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--json", help="write samples and summary here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="build config override")
    a = p.parse_args()
    result = soak(a.images, a.per_shard, a.model, Path(a.work), a.interval, a.actors, a.set)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
    s = result["summary"]
    print(f"status {result['status']}: {s['images_done']}/{a.images} images in {s['seconds']:.0f} s, {a.actors} actors")
    print(f"throughput images/s: start {s['images_per_s_start']:.2f}, end {s['images_per_s_end']:.2f}")
    for pid in s["rss_mb_start"]:
        print(f"actor {pid}: RSS start {s['rss_mb_start'][pid]:.0f} MB, end {s['rss_mb_end'].get(pid, float('nan')):.0f} MB")
    print(f"rows: {result['rows']}")
    print(f"peak actor RSS {s['rss_mb_peak']:.0f} MB; actor pids seen {s['actor_pids_seen']}")
    return 0 if result["status"] == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())

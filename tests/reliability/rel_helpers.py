"""Helpers of the reliability suite: hostile shard and image builders, a Ray-free driver (fakes: tests/fakes.py).

The Ray-free driver (`run_local`) runs the shards through the library's LocalExecutor, in one process. It lets
the fast tests drive the real reader, image loader and
writer over bad input without a cluster.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from PIL import Image

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
INJECT = Path(__file__).resolve().parent / "inject"  # test-only fault injection, see its sitecustomize.py



# ---- images ---------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png(size=(16, 16), color=(200, 10, 10)) -> bytes:
    return encode(Image.new("RGB", size, color))


# ---- shards ---------------------------------------------------------------------------------------------


def raw_tar(path: Path, members, mode: str = "w") -> Path:
    """A tar with exactly these members, in order: (name, bytes), or (name, TarInfo-type, linkname)."""
    with tarfile.open(path, mode) as tar:
        for m in members:
            info = tarfile.TarInfo(m[0])
            if len(m) == 3:
                info.type, info.linkname = m[1], m[2]
                tar.addfile(info)
            else:
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return path


def run_local(shard_paths, out, prober=None, config=None) -> dict:
    """Every shard through the library's LocalExecutor (no Ray) into `out`, recorded in its manifest."""
    from fakes import FakeProber

    from vrc_dist.build.executor import LocalExecutor
    from vrc_dist.build.manifest import Manifest
    from vrc_dist.config import BuildConfig
    from vrc_dist.data.shards import expand_shards

    prober = prober or FakeProber()
    manifest = Manifest.load(out) or Manifest.create(out, config or {"probe": {"divergence": "reference"}})
    manifest.data["model_info"] = prober.model_info
    manifest.save()
    LocalExecutor(BuildConfig(), prober).run(expand_shards([str(p) for p in shard_paths]), Path(out), manifest)
    return Manifest.load(out).shards


def tree(root: Path) -> set[str]:
    """Every path under root, relative: to prove nothing was written outside an output directory."""
    return {str(p.relative_to(root)) for p in Path(root).rglob("*")}


def doctor_errors(path) -> list[str]:
    from vrc_dist.doctor import ERROR, check

    return [str(f) for f in check(path)[1] if f.level == ERROR]


def child_env(inject: bool = False) -> dict:
    """This environment with the repository and tests/ importable; with `inject`, the fault injection of
    inject/sitecustomize.py too (it acts only where a VRC_FAULT_* or VRC_INJECT_* variable is set)."""
    env = dict(os.environ)
    paths = [str(REPO), str(TESTS), *([str(INJECT)] if inject else []), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(paths).rstrip(os.pathsep)
    return env


def job_status(head, sid: str) -> str:
    """PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED of a job on a tests/ray_head.LocalHead, from `ray job
    status` run with the head's own auth token (the CLI prints the final states as sentences)."""
    import re

    r = head.ray("job", "status", "--address", head.address, sid, timeout=120)
    text = r.stdout + r.stderr
    if f"Job '{sid}' succeeded" in text:
        return "SUCCEEDED"
    if f"Job '{sid}' was stopped" in text:
        return "STOPPED"
    if f"Job '{sid}' failed" in text:
        return "FAILED"
    m = re.search(r"Status for job '[^']*': (\S+)", text)
    return m.group(1).rsplit(".", 1)[-1] if m else f"UNKNOWN ({text.strip()[-300:]})"


def wait_job(head, sid: str, timeout: float = 900, poll: float = 5) -> str:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = job_status(head, sid)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(poll)
    raise TimeoutError(f"job {sid} still running after {timeout}s")

"""A local `vrc build` (its own ray.init) as a user runs it: what it listens on, what it leaves in the home
directory, what it prints (issue 17).

One real build of the toy model on two tiny shards, in a child process with HOME set to a temp dir, watched
from outside: its listening sockets are read from /proc while it runs.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from rel_helpers import REPO, child_env

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def local_build(tmp_path_factory):
    from ray_head import listening_sockets, process_tree

    from vrc_dist.toy.write_shards import make_shards

    root = tmp_path_factory.mktemp("local")
    make_shards(root / "shards", shards=2, per_shard=2, seed=7, split="train")
    home = root / "home"
    home.mkdir()
    env = {**child_env(inject=True), "HOME": str(home), "VRC_FAULT_SLEEP_S": "1"}  # slow images: a wide window to look
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "vrc_dist.cli", "build", "--model", "toy", "--shards", str(root / "shards" / "*.tar"),
           "--out", str(root / "out"), "--actors", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sockets: dict[tuple[str, int], set[str]] = {}
    while proc.poll() is None:
        for pid in process_tree(proc.pid):
            for sock in listening_sockets([pid]):
                sockets.setdefault(sock, set()).add(_name(pid))
        time.sleep(0.3)
    output = proc.stdout.read()
    assert proc.returncode == 0, output[-3000:]
    return {"home": home, "sockets": sockets, "output": output, "shards": root / "shards"}


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return f"pid {pid}"


def test_every_listening_socket_is_on_loopback(local_build):
    from ray_head import is_loopback

    sockets = local_build["sockets"]
    assert any("raylet" in names for names in sockets.values()), f"never saw Ray listen: {sockets}"
    public = {f"{addr}:{port}": sorted(names) for (addr, port), names in sockets.items() if not is_loopback(addr)}
    assert not public, f"listening beyond loopback: {public}"


def test_leaves_nothing_in_home_and_the_users_next_ray_works(local_build, tmp_path):
    from ray_head import LocalHead

    home = local_build["home"]
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == []
    # The user's own head and build job, started the way cluster/README.md's local recipe does (no token of ours).
    head = LocalHead(num_cpus=2, own_token=False, env={"HOME": str(home)})
    try:
        r = head.submit(["python", "jobs/build_codebook.py", "--model", "toy", "--shards",
                         str(local_build["shards"] / "*.tar"), "--out", str(tmp_path / "job-out"), "--actors", "1"],
                        str(REPO), timeout=600)
    finally:
        head.stop()
    assert r.returncode == 0 and "images: 4 ok" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_output_has_no_error_lines_or_per_actor_noise(local_build):
    import re

    lines = local_build["output"].splitlines()
    errors = [line for line in lines if re.match(r"\[[^]]* E \d+ \d+\]", line) or " ERROR " in line]
    noise = [line for line in lines if "Loading weights" in line or "Deprecat" in line]
    assert not errors and not noise, errors + noise
    assert any(line.startswith("shards: 2 done") for line in lines), lines


def test_ctrl_c_ends_a_build_with_one_line(tmp_path):
    import signal

    from vrc_dist.toy.write_shards import make_shards

    make_shards(tmp_path / "shards", shards=1, per_shard=20, seed=7, split="train")
    env = {**child_env(inject=True), "HOME": str(tmp_path), "VRC_FAULT_SLEEP_S": "2"}
    cmd = [sys.executable, "-m", "vrc_dist.cli", "build", "--model", "toy", "--shards",
           str(tmp_path / "shards" / "*.tar"), "--out", str(tmp_path / "out"), "--actors", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 300
    # On a loaded machine the actor can take longer to start than a fixed sleep: wait until it probes.
    while time.time() < deadline and not any("probe actors ready" in line for line in lines):
        time.sleep(0.5)
    time.sleep(4)  # 20 images at >= 2 s each: the actor is mid-shard
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    stdout = proc.stdout.read()  # small: the build prints its summary only when it ends
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr + stdout, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "vrc build: interrupted", stderr[-3000:]

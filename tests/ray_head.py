"""A real Ray head for integration tests: loopback only, its own temp dir, stopped by process tree.

Stopping by process tree rather than `ray stop`: `ray stop` kills every Ray process of the user on
the machine, including clusters that other test runs or people have started.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

VENV_BIN = str(Path(sys.executable).parent)
DASHBOARD_START_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def listening_sockets(pids) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket the processes `pids` hold, from /proc (no psutil here)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:  # the process ended, or an fd closed, while we looked
            continue
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            host, port = fields[1].split(":")
            raw = bytes.fromhex(host)  # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


class LocalHead:
    def __init__(self, num_cpus: int = 2, object_store_bytes: int = 200_000_000, own_token: bool = True,
                 env: dict | None = None):
        """`own_token=False` starts the head the way a user's `ray start --head` does (Ray's own auth
        defaults, ~/.ray of `env`'s HOME), to test what a previous run left behind."""
        self.temp_dir = tempfile.mkdtemp(prefix="vrc-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # Without this Ray swaps 127.0.0.1 for the machine's routable address and listens there.
        self.env = {**os.environ, **(env or {}), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
                    # Ray gives its dashboard 60 s; on a busy 2-core machine it took 70 s to come up.
                    "RAY_DASHBOARD_STARTUP_TIMEOUT_S": str(DASHBOARD_START_S)}
        for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            self.env.pop(name, None)
        if own_token:  # so the head neither depends on nor trips over ~/.ray/auth_token
            self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        self.log = open(Path(self.temp_dir) / "head.log", "w")
        self.proc = subprocess.Popen(
            [f"{VENV_BIN}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
             # Fixed default ports (agent 52365, client 10001) would clash with another head on this machine.
             f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
             f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={object_store_bytes}",
             f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = DASHBOARD_START_S + 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited: {Path(self.temp_dir, 'head.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:  # answering at all (e.g. 401 without the auth token) means up
                return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError("ray head did not come up in time")

    def ray(self, *args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
        """Run `ray <args>` against this head; output captured."""
        return subprocess.run([f"{VENV_BIN}/ray", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def submit(self, entrypoint: list[str], working_dir: str, env_vars: dict | None = None,
               submission_id: str | None = None, wait: bool = True, timeout: float = 600):
        import json

        args = ["job", "submit", "--address", self.address, "--working-dir", working_dir]
        if env_vars:
            args += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
        if submission_id:
            args += ["--submission-id", submission_id]
        if not wait:
            args.append("--no-wait")
        for _ in range(30):  # the job API answers before the node's agent can take a job
            r = self.ray(*args, "--", *entrypoint, timeout=timeout)
            if "No available agent to submit job" not in r.stderr + r.stdout:
                return r
            time.sleep(2)
        return r

    def stop(self) -> None:
        alive = process_tree(self.proc.pid)
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + grace
            while alive and time.time() < deadline:
                time.sleep(0.5)
                alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)]
        self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False

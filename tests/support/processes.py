"""Launch the real fedssl processes for tests: registry, SuperLink, SuperNodes.

Everything binds 127.0.0.1 on free ports and is killed (whole process group) at the end,
even when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fedssl_core import names
from tests.conftest import REPO_ROOT, free_port

VENV_BIN = Path(sys.executable).parent
# The SSL tasks of the suite's two-hospital HAM10000 federations (tests/flower/test_integration.py,
# tests/registry/test_dashboard.py), a hospital each. MICLe is SimCLR's head and chart code path;
# a MICLe hospital runs in tests/flower/test_client_app.py.
FEDERATION_TASKS = (names.SSL_SIMCLR, names.SSL_ROTATION)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDSSL_", "FLWR_", "KAGGLE_"))}
    env.update({"PATH": f"{VENV_BIN}:{env.get('PATH', '')}", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    env.update(extra)
    return env


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Cluster:
    """The processes a test started; `close()` kills them all."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        log = self.workdir / f"{name}.log"
        fh = log.open("ab")
        popen = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, cwd=str(REPO_ROOT))
        fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for p in reversed(self.procs):
            p.kill()

    def logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.text()[-4000:]}" for p in self.procs)


def wait_http(url: str, proc: Proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} not ready at {url} after {timeout}s:\n{proc.text()[-3000:]}")


def wait_port(port: int, proc: Proc, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} did not listen on {port} after {timeout}s")


@dataclass
class Registry:
    url: str
    token: str
    data_dir: Path
    proc: Proc

    def client(self, token: str | None = None) -> httpx.Client:
        tok = self.token if token is None else token
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {tok}"} if tok else {}, timeout=60)


def registry_env(data_dir: Path, port: int, **settings: str) -> dict[str, str]:
    """Environment of a `fedssl-registry` process: each setting becomes FEDSSL_REGISTRY_<NAME>."""
    return base_env(FEDSSL_REGISTRY_PORT=str(port), FEDSSL_REGISTRY_DATA_DIR=str(data_dir),
                    **{f"FEDSSL_REGISTRY_{k.upper()}": v for k, v in settings.items()})


def start_registry(cluster: Cluster, data_dir: Path, token: str = "test-token", port: int | None = None, **settings: str) -> Registry:
    port = port or free_port()
    env = registry_env(data_dir, port, token=token, **settings)
    proc = cluster.spawn(f"registry-{port}", [str(VENV_BIN / "fedssl-registry")], env)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v2/health/ready", proc)
    return Registry(url, token, data_dir, proc)


def registry_start_refused(data_dir: Path, timeout: float = 120, **settings: str) -> subprocess.CompletedProcess:
    """Runs `fedssl-registry` with settings it must refuse (it exits before listening: port 1)."""
    return subprocess.run([str(VENV_BIN / "fedssl-registry")], env=registry_env(data_dir, 1, **settings),
                          capture_output=True, text=True, timeout=timeout)


@contextmanager
def cluster(workdir: Path):
    c = Cluster(workdir)
    try:
        yield c
    finally:
        c.close()


def start_superlink(c: Cluster, *, registry: Registry | None = None, port: int | None = None, runs_dir: Path | None = None,
                    name: str = "superlink", env: dict[str, str] | None = None) -> tuple[Proc, int]:
    port = port or free_port()
    extra = {"FLWR_HOME": str(c.workdir / "flwr-superlink"), "FEDSSL_RUNS_DIR": str(runs_dir or c.workdir / "runs"),
             **(env or {})}
    if registry:
        extra.update(FEDSSL_REGISTRY_URL=registry.url, FEDSSL_REGISTRY_TOKEN=registry.token)
    proc = c.spawn(name, [str(VENV_BIN / "fedssl-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                          "--database", str(c.workdir / "superlink.db"), "--disable-runtime-dependency-installation"],
                   base_env(**extra))
    wait_port(port, proc)
    return proc, port


def node_config(**values) -> str:
    parts = []
    for k, v in values.items():
        parts.append(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}")
    return " ".join(parts)


def start_supernode(c: Cluster, superlink_port: int, name: str, config: str, *, warm: bool = True, **env: str) -> Proc:
    """fedssl-supernode; `warm=False`: Flower's own per-message `flwr-clientapp` processes;
    `env`: more environment (e.g. FEDSSL_CLIENTAPP_ALLOCATOR)."""
    return c.spawn(name, [str(VENV_BIN / "fedssl-supernode"), "--insecure", "--superlink", f"127.0.0.1:{superlink_port}",
                          "--port", str(free_port()), "--node-config", config],
                   base_env(FLWR_HOME=str(c.workdir / f"flwr-{name}"), FEDSSL_WARM_CLIENTAPP=str(warm).lower(), **env))


def start_ham_hospitals(c: Cluster, superlink_port: int, data_dir: Path, cache_dir: Path, attacks: dict[str, str | None],
                        *, partitions: int = 3, max_images: int = 40) -> dict[str, Proc]:
    """One rotation-task SuperNode per hospital name on HAM10000 partition i of `partitions`,
    with node config `attack` where `attacks` gives one; their processes by name."""
    return {name: start_supernode(c, superlink_port, name, node_config(
        hospital=name, **{"ssl-task": "rotation", "data-path": str(data_dir), "partition-id": i % partitions,
                          "num-partitions": partitions, "max-images": max_images, "cache-dir": str(cache_dir)},
        **({"attack": attack} if attack else {}))) for i, (name, attack) in enumerate(attacks.items())}


def submit(superlink_port: int, workdir: Path, *run_config: str, timeout: float = 900) -> subprocess.CompletedProcess:
    args = [str(VENV_BIN / "fedssl-submit"), "--superlink", f"127.0.0.1:{superlink_port}", "--app", str(REPO_ROOT),
            "--flwr-home", str(workdir / "flwr-cli"), "--poll-seconds", "10"]
    for kv in run_config:
        args += ["-c", kv]
    return subprocess.run(args, env=base_env(), capture_output=True, text=True, timeout=timeout, cwd=str(REPO_ROOT))


def run_rounds(workdir: Path) -> list[dict]:
    """The aggregator's round records (rounds.jsonl) of the one run under `workdir`; [] before the first."""
    files = list((workdir / "runs").glob("*/rounds.jsonl"))
    return [json.loads(line) for line in files[0].read_text().splitlines()] if files else []

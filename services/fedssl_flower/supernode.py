"""`fedssl-supernode`: Flower's `flower-supernode` whose ClientApp processes start warm.

Same arguments and behaviour as `flower-supernode`, except how a ClientApp task starts. Flower's
default (`--isolation subprocess`) starts a `flower-superexec` that launches `flwr-clientapp`,
a new Python program importing torch, torchvision and timm, for every message. This command
runs the SuperNode with `--isolation process` and starts, beside it, fedssl's warm SuperExec
(`fedssl_flower.warm_exec`): Flower's SuperExec loop with those libraries imported once, each
task a fork of it. Like Flower's own subprocess mode, the SuperExec watches the SuperNode's
process and stops with it.

`--isolation` given explicitly (e.g. `process` with a SuperExec of your own in another
container) runs `flower-supernode` otherwise unchanged. `FEDSSL_WARM_CLIENTAPP=false` does the
same with Flower's default subprocess isolation. In every case the SuperNode process leaves out
Flower's SQL object store, which a SuperNode never uses (`without_sql_object_store`).

The warm SuperExec and its tasks allocate with jemalloc where it is installed
(`FEDSSL_CLIENTAPP_ALLOCATOR`, see fedssl_flower.allocator): a lower memory peak per round.

With SuperNode authentication (`--auth-supernode-private-key`) a SuperLink refuses a key that
is not registered yet, and Flower's SuperNode then exits (code 305). A hospital's key is
registered by the run Job, or by an operator for a hospital outside the cluster, possibly after
the hospital started: so this command waits instead, starting the SuperNode again every few
seconds (up to `--max-retries` times, when given) and saying why, until the key is accepted.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

from fedssl_core import names
from fedssl_flower import allocator, node_keys


def warm_enabled(environ=os.environ) -> bool:
    raw = environ.get(names.ENV_WARM_CLIENTAPP, "true").strip().lower()
    if raw not in ("true", "false", "1", "0"):
        raise SystemExit(f"fedssl-supernode: {names.ENV_WARM_CLIENTAPP}={raw!r}: expected true or false")
    return raw in ("true", "1")


def runtime_address(argv: list[str]) -> tuple[str, list[str]]:
    """The Runtime API address this SuperNode serves (its `--host`/`--port`, Flower's defaults
    otherwise) and the TLS arguments a SuperExec needs to reach it."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9094)
    ap.add_argument("--ssl-certfile")
    ap.add_argument("--ssl-ca-certfile")
    known, _ = ap.parse_known_args(argv)
    host = "127.0.0.1" if known.host in ("0.0.0.0", "::", "[::]") else known.host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if known.ssl_certfile:
        if not known.ssl_ca_certfile:
            raise SystemExit("fedssl-supernode: --ssl-certfile needs --ssl-ca-certfile: the ClientApp SuperExec "
                             "verifies the Runtime API's certificate with it")
        return f"{host}:{known.port}", ["--root-certificates", known.ssl_ca_certfile]
    return f"{host}:{known.port}", ["--insecure"]


def openssh_auth_key(argv: list[str], tmp_dir: Path) -> list[str]:
    """`argv` with `--auth-supernode-private-key` pointing at an OpenSSH copy of the key when it
    is PEM (the chart's generated keys; see fedssl_flower.node_keys)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--auth-supernode-private-key" and i + 1 < len(out):
            index, path = i + 1, out[i + 1]
        elif arg.startswith("--auth-supernode-private-key="):
            index, path = i, arg.split("=", 1)[1]
        else:
            continue
        data = Path(path).expanduser().read_bytes()
        if node_keys.OPENSSH_PRIVATE_MARK in data:
            return out
        converted = tmp_dir / "fedssl-supernode-auth-key"
        try:
            node_keys.write_private(converted, node_keys.openssh_private_key(data, path))
        except node_keys.NodeKeyError as exc:
            raise SystemExit(f"fedssl-supernode: {exc}") from None
        out[index] = str(converted) if index == i + 1 else f"--auth-supernode-private-key={converted}"
        return out
    return out


# How Flower's SuperNode reports that it could not initialise its connection (flwr.supercore.exit:
# SUPERNODE_CONNECTION_ERROR 305, e.g. "Failed to activate SuperNode" for an unregistered key).
# The process itself exits 1 for every error, so the log line is what tells this one apart.
CONNECTION_ERROR_MARK = b"Exit Code: 305"
RETRY_FIRST_S, RETRY_MAX_S = 2.0, 10.0


def uses_node_auth(argv: list[str]) -> bool:
    return any(a == "--auth-supernode-private-key" or a.startswith("--auth-supernode-private-key=") for a in argv)


def max_retries(argv: list[str]) -> int | None:
    """flower-supernode's `--max-retries` (None: unlimited), also the number of restarts here."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--max-retries", type=int, default=None)
    return ap.parse_known_args(argv)[0].max_retries


def _pass_through(pipe, refused: threading.Event) -> None:
    for line in pipe:
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        if CONNECTION_ERROR_MARK in line:
            refused.set()


def run_until_accepted(cmd: list[str], retries: int | None, first: float = RETRY_FIRST_S,
                       longest: float = RETRY_MAX_S) -> int:
    """Run the SuperNode `cmd` again while it exits because the SuperLink did not accept it, up
    to `retries` times (None: until stopped); its exit code otherwise. SIGTERM/SIGINT go to the
    running SuperNode and end the waiting."""
    stop = threading.Event()
    child: subprocess.Popen | None = None

    def forward(signum, _frame):
        stop.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    attempt, delay = 0, first
    while True:
        # Its output passes through unchanged (the pod's log), read for Flower's reason to exit.
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        refused = threading.Event()
        # A thread, not a read to EOF: the SuperNode's own SuperExec (subprocess isolation)
        # inherits the pipe and may outlive it.
        reader = threading.Thread(target=_pass_through, args=(child.stdout, refused), daemon=True)
        reader.start()
        rc = child.wait()
        reader.join(timeout=5)  # what it wrote before it exited is in the pipe already
        if rc == 0 or not refused.is_set() or stop.is_set() or (retries is not None and attempt >= retries):
            return rc
        attempt += 1
        print(f"fedssl-supernode: the SuperLink did not accept this SuperNode (Flower's exit code 305; with SuperNode "
              f"authentication, its public key is not registered yet: the run Job registers the chart's hospitals, "
              f"an operator others with `flwr supernode register`); starting it again in {delay:.0f} s "
              f"(attempt {attempt}{'' if retries is None else f' of {retries}'})", file=sys.stderr, flush=True)
        if stop.wait(delay):
            return rc
        delay = min(delay * 2, longest)


# Flower 1.41's SuperNode keeps its messages in memory (`ObjectStoreFactory()` with its default
# database, `InMemoryNodeState`), but `flwr.supercore.object_store` imports its SQL store at module
# level, and with it SQLAlchemy and alembic: ~30 MB of every hospital's SuperNode process, for
# code a SuperNode never runs. `without_sql_object_store` puts a module in its place whose store
# refuses, by name, to be built.
SQL_OBJECT_STORE = "flwr.supercore.object_store.sql_object_store"


class SqlObjectStoreNotLoaded:
    """Stands in for flwr's `SqlObjectStore` in a SuperNode process (`without_sql_object_store`)."""

    def __init__(self, database: str = "", *args, **kwargs) -> None:
        raise RuntimeError(f"fedssl-supernode: Flower's SQL object store ({database!r}) is not loaded in this process: "
                           f"a SuperNode keeps its objects in memory (flwr 1.41); run `flower-supernode` itself for "
                           f"a SuperNode that needs the SQL store")


def without_sql_object_store() -> None:
    """Before Flower's SuperNode is imported: its SQL object store module (and so SQLAlchemy and
    alembic) is replaced by one whose `SqlObjectStore` refuses to be built. No-op once loaded."""
    if SQL_OBJECT_STORE in sys.modules:
        return
    module = types.ModuleType(SQL_OBJECT_STORE, "flwr's SQL object store, not loaded by fedssl-supernode")
    module.SqlObjectStore = SqlObjectStoreNotLoaded
    sys.modules[SQL_OBJECT_STORE] = module


def run_flower_supernode(argv: list[str]) -> None:
    """Flower's `flower-supernode` with `argv`, in this process, without the SQL object store."""
    without_sql_object_store()
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def main() -> None:
    allocator.limit_malloc_arenas()
    argv = openssh_auth_key(sys.argv[1:], Path(os.environ.get("TMPDIR", "/tmp")))
    explicit = any(a == "--isolation" or a.startswith("--isolation=") for a in argv)
    helping = any(a in ("-h", "--help", "-V", "--version") for a in argv)
    if not explicit and not helping and warm_enabled():
        address, tls = runtime_address(argv)
        argv = [*argv, "--isolation", "process"]
        try:
            chosen = allocator.choose()
        except allocator.AllocatorError as exc:
            raise SystemExit(f"fedssl-supernode: {exc}") from None
        if chosen.note:
            print(f"fedssl-supernode: WARNING: the ClientApp tasks allocate with glibc's malloc: {chosen.note}",
                  file=sys.stderr, flush=True)
        # Started first: it retries the Runtime API until the SuperNode below serves it.
        subprocess.Popen([sys.executable, "-m", "fedssl_flower.warm_exec", "--runtime-api-address", address, *tls,
                          "--parent-pid", str(os.getpid())], env=chosen.environ())
    if uses_node_auth(argv) and not helping:
        cmd = [sys.executable, "-c", "import sys; from fedssl_flower.supernode import run_flower_supernode; "
               "run_flower_supernode(sys.argv[1:])", *argv]
        raise SystemExit(run_until_accepted(cmd, max_retries(argv)))
    run_flower_supernode(argv)


if __name__ == "__main__":
    main()

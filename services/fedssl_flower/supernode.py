"""`fedssl-supernode`: Flower's `flower-supernode` whose ClientApp processes start warm.

Same arguments and behaviour as `flower-supernode`, except how a ClientApp task starts. Flower's
default (`--isolation subprocess`) starts a `flower-superexec` that launches `flwr-clientapp`,
a new Python program importing torch, torchvision and timm, for every message. This command
runs the SuperNode with `--isolation process` and starts, beside it, fedssl's warm SuperExec
(`fedssl_flower.warm_exec`): Flower's SuperExec loop with those libraries imported once, each
task a fork of it. Like Flower's own subprocess mode, the SuperExec watches the SuperNode's
process and stops with it.

`--isolation` given explicitly (e.g. `process` with a SuperExec of your own in another
container) runs `flower-supernode` unchanged. `FEDSSL_WARM_CLIENTAPP=false` does the same with
Flower's default subprocess isolation.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from fedssl_core import names


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


def main() -> None:
    argv = sys.argv[1:]
    explicit = any(a == "--isolation" or a.startswith("--isolation=") for a in argv)
    helping = any(a in ("-h", "--help", "-V", "--version") for a in argv)
    if not explicit and not helping and warm_enabled():
        address, tls = runtime_address(argv)
        argv = [*argv, "--isolation", "process"]
        # Started first: it retries the Runtime API until the SuperNode below serves it.
        subprocess.Popen([sys.executable, "-m", "fedssl_flower.warm_exec", "--runtime-api-address", address, *tls,
                          "--parent-pid", str(os.getpid())])
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main()

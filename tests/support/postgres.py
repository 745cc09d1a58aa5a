"""A throwaway PostgreSQL server from Debian's binaries, on a free port, for the registry's tests."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import free_port


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))  # Debian keeps them off PATH
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


@contextmanager
def postgres() -> Iterator[str]:
    """Yields a SQLAlchemy URL (psycopg 3) of an empty database `fedssl` on 127.0.0.1."""
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries are not installed (scripts/bootstrap.sh --with-test-tools installs them)")
    # The server refuses to run as root: as root, run it as Debian's `postgres` user, in a
    # directory of its own outside pytest's (mode 0700, root's) temp tree.
    as_user = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    work = Path(tempfile.mkdtemp(prefix="fedssl-pg-"))
    if as_user:
        shutil.chown(work, "postgres", "postgres")
    data, port = work / "data", free_port()

    def run(*args: str) -> None:
        r = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "fedssl", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(work / "server.log"), "-w", "-t", "60", "start",
            "-o", f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c fsync=off")
        try:
            run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "fedssl", "fedssl")
            yield f"postgresql+psycopg://fedssl@127.0.0.1:{port}/fedssl"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(work, ignore_errors=True)

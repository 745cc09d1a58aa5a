"""`fedssl-superlink`: Flower's `flower-superlink`, with a SQLite busy timeout that fits a federation.

Flower 1.41 keeps the SuperLink's state and its object store (every model that moves between
the aggregator and the hospitals) in one SQLite file, and sets `PRAGMA busy_timeout = 5000`
on every connection. SQLite writers queue: when many hospitals push their replies (one
ResNet-18 is ~45 MB) at once on a busy machine, the last writer waits longer than 5 s, the
SuperLink answers `500` (`sqlite3.OperationalError: database is locked`) and the SuperNode
drops its reply. Seen with 8 SuperNodes on 2 cores. This command raises the timeout (default
60 s, `FEDSSL_SUPERLINK_BUSY_TIMEOUT_SECONDS`) and then is exactly `flower-superlink`: same
arguments, same behaviour, except on shutdown.

Shutdown (SIGTERM from Kubernetes, whose grace period is 30 s; or SIGINT): Flower's SuperLink
waits for every open HTTP connection to close, and `flwr log --stream` (the run Job's
`fedssl-submit`) keeps one open for about a minute, so the pod was killed mid-shutdown. Its
ServerApp processes were orphaned, and nothing told the registry that the run had stopped.
So, on the first signal: the SuperLink's ServerApp processes get SIGTERM while the SuperLink
still serves, and up to `RUN_STOP_GRACE_SECONDS` to record the stop (fedssl's ServerApp marks
its run failed in the registry and the run folder, with the round it was in, and Flower's
pushes the run's final status and logs); then connections get `CONNECTION_GRACE_SECONDS` to
close. A second signal stops at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from fedssl_core import names

DEFAULT_BUSY_TIMEOUT_SECONDS = 60.0
RUN_STOP_GRACE_SECONDS = 15.0  # for ServerApps to record a stop, while the SuperLink still serves
CONNECTION_GRACE_SECONDS = 5.0  # then for open connections (log streams) to close


def busy_timeout_seconds(environ: Mapping[str, str] = os.environ) -> float:
    raw = environ.get(names.ENV_SUPERLINK_BUSY_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_BUSY_TIMEOUT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise SystemExit(f"fedssl-superlink: {names.ENV_SUPERLINK_BUSY_TIMEOUT}={raw!r}: "
                         "expected a number of seconds in (0, 3600]")
    return value


def set_busy_timeout(seconds: float) -> None:
    """Make every SQLite connection the SuperLink opens wait up to `seconds` for a lock."""
    from flwr.supercore import sql_mixin

    pragmas = getattr(sql_mixin, "SQLITE_PRAGMAS", None)
    if not pragmas or "busy_timeout" not in dict(pragmas):
        # Flower changed how it configures SQLite: fail loudly rather than run with 5 s.
        raise SystemExit("fedssl-superlink: this Flower version has no flwr.supercore.sql_mixin.SQLITE_PRAGMAS "
                         "busy_timeout; the SQLite timeout cannot be set (fedssl pins flwr==1.41.0)")
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (pragma, str(int(seconds * 1000)) if pragma == "busy_timeout" else value) for pragma, value in pragmas
    )


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every live descendant of process `root` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        todo += children.get(pid, [])
    return out


def stop_serverapps(grace: float) -> list[int]:
    """SIGTERM this process's ServerApp processes (started by the SuperLink's SuperExec) and
    wait up to `grace` seconds for them to exit; returns the pids signalled."""
    pids = [pid for pid, cmd in _descendants(os.getpid()).items() if "flwr-serverapp" in cmd]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its parent (the SuperExec) reaps it


def stop_runs_before_shutdown(run_grace: float = RUN_STOP_GRACE_SECONDS,
                              connection_grace: float = CONNECTION_GRACE_SECONDS) -> None:
    """Make the SuperLink's uvicorn server stop its ServerApps first, then close connections
    after at most `connection_grace` seconds (see the module docstring)."""
    import uvicorn

    run, handle_exit = uvicorn.run, uvicorn.Server.handle_exit

    def run_with_grace(*args, **kwargs):
        kwargs.setdefault("timeout_graceful_shutdown", connection_grace)
        return run(*args, **kwargs)

    def stop_runs_then_exit(server, sig, frame):
        if server.should_exit or getattr(server, "fedssl_stopping", False):
            return handle_exit(server, sig, frame)  # a second signal: stop now
        server.fedssl_stopping = True

        def stop() -> None:
            stop_serverapps(run_grace)
            handle_exit(server, sig, frame)

        threading.Thread(target=stop, name="fedssl-stop-runs", daemon=True).start()

    uvicorn.run = run_with_grace
    uvicorn.Server.handle_exit = stop_runs_then_exit


def main() -> None:
    set_busy_timeout(busy_timeout_seconds())
    stop_runs_before_shutdown()
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()

"""`fedssl-superlink`: Flower's `flower-superlink`, with a SQLite busy timeout that fits a federation.

Flower 1.41 keeps the SuperLink's state and its object store (every model that moves between
the aggregator and the hospitals) in one SQLite file, and sets `PRAGMA busy_timeout = 5000`
on every connection. SQLite writers queue: when many hospitals push their replies (one
ResNet-18 is ~45 MB) at once on a busy machine, the last writer waits longer than 5 s, the
SuperLink answers `500` (`sqlite3.OperationalError: database is locked`) and the SuperNode
drops its reply. Seen with 8 SuperNodes on 2 cores. This command raises the timeout (default
60 s, `FEDSSL_SUPERLINK_BUSY_TIMEOUT_SECONDS`) and then is exactly `flower-superlink`: same
arguments, same behaviour.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from fedssl_core import names

DEFAULT_BUSY_TIMEOUT_SECONDS = 60.0


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


def main() -> None:
    set_busy_timeout(busy_timeout_seconds())
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()

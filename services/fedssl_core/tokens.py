"""Secrets read from files (mounted Kubernetes Secrets), one way for every service.

A token lives in a file the pod mounts read-only, never in an environment variable or on a
command line. `read_token_file` reads it, strips the trailing newline that `kubectl create
secret` and editors add, and refuses a missing, unreadable or empty file with a `ConfigError`
naming `what` (the setting that pointed at the file).
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError


def read_token_file(path: str | Path, what: str) -> str:
    """The token in `path`; `ConfigError` naming `what` when it cannot be read or is empty."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"{what} {path} is empty; expected the token")
    return token

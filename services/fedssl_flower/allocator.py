"""The C allocator of a hospital's ClientApp tasks (fedssl-supernode's warm SuperExec and the
tasks it forks).

A training round allocates and frees tensors of many sizes, hundreds of MB in all. glibc's
malloc returns little of it in a form the next step can reuse (docs/benchmarks.md, section 3);
jemalloc (Debian: `libjemalloc2`), preloaded with `LD_PRELOAD`, both lowers a round's peak and
shortens its steps. `FEDSSL_CLIENTAPP_ALLOCATOR` chooses:

    auto      jemalloc when libjemalloc.so.2 is found (`FEDSSL_JEMALLOC_PATH`, then the
              virtualenv's lib/ where scripts/bootstrap.sh puts it, then the system's library
              directories), glibc's malloc otherwise, with a warning that says so (default)
    jemalloc  jemalloc, or an error naming where it was looked for (the container image)
    glibc     glibc's malloc, limited to `MALLOC_ARENAS` arenas unless `MALLOC_ARENA_MAX` is set

A library that is found but does not load (wrong architecture, damaged) is an error in every
mode: the dynamic loader would only print a line and go on with glibc's malloc.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from fedssl_core import names

CHOICES = ("auto", "jemalloc", "glibc")
JEMALLOC_LIBRARY = "libjemalloc.so.2"
# jemalloc's options (its MALLOC_CONF variable), unless the operator set MALLOC_CONF: freed pages
# are kept for the next step's tensors instead of being given back to the kernel (a task is a
# process per message: what it keeps goes when it exits), and large tensors come from the same
# arenas instead of a dedicated one. Chosen with bench/memory.py (docs/benchmarks.md, section 3):
# jemalloc's defaults gave a lower peak still but steps ~35 % slower than glibc's.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:0"
MALLOC_ARENAS = "2"
_M_ARENA_MAX = -8  # glibc's mallopt parameter


class AllocatorError(Exception):
    """The allocator setting cannot be honoured; the message says what was wrong and what was expected."""


@dataclass(frozen=True)
class Allocator:
    name: str  # "jemalloc" or "glibc"
    path: str | None = None  # the jemalloc library
    note: str = ""  # why glibc when jemalloc was wanted (auto mode), for the log

    def environ(self, environ=os.environ) -> dict[str, str]:
        """The environment of a process (and its forks) that allocates with this allocator:
        `environ` with jemalloc preloaded and configured (the operator's MALLOC_CONF stands), or
        glibc's malloc limited to `MALLOC_ARENAS` arenas (the operator's MALLOC_ARENA_MAX stands)."""
        env = dict(environ)
        if self.name == "jemalloc":
            preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
            env["LD_PRELOAD"] = " ".join([self.path, *[p for p in preload if p != self.path]])
            env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
        else:
            env.setdefault("MALLOC_ARENA_MAX", MALLOC_ARENAS)
        return env

    def describe(self, environ=os.environ) -> str:
        if self.name == "jemalloc":
            return f"jemalloc ({self.path}, MALLOC_CONF={self.environ(environ)['MALLOC_CONF']})"
        return f"glibc malloc (MALLOC_ARENA_MAX={self.environ(environ)['MALLOC_ARENA_MAX']})"


def search_path() -> list[Path]:
    """Where `auto` and `jemalloc` look for libjemalloc.so.2, in order (after FEDSSL_JEMALLOC_PATH)."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [Path(sys.prefix) / "lib", *([Path("/usr/lib") / multiarch] if multiarch else []),
            Path("/usr/lib"), Path("/usr/local/lib")]
    return [d / JEMALLOC_LIBRARY for d in dict.fromkeys(dirs)]  # once each (sys.prefix may be /usr)


def loads(path: str) -> str | None:
    """None when a fresh Python with `path` preloaded allocates with jemalloc (its `mallctl` is
    there); otherwise what went wrong. A fresh process, because a library that fails to preload
    is skipped by the loader with a message on stderr, not an error."""
    check = "import ctypes, sys; sys.exit(0 if hasattr(ctypes.CDLL(None), 'mallctl') else 3)"
    env = {**os.environ, "LD_PRELOAD": path}
    try:
        out = subprocess.run([sys.executable, "-S", "-c", check], env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "a Python with it preloaded did not finish within 60 s"
    if out.returncode == 0:
        return None
    return (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]


def choose(environ=os.environ) -> Allocator:
    """The allocator `FEDSSL_CLIENTAPP_ALLOCATOR` asks for, found and checked (see the module doc)."""
    raw = environ.get(names.ENV_CLIENTAPP_ALLOCATOR, "auto").strip().lower()
    if raw not in CHOICES:
        raise AllocatorError(f"{names.ENV_CLIENTAPP_ALLOCATOR}={raw!r}: expected one of {', '.join(CHOICES)}")
    if raw == "glibc":
        return Allocator("glibc")
    explicit = environ.get(names.ENV_JEMALLOC_PATH, "").strip()
    if explicit:
        if not Path(explicit).is_file():
            raise AllocatorError(f"{names.ENV_JEMALLOC_PATH}={explicit!r}: no such file; expected the path of "
                                 f"{JEMALLOC_LIBRARY} (Debian package libjemalloc2)")
        path = explicit
    else:
        path = next((str(p) for p in search_path() if p.is_file()), None)
    if path is None:
        looked = ", ".join(str(p) for p in search_path())
        if raw == "jemalloc":
            raise AllocatorError(f"{names.ENV_CLIENTAPP_ALLOCATOR}=jemalloc but {JEMALLOC_LIBRARY} is not in {looked}: "
                                 f"install Debian's libjemalloc2 (scripts/bootstrap.sh puts it in the virtualenv), set "
                                 f"{names.ENV_JEMALLOC_PATH}, or choose {names.ENV_CLIENTAPP_ALLOCATOR}=glibc")
        return Allocator("glibc", note=f"{JEMALLOC_LIBRARY} not found (looked in {looked}; scripts/bootstrap.sh "
                                       f"installs it, Debian package libjemalloc2): a round's memory peak is higher "
                                       f"and its steps slower (docs/benchmarks.md, section 3)")
    problem = loads(path)
    if problem:
        raise AllocatorError(f"{path} does not load as the ClientApp's allocator ({problem}); expected a working "
                             f"{JEMALLOC_LIBRARY} for this machine, or {names.ENV_CLIENTAPP_ALLOCATOR}=glibc")
    return Allocator("jemalloc", path)


def active() -> str:
    """The allocator this process runs with: "jemalloc" when it was preloaded, else "glibc"."""
    return "jemalloc" if hasattr(ctypes.CDLL(None), "mallctl") else "glibc"


def limit_malloc_arenas(environ=os.environ) -> bool:
    """Limits this process's glibc malloc to `MALLOC_ARENAS` arenas from now on, unless the
    operator set `MALLOC_ARENA_MAX` (glibc read it at start). Each thread that allocates (the
    SuperNode's gRPC threads, each holding messages of the model's size) otherwise gets an
    arena of its own, up to 8 per core, that keeps what it freed; the saving measured here is
    small, a few tens of MB per hospital at most (docs/benchmarks.md).
    False where the C library is not glibc (no arenas to limit) or jemalloc allocates here."""
    if "MALLOC_ARENA_MAX" in environ or active() == "jemalloc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(_M_ARENA_MAX, int(MALLOC_ARENAS)) == 1

"""Flower's SuperExec for a hospital's SuperNode, whose ClientApp processes start warm.

Flower 1.41 runs every message a hospital receives in a new `flwr-clientapp` process, and
that process imports torch, torchvision and timm before the handler runs: ~5 s on an idle
core here, much more on a busy one, paid by every hospital on every message. This SuperExec is
Flower's own (`flwr.supercore.superexec.run_superexec`: the same Runtime API polling, task
tokens, retries and exit handling) with one change, the executor: this process imports those
libraries once, and starts each ClientApp task by forking itself (a fork server). The child
runs Flower's `run_clientapp` with the task's token exactly as `flwr-clientapp --token` would,
so each message still gets a process of its own that exits when its task ends (process
isolation, memory given back, a crash contained), minus the imports.

Nothing computes in this process before it forks (no tensor op, so no OpenMP pool to
inherit), and the app's own modules are not preloaded (but for `fedssl_flower.allocator` and
`fedssl_core.names`, small modules that import only the standard library, for the start line
to say which allocator this process runs with): each task imports the app's code itself.
The preloaded objects are moved out of the garbage collector's reach (`freeze_preloaded`),
so a full collection in a task does not write to every page they sit on, which would copy
them out of what the task shares with this process (~100 MB, measured with a collection
forced at the task's start; the short tasks of `bench/scaling.py` happen to run none, and
their peak is the same either way). Started by `fedssl-supernode`.

    python -m fedssl_flower.warm_exec --runtime-api-address 127.0.0.1:9094 --insecure [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import time
import traceback

from fedssl_flower import allocator

# Libraries a ClientApp task imports that dominate its start-up (seconds each), in import order.
PRELOAD = ("numpy", "PIL.Image", "torch", "torchvision", "timm", "safetensors.torch",
           "flwr.supernode.runtime.run_clientapp", "flwr.clientapp")


def preload(modules: tuple[str, ...] = PRELOAD) -> float:
    """Import `modules` (they then stay in every forked task); returns the seconds it took."""
    t0 = time.perf_counter()
    for name in modules:
        importlib.import_module(name)
    return time.perf_counter() - t0


def freeze_preloaded() -> int:
    """Collect, then move every object the garbage collector tracks now into its permanent
    generation (`gc.freeze`, Python's advice for a process that forks without exec): a forked
    task's collections then skip the preloaded libraries' objects instead of writing to their
    headers, which would copy-on-write every page they sit on. New objects in this process and
    in the tasks are collected as usual. Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class ForkExecutor:
    """A SuperExec executor (Flower's `Executor` protocol) that starts each ClientApp task as a
    fork of this process, instead of `flwr-clientapp` as a new program."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        from flwr.supercore.constant import TaskType

        return {t for t in supported_task_types if t == TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None) -> None:
        """No capacity gate: like Flower's subprocess executor."""

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"fedssl's warm SuperExec runs ClientApp tasks only, not {spec.task_type}")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the task's process
            os._exit(_run_task(spec))
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished tasks (no zombies)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        """Running tasks finish on their own; each watches this process and stops if it dies."""
        if os.getpid() == self.owner:
            self.reconcile()


def _run_task(spec) -> int:
    """In the forked child: Flower's ClientApp runtime for one task; returns the exit code."""
    try:
        from flwr.supercore.exit import exit_handler
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        exit_handler.registered_exit_handlers[:] = []  # the SuperExec's own handlers are not the task's
        sys.argv[0] = "flwr-clientapp"
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - a task must never return into the SuperExec's loop
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fedssl_flower.warm_exec", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    tls = ap.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="the Runtime API has no TLS")
    tls.add_argument("--root-certificates", help="CA certificate (PEM) of the Runtime API's TLS")
    ap.add_argument("--parent-pid", type=int, help="stop when this process (the SuperNode) is gone")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    seconds = preload()
    from flwr.supercore.superexec import run_superexec as superexec

    frozen = freeze_preloaded()
    malloc = allocator.active()
    if malloc == "jemalloc":
        malloc += f", MALLOC_CONF={os.environ.get('MALLOC_CONF', '')}"
    print(f"fedssl warm SuperExec: ClientApp libraries imported once in {seconds:.1f}s ({frozen} objects frozen "
          f"for the tasks to share; allocator: {malloc}); each task forks from here", flush=True)

    # Flower's SuperExec loop, with this module's executor in place of its subprocess one.
    superexec.get_executor = lambda *_args, **_kwargs: ForkExecutor()
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
    )


if __name__ == "__main__":
    main()

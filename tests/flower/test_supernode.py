"""fedssl-supernode's own decisions (the federation tests run it for real: every SuperNode in
them is a fedssl-supernode whose ClientApp tasks are forked by fedssl_flower.warm_exec)."""

import re
import subprocess
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResultStatus

from fedssl_flower import allocator, superlink, supernode, warm_exec
from tests.support import processes as P


def test_the_superexec_reaches_the_runtime_api_the_supernode_serves():
    assert supernode.runtime_address([]) == ("127.0.0.1:9094", ["--insecure"])
    assert supernode.runtime_address(["--host", "0.0.0.0", "--port", "9200"]) == ("127.0.0.1:9200", ["--insecure"])
    assert supernode.runtime_address(["--port=9201", "--host", "::1"]) == ("[::1]:9201", ["--insecure"])
    assert supernode.runtime_address(["--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem", "--ssl-ca-certfile", "ca.pem"]) == (
        "127.0.0.1:9094", ["--root-certificates", "ca.pem"])
    with pytest.raises(SystemExit, match="--ssl-certfile needs --ssl-ca-certfile"):
        supernode.runtime_address(["--ssl-certfile", "c.pem"])


def test_warm_start_is_on_unless_switched_off_and_a_bad_value_is_named():
    assert supernode.warm_enabled({}) is True
    assert supernode.warm_enabled({"FEDSSL_WARM_CLIENTAPP": "false"}) is False
    with pytest.raises(SystemExit, match="FEDSSL_WARM_CLIENTAPP='maybe': expected true or false"):
        supernode.warm_enabled({"FEDSSL_WARM_CLIENTAPP": "maybe"})


def test_the_fork_executor_runs_clientapp_tasks_only():
    executor = warm_exec.ForkExecutor()
    eligible, _ = executor.get_eligible_capacity({TaskType.CLIENT_APP, TaskType.SERVER_APP})
    assert eligible == {TaskType.CLIENT_APP}
    spec = ExecutionSpec(task_type=TaskType.SERVER_APP, runtime_api_address="127.0.0.1:1", token="t", insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
                         suppress_output=False, task_id=1)
    result = executor.launch(spec)
    assert result.status == LaunchResultStatus.FAILED and "ClientApp tasks only" in result.message
    assert not executor.children  # nothing was forked


def test_help_and_an_explicit_isolation_run_flowers_supernode_unchanged():
    out = subprocess.run([str(P.VENV_BIN / "fedssl-supernode"), "--help"], env=P.base_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "usage: flower-supernode" in out.stdout


def test_the_warm_superexec_freezes_what_it_preloaded_so_a_forked_tasks_collections_skip_it():
    """gc.freeze before forking: a task's garbage collections leave the preloaded objects (and
    the pages they sit on, shared with the SuperExec) alone, while its own objects are collected."""
    script = """
import gc, os, sys
from fedssl_flower import warm_exec
warm_exec.preload(("numpy",))
import numpy
assert id(numpy.__dict__) in {id(o) for o in gc.get_objects()}  # tracked before
frozen = warm_exec.freeze_preloaded()
assert frozen > 1000 and gc.get_count()[2] == 0, (frozen, gc.get_count())
pid = os.fork()
if pid == 0:
    gc.collect()
    tracked = {id(o) for o in gc.get_objects()}
    mine = [[]]
    ok = id(numpy.__dict__) not in tracked and id(mine) in {id(o) for o in gc.get_objects()}
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print("frozen", frozen, "child", os.waitstatus_to_exitcode(status))
"""
    out = subprocess.run([str(P.VENV_BIN / "python"), "-c", script], env=P.base_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("child 0"), out.stdout


def _warm_superexec(node: P.Proc) -> tuple[int, str]:
    """The pid of the warm SuperExec a real fedssl-supernode started, once it has frozen its
    preload (its SuperLink need not exist: the SuperNode keeps trying), and the log so far."""
    deadline = time.monotonic() + 240
    while "objects frozen for the tasks to share" not in node.text():
        assert node.popen.poll() is None and time.monotonic() < deadline, node.text()[-3000:]
        time.sleep(0.2)
    superexecs = [pid for pid, cmd in superlink._descendants(node.popen.pid).items() if "fedssl_flower.warm_exec" in cmd]
    assert len(superexecs) == 1, node.text()[-3000:]
    return superexecs[0], node.text()


def test_a_real_supernodes_warm_superexec_allocates_with_jemalloc_and_its_preload_frozen(tmp_path):
    """fedssl-supernode starts the warm SuperExec with jemalloc preloaded (scripts/bootstrap.sh
    installs it into the virtualenv) and configured, the SuperExec says so from inside (jemalloc's
    own `mallctl` is what its process resolves), and it freezes what it preloaded before it
    serves a task."""
    c = P.Cluster(tmp_path)
    try:
        node = P.start_supernode(c, P.free_port(), "node", P.node_config(hospital="h"))
        pid, log = _warm_superexec(node)
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"LD_PRELOAD={P.VENV_BIN.parent / 'lib' / 'libjemalloc.so.2'}".encode() in environ
        assert f"MALLOC_CONF={allocator.JEMALLOC_CONF}".encode() in environ
        assert "libjemalloc.so.2" in Path(f"/proc/{pid}/maps").read_text()
        assert f"allocator: jemalloc, MALLOC_CONF={allocator.JEMALLOC_CONF})" in log
        assert "glibc" not in log  # no warning that it fell back
        frozen = re.search(r"\((\d+) objects frozen", log)
        assert frozen and int(frozen.group(1)) > 100_000  # torch, torchvision, timm and Flower's objects
        # the SuperNode process itself runs Flower's SuperNode (gRPC's library is mapped) without SQLAlchemy's
        maps = Path(f"/proc/{node.popen.pid}/maps").read_text()
        assert "cygrpc" in maps and "sqlalchemy" not in maps
    finally:
        c.close()


def test_the_supernode_process_keeps_its_objects_in_memory_without_loading_the_sql_store():
    """fedssl-supernode replaces Flower's SQL object store module before the SuperNode is
    imported: SQLAlchemy and alembic stay out of the process, the SuperNode's in-memory store
    works, and building the SQL store fails naming why."""
    script = """
import sys
from fedssl_flower import supernode
supernode.without_sql_object_store()
from flwr.supernode.cli import flower_supernode
from flwr.supercore.object_store import ObjectStoreFactory
print(sorted(m for m in ("sqlalchemy", "alembic") if m in sys.modules))
print(type(ObjectStoreFactory().store()).__name__)
try:
    ObjectStoreFactory("state.db").store()
except RuntimeError as exc:
    print(exc)
"""
    out = subprocess.run([str(P.VENV_BIN / "python"), "-c", script], env=P.base_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded, store, refused = out.stdout.splitlines()
    assert (loaded, store) == ("[]", "InMemoryObjectStore")
    assert refused.startswith("fedssl-supernode: Flower's SQL object store ('state.db') is not loaded in this process")


def test_a_real_supernode_asked_for_a_missing_jemalloc_stops_and_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "libjemalloc.so.2"
    out = subprocess.run([str(P.VENV_BIN / "fedssl-supernode"), "--insecure", "--superlink", "127.0.0.1:1"],
                         env=P.base_env(FEDSSL_CLIENTAPP_ALLOCATOR="jemalloc", FEDSSL_JEMALLOC_PATH=str(missing)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"FEDSSL_JEMALLOC_PATH='{missing}': no such file; expected the path of libjemalloc.so.2" in out.stderr
    assert "warm_exec" not in out.stderr  # nothing was started

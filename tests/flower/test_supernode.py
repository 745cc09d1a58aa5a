"""fedssl-supernode's own decisions (the federation tests run it for real: every SuperNode in
them is a fedssl-supernode whose ClientApp tasks are forked by fedssl_flower.warm_exec)."""

import subprocess

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResultStatus

from fedssl_flower import supernode, warm_exec
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

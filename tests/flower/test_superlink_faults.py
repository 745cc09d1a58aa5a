"""Faults of the SuperLink on real processes: a long-held SQLite lock is waited out, and a
SIGTERM (a pod deleted or rolled) is recorded and resumed from. In their own module so that
the suite's workers (pytest-xdist, one module each at a time) run them beside the hospital faults."""

import signal
import time

import pytest

from tests.support import processes as P
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def test_a_locked_superlink_database_is_waited_out(tmp_path, ham10000_dir):
    """A burst of writes (many hospitals pushing 45 MB models at once) holds the SuperLink's
    SQLite lock for seconds. Here this test holds it for 8 s, longer than Flower's own 5 s
    busy timeout, right when a hospital's reply waits to be pulled: with fedssl-superlink's
    60 s timeout every writer (SuperNode polls, the aggregator's pull, the SuperExec) waits,
    nothing answers 500, and the run finishes with every reply. With Flower's 5 s the
    SuperNode gets a 500, drops its connection and the round fails. (Run with strategy=fedavgm,
    server-momentum 0.9: Flower's FedAvgM in a real federation. With one hospital its round-1
    global step is that hospital's update; in round 2 the momentum adds 0.9 x round 1's step,
    so the global model moves by other than the hospital's update.)"""
    import sqlite3
    import subprocess

    with P.cluster(tmp_path) as c:
        link, port = P.start_superlink(c)
        hospital = P.start_supernode(c, port, "solo", P.node_config(
            hospital="solo", **{"ssl-task": "rotation", "data-path": str(ham10000_dir), "max-images": 64,
                                "cache-dir": str(tmp_path / "cache")}))
        args = [str(P.VENV_BIN / "fedssl-submit"), "--superlink", f"127.0.0.1:{port}", "--app", str(P.REPO_ROOT),
                "--flwr-home", str(tmp_path / "cli"), "--poll-seconds", "5",
                "-c", "ssl-rounds=2", "-c", "finetune-rounds=0", "-c", "image-size=32", "-c", "min-hospitals=1",
                "-c", "round-timeout=300.0", "-c", "message-retries=0", "-c", "local-baseline=false",
                "-c", "probe-epochs=1", "-c", "local-steps=2", "-c", "batch-size=32",
                "-c", "arch=\"resnet18\"", "-c", "pretrained=false", "-c", "strategy=\"fedavgm\"", "-c", "server-momentum=0.9"]
        submit = subprocess.Popen(args, env=P.base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        db = sqlite3.connect(tmp_path / "superlink.db", timeout=30, isolation_level=None)
        try:
            wait_for(lambda: len(P.run_rounds(tmp_path)) >= 1, 300, "round 1")
            sent = hospital.text().count("Sent successfully")
            wait_for(lambda: hospital.text().count("Sent successfully") > sent, 300, "round 2's reply")
            db.execute("BEGIN IMMEDIATE")
            time.sleep(8.0)
            db.execute("COMMIT")
            out, _ = submit.communicate(timeout=600)
        finally:
            db.close()
            if submit.poll() is None:
                submit.kill()
        assert submit.returncode == 0, out + c.logs()
        assert "database is locked" not in link.text(), c.logs()
        assert "500 Internal Server Error" not in hospital.text(), c.logs()

    history = P.run_rounds(tmp_path)
    assert [r["round"] for r in history] == [1, 2]
    assert all(list(r["hospitals"]) == ["solo"] and not r["failed_hospitals"] for r in history), history
    steps = [(r["update_norms"]["hospitals"]["solo"], r["update_norms"]["global"]) for r in history]
    assert steps[0][1] == pytest.approx(steps[0][0], rel=1e-4), steps  # FedAvgM's first step: the one update
    assert abs(steps[1][1] - steps[1][0]) > 0.01 * steps[1][0], steps  # then momentum: not the update alone


def test_superlink_sigterm_records_the_stop_and_a_resubmit_resumes(tmp_path, ham10000_dir):
    """SIGTERM to the SuperLink (a pod deleted or rolled): it exits within the chart's 30 s
    grace period although `fedssl-submit` holds a log stream open (it took ~58 s), the
    aggregator records the stop in the registry with its round (the run stayed "running"),
    `fedssl-submit` exits 1 naming a cause, and after a restart on the same database a run
    submitted with resume-from-registry=true continues after the newest registered round."""
    import re
    import subprocess

    def runs(http):
        return {r["run_id"]: r for r in http.get("/v1/runs").json()["runs"]}

    with P.cluster(tmp_path) as c:
        registry = P.start_registry(c, tmp_path / "registry")
        link, port = P.start_superlink(c, registry=registry)
        P.start_supernode(c, port, "solo", P.node_config(
            hospital="solo", **{"ssl-task": "rotation", "data-path": str(ham10000_dir), "max-images": 60,
                                "cache-dir": str(tmp_path / "cache")}))
        config = ["ssl-rounds=4", "finetune-rounds=0", "image-size=32", "min-hospitals=1", "local-baseline=false",
                  "probe-epochs=1", "local-steps=2", "batch-size=16", 'arch="resnet18"', "pretrained=false"]
        args = [str(P.VENV_BIN / "fedssl-submit"), "--superlink", f"127.0.0.1:{port}", "--app", str(P.REPO_ROOT),
                "--flwr-home", str(tmp_path / "cli"), "--poll-seconds", "2", "--superlink-grace", "20"]
        first = subprocess.Popen(args + [a for kv in config for a in ("-c", kv)], env=P.base_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: len(P.run_rounds(tmp_path)) >= 1, 300, "round 1 registered")  # registered before it is on disk
            t0 = time.monotonic()
            link.popen.send_signal(signal.SIGTERM)  # what the kubelet sends the container's main process
            wait_for(lambda: link.popen.poll() is not None, 60, "the SuperLink to exit")
            stop_seconds = time.monotonic() - t0
            out, _ = first.communicate(timeout=300)
        finally:
            if first.poll() is None:
                first.kill()
        assert stop_seconds < 30, f"the SuperLink took {stop_seconds:.0f}s to stop\n{link.text()[-3000:]}"
        with registry.client() as http:
            (stopped,) = runs(http).values()
        assert stopped["status"] == "failed", stopped
        where = re.search(r"stopped during ssl round (\d)", stopped["error"] or "")
        assert where, stopped["error"]
        assert first.returncode == 1 and ("stopped during ssl round" in out or "lost the SuperLink" in out), out

        P.start_superlink(c, registry=registry, port=port, name="superlink-2")  # same port, same database
        again = P.submit(port, tmp_path, *config, "resume-from-registry=true", timeout=600)
        assert again.returncode == 0, again.stdout + again.stderr + c.logs()
        with registry.client() as http:
            resumed = [r for r in runs(http).values() if r["run_id"] != stopped["run_id"]]
            versions = http.get("/v1/models/fedssl-encoder/versions").json()["versions"]
    assert [r["status"] for r in resumed] == ["succeeded"], resumed
    registered = sorted((v["lineage"]["run_id"] == stopped["run_id"], v["lineage"]["round"]) for v in versions)
    done_before = [rnd for first_run, rnd in registered if first_run]
    assert done_before and max(done_before) < 4, registered  # the first run stopped part-way, its rounds kept
    # The resumed run trained only the rounds after the newest registered one.
    assert [rnd for first_run, rnd in registered if not first_run] == list(range(max(done_before) + 1, 5)), registered

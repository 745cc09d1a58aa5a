"""Faults at a hospital on real processes: one killed mid-round does not stop the federation,
one that cannot train is left out with its reason. (The SuperLink's own faults: test_superlink_faults.py.)"""

import json
import signal
import time

import pytest

from tests.support import processes as P
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def test_killed_hospital_is_skipped_then_rejoins(tmp_path, ham10000_dir):
    """(Run with dp=central-fixed, whose assertions here do not depend on the model's values:
    Flower's fixed-clipping wrapper releases round 2 for the one hospital that replied, its
    accountant counts three rounds, and refuses the planned fourth, whose release would pass
    dp-max-epsilon=10 (epsilon 9.01 after three rounds at noise multiplier 1, 10.6 after
    four): the run succeeds with a warning and round 3's model is production.)"""
    import subprocess

    with P.cluster(tmp_path) as c:
        registry = P.start_registry(c, tmp_path / "registry")
        _, port = P.start_superlink(c, registry=registry)

        def hospital(name, i):
            return P.start_supernode(c, port, f"{name}-{time.monotonic_ns()}", P.node_config(
                hospital=name, **{"ssl-task": "rotation", "data-path": str(ham10000_dir), "partition-id": i,
                                  "num-partitions": 2, "max-images": 100, "cache-dir": str(tmp_path / "cache")}))

        hospital("steady", 0)
        victim = hospital("flaky", 1)
        args = [str(P.VENV_BIN / "fedssl-submit"), "--superlink", f"127.0.0.1:{port}", "--app", str(P.REPO_ROOT),
                "--flwr-home", str(tmp_path / "cli"), "--poll-seconds", "1",
                "-c", "ssl-rounds=4", "-c", "finetune-rounds=0", "-c", "image-size=32", "-c", "min-hospitals=1",
                "-c", "round-timeout=90.0", "-c", "message-retries=0", "-c", "local-baseline=false", "-c", "probe-epochs=2",
                "-c", "local-steps=2", "-c", "batch-size=32", "-c", "arch=\"resnet18\"", "-c", "pretrained=false",
                "-c", "dp=\"central-fixed\"", "-c", "dp-noise-multiplier=1.0", "-c", "dp-clipping-norm=1.0",
                "-c", "dp-max-epsilon=10.0"]
        submit = subprocess.Popen(args, env=P.base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            # describe, round 1, round 2: the victim holds round 2's message (and round 1's
            # global model to score with it) when it dies.
            wait_for(lambda: victim.text().count("Received successfully") >= 3, 300, "round 2's message at the victim")
            victim.kill(signal.SIGKILL)
            hospital("flaky", 1)  # the hospital comes back as a new SuperNode
            out, _ = submit.communicate(timeout=600)
        finally:
            if submit.poll() is None:
                submit.kill()
        assert submit.returncode == 0, out + c.logs()
        with registry.client() as http:
            (run,) = http.get("/v1/runs").json()["runs"]
            posted = http.get(f"/v1/runs/{run['run_id']}/rounds").json()["rounds"]
            versions = http.get("/v1/models/fedssl-encoder/versions").json()["versions"]

    history = P.run_rounds(tmp_path)
    assert [r["round"] for r in history] == [1, 2, 3]
    # Differential privacy: one release per round, round 2's for the one hospital that replied.
    assert [(r["privacy"]["releases"], r["privacy"]["hospitals"]) for r in history] == [(1, 2), (2, 1), (3, 2)]
    assert [p["privacy"] for p in posted] == [r["privacy"] for r in history]
    assert 9.0 < history[2]["privacy"]["epsilon"] < 10.0 and history[2]["privacy"]["delta"] == 1e-5
    assert [v["lineage"]["privacy"]["releases"] for v in versions] == [1, 2, 3]
    assert [v["aliases"] for v in versions] == [[], [], ["production"]]
    assert run["status"] == "succeeded" and any(w.startswith("privacy budget reached: stopped before ssl round 4") for w in run["warnings"])
    assert "phase=ssl round=3 privacy: epsilon=" in out
    trained = [sorted(r["examples"]) for r in history]  # who trained each round's model
    assert trained[0] == ["flaky", "steady"]
    assert trained[1] == ["steady"] and history[1]["failed_hospitals"] == ["flaky"]
    assert "hospital flaky did not answer; aggregating the 1 others" in out
    assert "hospital flaky reconnected as node" in out
    assert trained[2] == ["flaky", "steady"]  # rejoined
    assert sorted(history[1]["hospitals"]) == ["flaky", "steady"]  # the new flaky scored round 2's model


def test_a_hospital_that_cannot_train_is_left_out_with_its_reason(tmp_path, ham10000_dir):
    """A hospital with one training image cannot take a round (BatchNorm and SimCLR need two
    images in a batch). It used to reply with a NaN loss, and posting that round to the
    registry crashed the run. Now it says why, is left out of the round, and the run, with
    its registry, goes on. (Run with strategy=fedprox, whose outcome with one training
    hospital is FedAvg's: Flower's FedProx sends proximal-mu, the hospital trains with the
    proximal term, and the registered versions name the strategy in their recipe.)"""
    with P.cluster(tmp_path) as c:
        registry = P.start_registry(c, tmp_path / "registry")
        _, port = P.start_superlink(c, registry=registry)
        for name, images in (("steady", 60), ("tiny", 1)):
            P.start_supernode(c, port, name, P.node_config(
                hospital=name, **{"ssl-task": "simclr", "data-path": str(ham10000_dir), "max-images": images,
                                  "cache-dir": str(tmp_path / "cache")}))
        done = P.submit(port, tmp_path, "ssl-rounds=1", "finetune-rounds=1", "image-size=32", "min-hospitals=1",
                        "round-timeout=300.0", "local-baseline=false", "probe-epochs=1", "local-steps=2", "batch-size=16",
                        'arch="resnet18"', "pretrained=false", "strategy=fedprox", "proximal-mu=0.01", timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr + c.logs()
        with registry.client() as http:
            (run,) = http.get("/v1/runs").json()["runs"]
            posted = http.get(f"/v1/runs/{run['run_id']}/rounds").json()["rounds"]
            versions = http.get("/v1/models/fedssl-classifier/versions").json()["versions"]

    history = P.run_rounds(tmp_path)
    assert [(r["phase"], r["round"]) for r in history] == [("ssl", 1), ("finetune", 1)]
    for r in history:
        assert list(r["examples"]) == ["steady"], r  # only the hospital that trained is averaged
        assert r["skipped_hospitals"] == {"tiny": f"1 training image(s); {r['phase']} training needs at least 2"}, r
        assert not r["failed_hospitals"], r
    assert "hospital tiny left out: 1 training image(s); ssl training needs at least 2" in done.stdout + done.stderr
    assert [p["skipped_hospitals"] for p in posted] == [r["skipped_hospitals"] for r in history], posted
    assert [p["refused_hospitals"] for p in posted] == [r["refused_hospitals"] for r in history] == [{}, {}], posted
    assert run["config"]["strategy"] == "fedprox" and run["config"]["proximal-mu"] == 0.01
    assert {(v["lineage"]["recipe"]["strategy"], json.dumps(v["lineage"]["recipe"]["strategy_parameters"])) for v in versions} \
        == {("fedprox", '{"proximal-mu": 0.01}')}, versions

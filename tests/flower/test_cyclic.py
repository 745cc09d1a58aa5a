"""strategy=cyclic (cyclic weight transfer) on real processes: a SuperLink, a registry and two
SuperNodes; the model goes from one hospital to the next, every round is scored by both."""

import pytest

from fedssl_core import names
from fedssl_flower.strategy import relay_order
from tests.support import processes as P

pytestmark = pytest.mark.integration


def test_cyclic_weight_transfer_trains_one_hospital_after_another_and_scores_every_round(tmp_path, ham10000_dir):
    hospitals = ("north", "south")
    with P.cluster(tmp_path) as c:
        registry = P.start_registry(c, tmp_path / "registry")
        _, port = P.start_superlink(c, registry=registry)
        for i, name in enumerate(hospitals):
            P.start_supernode(c, port, name, P.node_config(
                hospital=name, **{"ssl-task": "simclr", "data-path": str(ham10000_dir), "partition-id": i, "num-partitions": 2,
                                  "max-images": 40, "cache-dir": str(tmp_path / "cache")}))
        done = P.submit(port, tmp_path, "ssl-rounds=0", "finetune-rounds=2", "image-size=32", "local-baseline=false",
                        "local-steps=2", "batch-size=16", 'arch="resnet18"', "pretrained=false", 'strategy="cyclic"',
                        "seed=3", timeout=600)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out + c.logs()
        with registry.client() as http:
            (run,) = http.get("/v1/runs").json()["runs"]
            versions = http.get("/v1/models/fedssl-classifier/versions").json()["versions"]

    history = P.run_rounds(tmp_path)
    assert [(r["phase"], r["round"]) for r in history] == [("finetune", 1), ("finetune", 2)]
    for rnd, record in enumerate(history, 1):
        order = relay_order(hospitals, 3, names.PHASE_FINETUNE, rnd)
        assert f"finetune round {rnd}: cyclic, the model goes {' -> '.join(order)}" in out
        for i, name in enumerate(order, 1):
            assert f"finetune round {rnd}: hospital {name} trained ({i} of 2)" in out
        assert list(record["examples"]) == list(order), record  # in the order they trained
        assert set(record["update_norms"]["hospitals"]) == set(hospitals)
        for name in hospitals:  # both scored the round's model, in an evaluate exchange of its own
            assert 0 <= record["hospitals"][name][names.M_BALANCED_ACCURACY] <= 1, record
    assert [r["timing"]["evaluated_in"] for r in history] == ["an evaluation before finetune round 2", "a final evaluation"]
    assert run["status"] == "succeeded" and run["config"]["strategy"] == "cyclic"
    assert [(v["lineage"]["recipe"]["strategy"], v["aliases"]) for v in versions] == [("cyclic", []), ("cyclic", ["production"])]

"""Secure aggregation (secure-aggregation=true): Flower's SecAgg+ protocol, its hospital half
(`secaggplus_mod`) on fedssl's ClientApp and its aggregator half (`SecAggPlusWorkflow`) over
fedssl's messaging (`secure_aggregation`).

The protocol tests run Flower's two halves in this process, each hospital a ClientApp with
fedssl's mod and a Context of its own, the messages handed over directly (no SuperLink), so
that every message the aggregator receives can be inspected and each hospital's true update
is known. A real federation (SuperLink, three SuperNodes, fedssl's own ClientApp on
HAM10000 images) runs both phases with one hospital leaving every round's protocol.
"""

import copy
import json
import re

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedssl_core import names, weights
from fedssl_core.models import FedSSLModel
from fedssl_flower import records, secure_aggregation, training
from fedssl_flower.aggregation import update_norm
from fedssl_flower.attack import parse_attack
from fedssl_flower.config import RunConfig
from fedssl_flower.errors import ConfigError
from fedssl_flower.strategy import is_trained
from tests.flower.test_client_app import task_identity  # noqa: F401 (fixture)
from tests.support import processes as P

SHAPES = {"encoder.conv.weight": (64, 3, 3, 3), "encoder.bn.weight": (64,), "encoder.bn.running_var": (64,),
          "encoder.bn.num_batches_tracked": ()}
GLOBAL = {**{k: np.random.default_rng(1).normal(size=s).astype(np.float32) for k, s in SHAPES.items() if "num_batches" not in k},
          "encoder.bn.num_batches_tracked": np.array(10, np.int64),
          "classifier.weight": np.zeros((7, 64), np.float32)}  # not shared in the SSL phase: never in the masked vector
KEYS = sorted(SHAPES)


def _updates(nodes, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for n in nodes:
        u = {k: (rng.normal(scale=1e-3, size=s)).astype(np.float64) for k, s in SHAPES.items() if "num_batches" not in k}
        u["encoder.bn.running_var"] = rng.uniform(-0.5, 0.5, size=SHAPES["encoder.bn.running_var"])
        u["encoder.bn.num_batches_tracked"] = np.array(2.0)
        out[n] = u
    return out


def _hospital_app(updates):
    """A hospital whose training moves the received model by a known update: fedssl's reply
    format and fedssl's mod, so what reaches the aggregator can be checked against it."""
    app = ClientApp(mods=[secure_aggregation.mod])

    @app.train()
    def train(msg, context):
        received = records.from_array_record(msg.content[records.WEIGHTS])
        u = updates[msg.metadata.dst_node_id]
        trained = {k: (received[k].astype(np.float64) + u[k]).astype(received[k].dtype) for k in KEYS}
        return Message(RecordDict({
            records.WEIGHTS: records.to_array_record(trained),
            records.METRICS: records.to_metric_record({names.M_EXAMPLES: int(context.node_config["examples"])}),
            records.INFO: records.config_record({"hospital": context.node_config["hospital"]}),
        }), reply_to=msg)

    return app


class _Federation:
    """Hospitals `nodes` (node id -> examples) answering in this process; `seen` keeps every
    message both ways, by SecAgg+ stage."""

    def __init__(self, examples, updates, attacks=None, run_config=None):
        self.app = _hospital_app(updates)
        self.contexts = {n: Context(run_id=3, node_id=n, state=RecordDict(), run_config=run_config or {},
                                    node_config={"hospital": f"h{n}", "examples": e, **({"attack": attacks[n]} if n in (attacks or {}) else {})})
                         for n, e in examples.items()}
        self.seen: list[tuple[str, Message, Message]] = []

    def exchange(self, msgs):
        out = {}
        for m in msgs:
            n = m.metadata.dst_node_id
            stage = str(m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
            try:  # a copy, as the hospital's copy arrives over the wire (Flower's mod pops the stage from it)
                reply = self.app(copy.deepcopy(m), self.contexts[n])
            except Exception as exc:  # what a SuperNode sends back when its ClientApp fails
                reply = Message(error=Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=m)
            self.seen.append((stage, m, reply))
            out[n] = reply
        return out, []

    def run(self, cfg=None, rnd=1):
        contents = {n: RecordDict({records.WEIGHTS: records.to_array_record(GLOBAL),
                                   records.CONFIG: records.config_record({"phase": "ssl", "round": rnd})}) for n in self.contexts}
        keys = secure_aggregation.update_keys(GLOBAL, "ssl", cfg or RunConfig())
        assert keys == KEYS  # the classifier is not shared in the SSL phase
        return secure_aggregation.SecureRound(cfg or RunConfig(secure_aggregation=True)).run(
            self.exchange, contents, keys, SHAPES, rnd, max(int(c.node_config["examples"]) for c in self.contexts.values()))


def _weighted(updates, examples):
    total = sum(examples.values())
    return {k: sum(updates[n][k] * examples[n] for n in examples) / total for k in KEYS}


def _masked(reply):
    return [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]


def test_the_aggregator_gets_masked_noise_from_each_hospital_and_the_exact_weighted_average_from_all():
    examples = {11: 100, 12: 300, 13: 50, 14: 550}
    updates = _updates(examples)
    fed = _Federation(examples, updates)
    result = fed.run()
    assert result.average is not None and not result.dropped and result.halted_at is None
    assert [s["stage"] for s in result.stages] == list(names.SECAGG_STAGES)
    assert result.num_shares == 4 and result.threshold == 3  # every hospital a neighbour; round(0.67 * 4)
    expected = _weighted(updates, examples)
    # Stochastic quantisation to 2^22 levels over +-8: each hospital's rounding is at most one
    # step (16 / 2^22) of its weighted update, 4 * 3.8e-6 * 550 / 1000 in all.
    for k in KEYS:
        np.testing.assert_allclose(result.average[k], expected[k], rtol=0, atol=1e-5)
        assert np.abs(result.average[k] - expected[k]).max() < np.abs(expected[k]).max() / 20 or k.endswith("tracked")

    collected = {m.metadata.dst_node_id: reply for stage, m, reply in fed.seen if stage == "collect_masked_vectors"}
    assert set(collected) == set(examples)
    for n, reply in collected.items():
        assert not reply.has_error(), reply.error
        # What the hospital sent: no weights, no update, only a masked vector in a config record.
        assert records.WEIGHTS not in reply.content
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        assert int(reply.content[records.METRICS][names.M_EXAMPLES]) == examples[n]  # the count is plaintext, as without it
        masked = _masked(reply)
        assert [a.size for a in masked[1:]] == [int(np.prod(SHAPES[k])) for k in KEYS]
        values = np.concatenate([a.ravel() for a in masked]).astype(np.float64)
        assert values.min() >= 0 and values.max() < 2**32
        assert abs(values.mean() / 2**32 - 0.5) < 0.05  # uniform over the modulus, whatever the update
        update = np.concatenate([updates[n][k].ravel() for k in KEYS])
        assert abs(np.corrcoef(values[1:], update)[0, 1]) < 0.12
        # Unmasked as the aggregator unmasks the sum, one hospital's vector is garbage: errors of
        # the order of the clipping range against updates of order 1e-3.
        factor, decoded = int(masked[0][0]), np.concatenate([a.ravel() for a in masked[1:]]).astype(np.float64)
        assert factor != round(examples[n] / 550 * 2**22)  # even the weight is masked
        as_update = (decoded * 16 / 2**22 - 8) * 2**22 / max(factor, 1)
        assert np.median(np.abs(as_update - update)) > 0.1
    # The other stages carry keys, encrypted shares and shares of secrets; never arrays.
    for stage, m, reply in fed.seen:
        if stage != "collect_masked_vectors":
            assert records.WEIGHTS not in m.content and not reply.content.array_records


def test_a_hospital_leaving_at_unmask_still_counts_one_leaving_at_collect_is_left_out():
    examples = {21: 200, 22: 300, 23: 400, 24: 100}
    updates = _updates(examples, seed=1)
    late = _Federation(examples, updates, attacks={24: "drop:unmask"}).run()
    assert late.average is not None and set(late.dropped) == {24} and late.dropped[24].startswith("unmask: RuntimeError: hospital h24")
    for k in KEYS:  # its masked vector was summed; its private mask rebuilt from the others' shares
        np.testing.assert_allclose(late.average[k], _weighted(updates, examples)[k], rtol=0, atol=1e-5)

    early = _Federation(examples, updates, attacks={24: "drop:collect_masked_vectors"}).run()
    assert early.average is not None and set(early.dropped) == {24} and 24 not in {
        n for n, r in early.replies.items() if not r.has_error()}
    rest = {n: e for n, e in examples.items() if n != 24}
    for k in KEYS:  # its pairwise masks on the others' vectors removed with its reconstructed key
        np.testing.assert_allclose(early.average[k], _weighted(updates, rest)[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("stage", ["setup", "share_keys"])
def test_a_hospital_leaving_before_the_masks_is_left_out_and_the_others_are_unmasked(stage):
    """Flower 1.41's workflow lists a hospital that left at setup or share keys as dead at
    unmask, and every other hospital then fails looking up a share it never received: the
    round died. fedssl's SecureRound goes on with those that completed share keys."""
    examples = {61: 200, 62: 300, 63: 400, 64: 100}
    updates = _updates(examples, seed=2)
    result = _Federation(examples, updates, attacks={64: f"drop:{stage}"}).run()
    assert result.average is not None and set(result.dropped) == {64} and result.dropped[64].startswith(f"{stage}: ")
    rest = {n: e for n, e in examples.items() if n != 64}
    for k in KEYS:
        np.testing.assert_allclose(result.average[k], _weighted(updates, rest)[k], rtol=0, atol=1e-5)


def test_below_the_reconstruction_threshold_the_round_halts_and_says_where():
    examples = {31: 200, 32: 300, 33: 400, 34: 100}
    fed = _Federation(examples, _updates(examples), attacks={33: "drop:share_keys", 34: "drop:share_keys"})
    result = fed.run()
    assert result.average is None and result.halted_at == "share_keys" and result.threshold == 3
    assert sorted(result.dropped) == [33, 34] and all(w.startswith("share_keys: RuntimeError") for w in result.dropped.values())
    assert not any(stage == "collect_masked_vectors" for stage, _, _ in fed.seen)  # no update was ever masked, let alone sent


def test_a_hospital_with_a_non_finite_update_refuses_to_send_it_and_drops_out():
    examples = {41: 200, 42: 300, 43: 400}
    updates = _updates(examples)
    updates[43]["encoder.conv.weight"][0, 0, 0, 0] = np.nan
    result = _Federation(examples, updates).run()
    assert set(result.dropped) == {43} and "NaN or infinite values in encoder.conv.weight" in result.dropped[43]
    rest = {n: e for n, e in examples.items() if n != 43}
    np.testing.assert_allclose(result.average["encoder.bn.weight"], _weighted(updates, rest)["encoder.bn.weight"], rtol=0, atol=1e-5)


def test_update_values_beyond_the_clipping_range_are_counted_and_reported():
    examples = {51: 100, 52: 100}
    updates = _updates(examples)
    updates[51]["encoder.bn.running_var"][:3] = 20.0  # beyond +-8
    fed = _Federation(examples, updates)
    fed.run()
    clipped = {m.metadata.dst_node_id: int(r.content[records.METRICS][secure_aggregation.CLIPPED])
               for stage, m, r in fed.seen if stage == "collect_masked_vectors"}
    assert clipped == {51: 3, 52: 0}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"secure-aggregation": True, "strategy": "fedmedian"},
     "secure-aggregation=true needs a strategy that only averages (fedavg, fedavgm, fedadam, fedyogi, fedadagrad, fedprox), "
     "not strategy=fedmedian"),
    ({"secure-aggregation": True, "dp": "central-fixed"}, "secure-aggregation=true needs dp=off or dp=local, not dp=central-fixed"),
    ({"secure-aggregation": True, "register-local-models": True}, "would send each hospital's own model unmasked"),
    ({"secure-aggregation": True, "hospital-batchnorm": True}, "would send each hospital's feature statistics unmasked"),
    ({"secure-aggregation": True, "min-hospitals": 1}, "secure-aggregation=true needs min-hospitals >= 2"),
    ({"secure-aggregation": True, "secagg-num-shares": 2.0}, "secagg-num-shares must be a fraction of the round's hospitals "
                                                             "in (0, 1] or a whole count >= 3, got 2"),
    ({"secure-aggregation": True, "secagg-reconstruction-threshold": 0.0}, "secagg-reconstruction-threshold must be a fraction"),
    ({"secure-aggregation": True, "secagg-num-shares": 3.0, "secagg-reconstruction-threshold": 3.0},
     "secagg-reconstruction-threshold=3 must be below secagg-num-shares=3"),
    ({"secure-aggregation": True, "secagg-clipping-range": -1.0}, "secagg-clipping-range must be > 0, got -1.0"),
    ({"secagg-clipping-range": 2.0}, "secagg-clipping-range act(s) with secure-aggregation=true only"),
])
def test_secure_aggregation_settings_that_cannot_work_are_refused_with_the_reason(overrides, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(overrides)
    assert message in str(err.value)


def test_a_drop_attack_names_a_secagg_stage():
    assert str(parse_attack("drop:unmask")) == "drop:unmask" and not parse_attack("drop:unmask").changes_update
    with pytest.raises(ConfigError, match=r"the stage after 'drop:' must be one of setup, share_keys, collect_masked_vectors, unmask"):
        parse_attack("drop:later")


@pytest.mark.integration
def test_a_real_federation_aggregates_both_phases_securely_while_a_hospital_leaves_every_round(tmp_path, ham10000_dir):
    """Three SuperNodes running fedssl's ClientApp on HAM10000 images, secure-aggregation=true
    with strategy=fedadam, one SSL and one fine-tune round. Hospital "leaver" fails every
    round's unmask stage on purpose: its masked update was already collected, so the others'
    shares unmask it and the round aggregates all three (threshold 2 of 3). The records hold no
    hospital's update norm (the aggregator never saw one), the stages' cost, and a global model
    that moved as Flower's FedAdam moves it from the unmasked average: a first Adam step changes
    no trained parameter by more than server-eta (1e-5 here; the average of the hospitals' two
    AdamW steps of lr 1e-3 moves them by up to ~1e-3), while BatchNorm statistics take the
    average itself. Then a fourth hospital joins that leaves at setup, and a run with a
    threshold of 3 of 4 shares fails at the unmask stage, naming both dropouts."""
    hospitals = {"a": None, "b": None, "leaver": "drop:unmask"}
    with P.cluster(tmp_path) as c:
        _, port = P.start_superlink(c)
        logs = P.start_ham_hospitals(c, port, ham10000_dir, tmp_path / "cache", hospitals)
        done = P.submit(port, tmp_path, "ssl-rounds=1", "finetune-rounds=1", "image-size=16", "min-hospitals=3",
                        "local-baseline=false", "probe-epochs=1", "local-steps=2", "batch-size=16", 'arch="efficientnet_lite0"',
                        "pretrained=false", "secure-aggregation=true", 'strategy="fedadam"', "server-eta=1e-5", timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr + c.logs()
        # Below the threshold: a fourth hospital that leaves at setup, and a threshold of 3 of 4
        # shares; after the leaver's unmask dropout two hospitals are left, the round cannot be
        # unmasked and the run fails saying where and who.
        logs |= P.start_ham_hospitals(c, port, ham10000_dir, tmp_path / "cache", {"quitter": "drop:setup"})
        failed = P.submit(port, tmp_path, "ssl-rounds=1", "finetune-rounds=0", "image-size=16", "min-hospitals=4",
                          "local-baseline=false", "probe-epochs=1", "local-steps=2", "batch-size=16", 'arch="efficientnet_lite0"',
                          "pretrained=false", "secure-aggregation=true", "secagg-reconstruction-threshold=3.0", timeout=600)
        texts = {name: proc.text() for name, proc in logs.items()}
    assert failed.returncode != 0, failed.stdout
    assert re.search(r"ssl round 1: secure aggregation halted at its unmask stage: too few hospitals left to unmask the sum "
                     r"\(reconstruction threshold 3 of 4 shares; dropped: leaver \(unmask: .*\); quitter \(setup: .*\)\); "
                     r"the global model stays at the previous round's", failed.stdout), failed.stdout
    assert "hospital leaver LEAVES secure aggregation ON PURPOSE at its unmask stage" in texts["leaver"]
    assert "hospital quitter LEAVES secure aggregation ON PURPOSE at its setup stage" in texts["quitter"]

    run_dir = tmp_path / "runs" / re.search(r"submitted run (\d+)", done.stdout).group(1)
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["round"]) for r in rounds] == [("ssl", 1), ("finetune", 1)]
    torch.manual_seed(0)
    previous = FedSSLModel("efficientnet_lite0", num_classes=len(names.HAM10000_CLASSES)).state_dict()
    for r in rounds:
        s = r["secure_aggregation"]
        assert [st["stage"] for st in s["stages"]] == list(names.SECAGG_STAGES) and s["reconstruction_threshold"] == 2
        (why,) = s["dropped"].values()  # by node id: the leaver's
        assert why.startswith("unmask: ") and "hospital leaver left secure aggregation at its unmask stage on purpose" in why
        assert sorted(r["examples"]) == sorted(hospitals) and not r["failed_hospitals"]  # the leaver's update counts
        assert r["update_norms"]["hospitals"] == {} and r["update_norms"]["global"] > 0
        assert r["hospitals"]["a"][secure_aggregation.CLIPPED] == 0
        saved = weights.load_file(run_dir / "weights" / f"{r['phase']}-round-001.safetensors")
        shared = training.shared_groups(r["phase"], "encoder", "full")  # the run's finetune-mode
        start = records.state_arrays(previous, shared)
        now = records.state_arrays(saved, shared)
        assert all(np.isfinite(v).all() for v in now.values() if np.issubdtype(v.dtype, np.floating))
        assert update_norm(now, start) == pytest.approx(r["update_norms"]["global"], rel=1e-5)
        trained = [k for k in now if is_trained(k, now[k])]
        assert max(float(np.abs(now[k].astype(np.float64) - start[k]).max()) for k in trained) <= 1.0001e-5  # FedAdam's step
        stats = [k for k in now if k.endswith("running_var")]
        assert max(float(np.abs(now[k] - start[k]).max()) for k in stats) > 1e-3  # the plain average of the hospitals'
        previous = saved

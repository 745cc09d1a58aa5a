"""The aggregator's SuperLink calls (`messaging`): transient failures are waited out, real errors are not.

A real HTTP server on a free port answers with the statuses a SuperLink sends; the calls go
through httpx, as Flower's Grid does."""

from __future__ import annotations

import logging
from typing import ClassVar

import httpx
import pytest

from fedssl_flower import messaging, server_app
from tests.support.http import QuietHandler, serve


class Statuses(QuietHandler):
    script: ClassVar[list[int]] = []

    def do_POST(self):
        status = self.script.pop(0) if self.script else 200
        self.reply(status, b'{"ok": true}' if status == 200 else b'{"detail": "database is locked"}')


@pytest.fixture
def superlink():
    with serve(Statuses) as url:
        yield url


def _call(url):
    calls = []

    def call():
        calls.append(1)
        res = httpx.post(f"{url}/v1/runtime/pull-messages")
        res.raise_for_status()
        return res.json()

    return call, calls


def test_a_500_is_retried_until_the_superlink_answers(superlink, capsys):
    Statuses.script = [500, 500]
    call, calls = _call(superlink)
    assert messaging.superlink_call("pull-messages", call, retry_seconds=30) == {"ok": True}
    assert len(calls) == 3
    out = capsys.readouterr().out
    assert "[fedssl] SuperLink pull-messages failed (HTTP 500); trying again in 1s" in out
    assert "trying again in 2s" in out


def test_a_4xx_is_raised_at_once(superlink):
    Statuses.script = [403]
    call, calls = _call(superlink)
    with pytest.raises(httpx.HTTPStatusError, match="403"):
        messaging.superlink_call("pull-messages", call, retry_seconds=30)
    assert len(calls) == 1


def test_retries_stop_at_the_deadline(superlink):
    Statuses.script = [503] * 10
    call, calls = _call(superlink)
    with pytest.raises(httpx.HTTPStatusError, match="503"):
        messaging.superlink_call("pull-messages", call, retry_seconds=2.5)
    assert len(calls) == 2  # tried, waited 1 s, tried; waiting 2 s more would pass the deadline


def test_a_superlink_that_is_gone_is_retried_then_raised():
    with httpx.Client() as client:
        dead = f"http://127.0.0.1:{_closed_port()}/v1/runtime/pull-messages"
        calls = []

        def call():
            calls.append(1)
            return client.post(dead)

        with pytest.raises(httpx.ConnectError):
            messaging.superlink_call("pull-messages", call, retry_seconds=1.5)
    assert len(calls) == 2


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ refused updates, on the aggregator's reply path
import uuid  # noqa: E402

import numpy as np  # noqa: E402
from flwr.app import Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedssl_core import names  # noqa: E402
from fedssl_flower import records  # noqa: E402
from fedssl_flower.config import RunConfig  # noqa: E402
from fedssl_flower.hospitals import Hospital  # noqa: E402
from fedssl_flower.strategy import relay_order, weighted_average  # noqa: E402

HOSPITALS = {1: ("a", 30), 2: ("b", 10), 3: ("garbage", 20)}


class AnsweringGrid:
    """The Grid calls the aggregator makes, answered at once: each train message gets the
    reply `answer(node, sent_arrays)` builds, a real Flower reply Message (`reply_to`); ids
    are given as Flower's InMemoryGrid gives them."""

    def __init__(self, answer):
        self.answer, self.replies = answer, {}

    def get_node_ids(self):
        return list(HOSPITALS)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            sent = records.from_array_record(msg.content[records.WEIGHTS])
            self.replies[msg.metadata.message_id] = Message(self.answer(msg.metadata.dst_node_id, sent), reply_to=msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def _update(node, sent):
    """Hospital `node`'s reply: the shared classifier moved by its node number; the garbage
    hospital's holds a NaN."""
    arrays = {k: v + np.float32(node) for k, v in sent.items() if k.startswith(f"{names.GROUP_CLASSIFIER}.")}
    if HOSPITALS[node][0] == "garbage":
        arrays[f"{names.GROUP_CLASSIFIER}.bias"][0] = np.nan
    return RecordDict({records.WEIGHTS: records.to_array_record(arrays),
                       records.METRICS: records.to_metric_record({names.M_EXAMPLES: HOSPITALS[node][1]})})


def _aggregator(tmp_path, monkeypatch, **run_config):
    for key, value in {"_run_id": 3, "_node_id": 0, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, key, value)
    monkeypatch.delenv(names.ENV_REGISTRY_URL, raising=False)
    cfg = RunConfig.from_mapping({"arch": "resnet18", "pretrained": False, "finetune-mode": "linear", "message-retries": 0,
                                  "runs-dir": str(tmp_path), "round-timeout": 5.0, **run_config})
    agg = server_app.Aggregator(AnsweringGrid(_update), cfg, "run-1")
    agg.hospitals.class_names = ["x", "y"]
    agg.hospitals.by_node = {n: Hospital(name, names.SSL_SIMCLR, agg.hospitals.class_names, {}, [n]) for n, (name, _) in HOSPITALS.items()}
    agg._init_model()
    return agg


def test_a_garbage_update_is_refused_with_its_reason_and_the_others_are_aggregated(tmp_path, monkeypatch, capsys):
    agg = _aggregator(tmp_path, monkeypatch, **{"strategy": "fedmedian"})
    before = {k: v.numpy().copy() for k, v in agg.state.items() if k.startswith(f"{names.GROUP_CLASSIFIER}.")}
    trained = agg._round(names.PHASE_FINETUNE, 1, 1, None)
    why = f"tensor {names.GROUP_CLASSIFIER}.bias holds NaN or infinite values"
    assert trained.refused == {"garbage": why}
    assert sorted(trained.examples) == ["a", "b"] and not trained.failed
    assert f"finetune round 1: hospital garbage's update refused: {why}" in capsys.readouterr().out
    # The median of the two accepted hospitals: their mean, the state moved by (1 + 2) / 2.
    for k, v in before.items():
        np.testing.assert_allclose(agg.state[k].numpy(), v + 1.5, rtol=1e-6)
    assert all(np.isfinite(v.numpy()).all() for v in agg.state.values() if v.is_floating_point())
    # How far each accepted update and the new global model moved (L2, trained parameters).
    size = np.sqrt(sum(v.size for v in before.values()))
    assert trained.update_norms["hospitals"] == {"a": pytest.approx(1 * size, rel=1e-5), "b": pytest.approx(2 * size, rel=1e-5)}
    assert trained.update_norms["global"] == pytest.approx(1.5 * size, rel=1e-5)


def test_refused_hospitals_are_named_when_too_few_remain(tmp_path, monkeypatch):
    agg = _aggregator(tmp_path, monkeypatch, **{"min-hospitals": 3})
    with pytest.raises(server_app.RunFailed, match=r"only 2 hospital\(s\) trained .*refused: garbage: tensor classifier.bias holds NaN"):
        agg._round(names.PHASE_FINETUNE, 1, 1, None)


def test_the_default_round_is_fedavg_of_the_accepted_updates(tmp_path, monkeypatch):
    agg = _aggregator(tmp_path, monkeypatch)
    before = {k: v.numpy().copy() for k, v in agg.state.items() if k.startswith(f"{names.GROUP_CLASSIFIER}.")}
    agg._round(names.PHASE_FINETUNE, 1, 1, None)
    expected = weighted_average([({k: v + np.float32(n) for k, v in before.items()}, HOSPITALS[n][1]) for n in (1, 2)])
    assert all(agg.state[k].numpy().tobytes() == expected[k].tobytes() for k in expected)
    assert agg.report.recipe()["strategy"] == "fedavg"
    assert agg.report.recipe()["strategy_parameters"] == {"server-lr": 1.0, "server-momentum": 0.0}


def test_cyclic_relays_the_model_from_hospital_to_hospital(tmp_path, monkeypatch, capsys):
    """strategy=cyclic: one train message at a time, in the relay order; each hospital trains
    from the model the one before it returned, a refused update is not passed on, and the
    round's model is the last accepted one's (each hospital moved it by its node number)."""
    agg = _aggregator(tmp_path, monkeypatch, strategy="cyclic")
    classifier = f"{names.GROUP_CLASSIFIER}."
    before = {k: v.numpy().copy() for k, v in agg.state.items() if k.startswith(classifier)}
    received, answer = [], agg.messenger.grid.answer

    def recording(node, sent):
        received.append((node, {k: v for k, v in sent.items() if k.startswith(classifier)}))
        return answer(node, sent)

    agg.messenger.grid.answer = recording
    trained = agg._round(names.PHASE_FINETUNE, 1, 1, None)
    order = relay_order(sorted(HOSPITALS, key=lambda n: HOSPITALS[n][0]), agg.cfg.seed, names.PHASE_FINETUNE, 1)
    assert [node for node, _ in received] == order  # one at a time, in the relay order
    moved = 0.0
    for node, sent in received:
        for k, v in before.items():
            np.testing.assert_allclose(sent[k], v + moved, rtol=1e-6, err_msg=f"hospital {HOSPITALS[node][0]} got another model")
        if HOSPITALS[node][0] != "garbage":  # refused: the next hospital gets the model the garbage hospital was sent
            moved += node
    for k, v in before.items():
        np.testing.assert_allclose(agg.state[k].numpy(), v + 3, rtol=1e-6)  # a (+1) and b (+2) both in it
    assert trained.refused == {"garbage": f"tensor {names.GROUP_CLASSIFIER}.bias holds NaN or infinite values"}
    assert list(trained.examples) == [HOSPITALS[n][0] for n in order if HOSPITALS[n][0] != "garbage"]
    size = np.sqrt(sum(v.size for v in before.values()))  # each update measured from the model it was sent
    assert trained.update_norms["hospitals"] == {"a": pytest.approx(1 * size, rel=1e-5), "b": pytest.approx(2 * size, rel=1e-5)}
    assert trained.update_norms["global"] == pytest.approx(3 * size, rel=1e-5)
    out = capsys.readouterr().out
    assert "finetune round 1: cyclic, the model goes " + " -> ".join(HOSPITALS[n][0] for n in order) in out
    assert agg.report.recipe()["strategy"] == "cyclic" and agg.report.recipe()["strategy_parameters"] == {}


def test_cyclic_with_local_dp_accounts_one_release_per_round(tmp_path, monkeypatch):
    """dp=local with strategy=cyclic: the hospitals noise their own updates (against the model
    each was sent); the aggregator's account counts one release for the round's hospitals."""
    agg = _aggregator(tmp_path, monkeypatch, strategy="cyclic", dp="local", **{"min-hospitals": 1})
    trained = agg._round(names.PHASE_FINETUNE, 1, 1, None)
    assert trained.privacy["mechanism"] == "local" and trained.privacy["releases"] == 1
    assert trained.privacy["hospitals"] == 2  # the accepted updates (the garbage one is refused)


def test_hospital_batchnorm_statistics_are_taken_only_when_every_hospital_sent_valid_ones(tmp_path, monkeypatch, capsys):
    """hospital-batchnorm: the final evaluation's replies carry each hospital's BatchNorm
    statistics of the global encoder; checked against its layers, they go to the classifier
    only when every hospital sent valid ones, else none do and a run warning names each
    hospital and why (a classifier serves each hospital its own statistics or none at all)."""
    import torch
    from flwr.app import MessageType

    from fedssl_core import hospital_batchnorm

    agg = _aggregator(tmp_path, monkeypatch)
    own = {k: v.numpy() for k, v in agg.state.items() if k.startswith("encoder.") and k.endswith(("running_mean", "running_var"))}
    assert own

    def reply(node: int, stats: dict | None = None) -> Message:
        asked = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
        content = RecordDict({records.HOSPITAL_BATCHNORM: records.to_array_record(stats)} if stats is not None else {})
        return Message(content, reply_to=asked)

    good = {n: {k: v + n for k, v in own.items()} for n in HOSPITALS}
    got = agg._hospital_statistics({n: reply(n, s) for n, s in good.items()})
    assert sorted(got) == ["a", "b", "garbage"] and not agg.report.warnings
    assert all(np.array_equal(got[HOSPITALS[n][0]][k].numpy(), good[n][k]) for n in HOSPITALS for k in own)
    hospital_batchnorm.check({k: torch.from_numpy(v) for k, v in own.items()}, got)
    assert "every hospital's BatchNorm statistics received (a, b, garbage)" in capsys.readouterr().out

    var = next(k for k in own if k.endswith("running_var"))
    bad = {**good[3], var: -good[3][var]}
    assert agg._hospital_statistics({1: reply(1, good[1]), 2: reply(2), 3: reply(3, bad)}) is None
    (warning,) = agg.report.warnings
    assert warning.startswith("hospital-batchnorm: the classifier carries no hospital's BatchNorm statistics")
    assert "b: its reply carried none" in warning and f"garbage: refused (hospital 'garbage''s {var} has negative variances)" in warning
    assert "a:" not in warning
    agg.report.warnings.clear()
    assert agg._hospital_statistics({1: reply(1, good[1]), 2: reply(2, good[2])}) is None
    assert "garbage: no reply" in agg.report.warnings[0]


def test_scores_as_served_to_each_hospital_are_recorded_at_the_temperature_the_classifier_is_served_at(tmp_path, monkeypatch,
                                                                                                         caplog):
    """hospital-batchnorm with label counts: each hospital's final evaluation reply carries its
    confusion matrix and macro AUC as `:predict?hospital=` serves it at every grid temperature;
    the round records them (per hospital and summed) at the temperature the classifier is
    served at, and a malformed reply is left out, named."""
    from flwr.app import MessageType, MetricRecord

    from fedssl_flower.reporting import served_temperature

    agg = _aggregator(tmp_path, monkeypatch)
    grid = len(names.TEMPERATURE_GRID)

    def reply(node: int, confusion: list[int], auc: list[float]) -> Message:
        asked = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
        return Message(RecordDict({records.SERVED_EVAL_METRICS: MetricRecord({
            names.M_SERVED_CONFUSION_BY_TEMPERATURE: confusion, names.M_SERVED_MACRO_AUC_BY_TEMPERATURE: auc})}), reply_to=asked)

    def matrices(node: int) -> list[int]:  # at grid temperature i: [[node + i, 1], [2, 3]]
        return [x for i in range(grid) for x in (node + i, 1, 2, 3)]

    replies = {1: reply(1, matrices(1), [0.5 + i / 100 for i in range(grid)]),
               2: reply(2, matrices(2), [0.6 + i / 100 for i in range(grid)]),
               3: reply(3, [1, 2, 3], [0.5] * grid)}  # malformed: one matrix's worth of numbers
    with caplog.at_level(logging.WARNING, logger="fedssl.aggregator"):
        served = agg._served_scores(replies)
    assert sorted(served) == ["a", "b"]
    assert "hospital garbage: its scores as served are malformed (expected 25 confusion matrices of 2 x 2" in caplog.text
    assert served["a"][names.M_SERVED_CONFUSION_BY_TEMPERATURE].shape == (grid, 2, 2)

    best = 5  # the NLL curve's minimum, below its value at temperature 1: the classifier is served at grid[5]
    curve = [1.0] * grid
    curve[best] = 0.5
    aggregated = {names.M_NLL_BY_TEMPERATURE: curve, names.M_TEMPERATURE: names.TEMPERATURE_GRID[best]}
    assert served_temperature(aggregated) == names.TEMPERATURE_GRID[best]
    per_hospital: dict = {"a": {}, "b": {}}
    line = agg.report._served_metrics(served, per_hospital, aggregated, {"a": 30, "b": 10})
    # a at grid[5]: [[6, 1], [2, 3]] → recalls 6/7 and 3/5; b: [[7, 1], [2, 3]]; summed [[13, 2], [4, 6]]
    assert per_hospital["a"][names.M_SERVED_BALANCED_ACCURACY] == pytest.approx((6 / 7 + 3 / 5) / 2)
    assert per_hospital["b"][names.M_SERVED_CONFUSION_MATRIX] == [[7, 1], [2, 3]]
    assert per_hospital["b"][names.M_SERVED_MACRO_AUC] == pytest.approx(0.65)
    assert aggregated[names.M_SERVED_BALANCED_ACCURACY] == pytest.approx((13 / 15 + 6 / 10) / 2)
    assert aggregated[names.M_SERVED_ACCURACY] == pytest.approx(19 / 25)
    assert aggregated[names.M_SERVED_MACRO_AUC] == pytest.approx((0.55 * 30 + 0.65 * 10) / 40)
    assert f"temperature {names.TEMPERATURE_GRID[best]:.4f}" in line and "by hospital: a 0.7286, b 0.7375" in line

    # No NLL curve lowered by scaling: served at temperature 1, the grid's own index
    flat = {names.M_NLL_BY_TEMPERATURE: [1.0] * grid, names.M_TEMPERATURE: names.TEMPERATURE_GRID[0]}
    agg.report._served_metrics(served, per_hospital, flat, {"a": 30, "b": 10})
    one = list(names.TEMPERATURE_GRID).index(1.0)
    assert per_hospital["a"][names.M_SERVED_CONFUSION_MATRIX] == [[1 + one, 1], [2, 3]]

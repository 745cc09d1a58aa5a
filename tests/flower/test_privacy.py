"""dp=central-fixed and dp=central-adaptive: Flower's server-side fixed- and adaptive-clipping
wrappers and its RDP accountant behind fedssl's aggregation
(services/fedssl_flower/aggregation.py), with real Flower objects; dp=local: LocalDpMod's
mechanism at the hospital (services/fedssl_flower/local_dp.py) and its account.

The clipping and the noise are Flower's; these tests check that fedssl feeds them what
client-level DP needs (the trained parameters, equal weights, one accountant for the run) and
that what it reports is what Flower's accountant says."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg
from flwr.supercore.differential_privacy import compute_adaptive_noise_params, compute_stdv
from flwr.supercore.task_identity import TaskIdentity

from fedssl_core import names
from fedssl_flower import aggregation, local_dp
from fedssl_flower.aggregation import Aggregation, PrivacyBudgetExhausted
from fedssl_flower.config import RunConfig, epsilon_after, noise_multiplier_for_epsilon, one_release_epsilon
from fedssl_flower.errors import ConfigError

NODES = [11, 12, 13, 14]
DP = {"dp": "central-fixed", "dp-clipping-norm": 1.0, "dp-delta": 1e-5}
# central-adaptive with a noise multiplier above 0.4 needs more noise on the clipped count than
# Flower's default for 4 hospitals (4 / 20): this much leaves the average 1.15x the multiplier.
ADAPTIVE = {**DP, "dp": "central-adaptive", "dp-clipped-count-stddev": 2.0}
MECHANISMS = pytest.mark.parametrize("mechanism", [DP, ADAPTIVE], ids=["central-fixed", "central-adaptive"])


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What Flower's ServerApp process sets before Messages are built."""
    for key, value in {"_run_id": 3, "_node_id": 0, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, key, value)


def _current():
    return {"encoder.conv.weight": np.zeros((2, 3), np.float32), "encoder.bn.weight": np.ones(2, np.float32),
            "encoder.bn.running_mean": np.zeros(2, np.float32), "encoder.bn.running_var": np.ones(2, np.float32),
            "encoder.bn.num_batches_tracked": np.array(7, dtype=np.int64)}


def _updates(current, scale, examples=(30, 10, 20, 40)):
    """Hospital i moves every trained parameter by scale * (i + 1) and its BatchNorm statistics
    by its own data; its example count differs from the others'."""
    out = []
    for i, node in enumerate(NODES):
        arrays = {k: (v + np.float32(scale * (i + 1)) if v.dtype == np.float32 else v + 3) for k, v in current.items()}
        arrays["encoder.bn.running_mean"] = np.full(2, 100.0 + i, np.float32)
        out.append((node, arrays, examples[i]))
    return out


def _round(agg, rnd, current, updates, phase=names.PHASE_SSL):
    agg.configure(phase, rnd, current, [node for node, _, _ in updates])
    return agg.aggregate(phase, rnd, current, updates)


def _flower_accountant(cfg, rounds):
    accountant = aggregation.new_accountant(cfg, population=len(NODES))
    for _ in range(rounds):
        accountant.compose(aggregation.privacy_event(cfg, sample_size=len(NODES), population=len(NODES)))
    return accountant.get_privacy_spent()


def test_a_large_update_is_clipped_to_the_norm_with_equal_weights():
    """A tiny noise multiplier (the accountant needs one > 0) leaves the clipping visible: each
    hospital's update of the 8 trained values (conv 6 + bn.weight 2) is scaled to L2 norm 1,
    then the four count the same whatever their examples."""
    cfg = RunConfig.from_mapping({**DP, "dp-noise-multiplier": 1e-9})
    agg = Aggregation(cfg)
    current = _current()
    out = _round(agg, 1, current, _updates(current, scale=10.0))
    # Every update is c * ones(8) with c = 10, 20, 30, 40: clipped to ones(8) / sqrt(8) each.
    per_value = 1.0 / np.sqrt(8)
    np.testing.assert_allclose(out["encoder.conv.weight"], current["encoder.conv.weight"] + per_value, atol=1e-6)
    np.testing.assert_allclose(out["encoder.bn.weight"], current["encoder.bn.weight"] + per_value, atol=1e-6)
    # BatchNorm statistics and the integer counter stay the global model's under DP.
    np.testing.assert_array_equal(out["encoder.bn.running_mean"], current["encoder.bn.running_mean"])
    np.testing.assert_array_equal(out["encoder.bn.running_var"], current["encoder.bn.running_var"])
    assert int(out["encoder.bn.num_batches_tracked"]) == 7
    assert out["encoder.conv.weight"].dtype == np.float32


def test_an_update_inside_the_norm_is_not_clipped():
    cfg = RunConfig.from_mapping({**DP, "dp-noise-multiplier": 1e-9, "dp-clipping-norm": 100.0})
    current = _current()
    out = _round(Aggregation(cfg), 1, current, _updates(current, scale=0.01))
    np.testing.assert_allclose(out["encoder.conv.weight"], current["encoder.conv.weight"] + 0.025, atol=1e-6)  # (1+2+3+4)/4 * 0.01


def test_the_noise_has_flowers_stdv():
    """Updates inside the norm and a zero model: what is left after subtracting the mean of the
    updates is Flower's Gaussian noise, stdev noise_multiplier * clipping_norm / hospitals."""
    cfg = RunConfig.from_mapping({**DP, "dp-noise-multiplier": 2.0, "dp-clipping-norm": 0.5})
    big = {"encoder.conv.weight": np.zeros((200, 100), np.float32)}
    updates = [(node, {"encoder.conv.weight": np.full((200, 100), 1e-4 * (i + 1), np.float32)}, 5)
               for i, node in enumerate(NODES)]
    np.random.seed(0)
    out = _round(Aggregation(cfg), 1, big, updates)
    noise = out["encoder.conv.weight"].astype(np.float64) - 2.5e-4
    expected = compute_stdv(2.0, 0.5, len(NODES))
    assert expected == 0.25
    assert abs(noise.std() - expected) < 0.02 * expected
    assert abs(noise.mean()) < 0.01


@MECHANISMS
def test_epsilon_grows_per_round_as_flowers_accountant_says_across_phases(mechanism):
    cfg = RunConfig.from_mapping({**mechanism, "dp-noise-multiplier": 1.5})
    agg = Aggregation(cfg)
    current = _current()
    seen = []
    for rnd, phase in ((1, names.PHASE_SSL), (2, names.PHASE_SSL), (1, names.PHASE_FINETUNE)):
        _round(agg, rnd, current, _updates(current, scale=0.01), phase=phase)
        seen.append(agg.privacy_spent())
    for i, spent in enumerate(seen, start=1):
        flower = _flower_accountant(cfg, i)
        assert spent["releases"] == i == flower.num_releases
        assert spent["epsilon"] == pytest.approx(flower.epsilon, rel=1e-12)
        assert spent["delta"] == 1e-5 and spent["noise_multiplier"] == 1.5 and spent["mechanism"] == mechanism["dp"]
    assert seen[0]["epsilon"] < seen[1]["epsilon"] < seen[2]["epsilon"]
    assert seen[1]["round_epsilon"] == pytest.approx(seen[1]["epsilon"] - seen[0]["epsilon"])
    assert seen[0]["epsilon"] == pytest.approx(one_release_epsilon(cfg))
    json.dumps(seen)  # goes into the registry and rounds.jsonl as it is


@MECHANISMS
def test_the_budget_stops_before_the_round_that_would_pass_it(mechanism):
    cfg = RunConfig.from_mapping({**mechanism, "dp-noise-multiplier": 1.0})
    two, three = _flower_accountant(cfg, 2).epsilon, _flower_accountant(cfg, 3).epsilon
    cfg = RunConfig.from_mapping({**mechanism, "dp-noise-multiplier": 1.0, "dp-max-epsilon": (two + three) / 2})
    agg = Aggregation(cfg)
    current = _current()
    _round(agg, 1, current, _updates(current, scale=0.01))
    _round(agg, 2, current, _updates(current, scale=0.01))
    with pytest.raises(PrivacyBudgetExhausted, match="would exceed max_epsilon"):
        agg.configure(names.PHASE_SSL, 3, current, NODES)
    assert agg.privacy_spent()["releases"] == 2 and agg.privacy_spent()["epsilon"] <= cfg.dp_max_epsilon


def test_a_hospital_missing_from_the_round_gets_a_wrapper_for_those_that_replied():
    """Flower's wrapper insists every configured hospital replies (its noise is for that many):
    a round with a hospital missing is released for the others, one release all the same."""
    cfg = RunConfig.from_mapping({**DP, "dp-noise-multiplier": 1e-9})
    agg = Aggregation(cfg)
    current = _current()
    agg.configure(names.PHASE_SSL, 1, current, NODES)
    out = agg.aggregate(names.PHASE_SSL, 1, current, _updates(current, scale=10.0)[:3])
    np.testing.assert_allclose(out["encoder.conv.weight"], 1.0 / np.sqrt(8), atol=1e-6)
    assert agg.privacy_spent()["releases"] == 1 and agg.privacy_spent()["hospitals"] == 3


# ------------------------------------------------------------------ central-adaptive
def _adaptive_round(cfg, rnd, current, scale, phase=names.PHASE_SSL, agg=None):
    agg = agg or Aggregation(cfg)
    return agg, _round(agg, rnd, current, _updates(current, scale=scale), phase=phase)


def test_adaptive_clipping_clips_to_the_initial_norm_then_grows_it_while_every_update_is_above():
    """Every update far above the norm: the first round clips to dp-clipping-norm (as fixed
    clipping does, equal weights), and the norm grows by exp(lr * target) a round towards the
    updates' median (Andrew et al.), where Flower 1.41's own class shrinks it."""
    cfg = RunConfig.from_mapping({**ADAPTIVE, "dp-noise-multiplier": 1e-9, "dp-clipped-count-stddev": 1e-6})
    current = _current()
    agg, out = _adaptive_round(cfg, 1, current, scale=10.0)
    np.testing.assert_allclose(out["encoder.conv.weight"], 1.0 / np.sqrt(8), atol=1e-6)
    np.testing.assert_array_equal(out["encoder.bn.running_mean"], current["encoder.bn.running_mean"])
    grow = np.exp(0.2 * 0.5)
    assert agg.privacy_spent()["clipping_norm"] == 1.0
    assert agg.privacy_spent()["next_clipping_norm"] == pytest.approx(grow, rel=1e-5)
    _, out = _adaptive_round(cfg, 2, current, scale=10.0, agg=agg)
    np.testing.assert_allclose(out["encoder.conv.weight"], grow / np.sqrt(8), atol=1e-5)  # clipped to the grown norm
    assert agg.privacy_spent()["next_clipping_norm"] == pytest.approx(grow ** 2, rel=1e-5)

    flower = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 1e-9, 4, initial_clipping_norm=1.0,
                                                           clipped_count_stddev=1e-6)
    flower._geometric_update(1.0)  # what its aggregate_train feeds it when all four updates were clipped
    assert flower.clipping_norm == pytest.approx(1 / grow)


def test_adaptive_clipping_shrinks_the_norm_while_every_update_is_below_and_restarts_it_per_phase():
    cfg = RunConfig.from_mapping({**ADAPTIVE, "dp-noise-multiplier": 1e-9, "dp-clipped-count-stddev": 1e-6,
                                  "dp-clipping-norm": 100.0, "dp-target-quantile": 0.8, "dp-clip-norm-lr": 0.5})
    current = _current()
    agg, out = _adaptive_round(cfg, 1, current, scale=0.01)
    np.testing.assert_allclose(out["encoder.conv.weight"], 0.025, atol=1e-6)  # inside the norm: the plain mean
    assert agg.privacy_spent()["next_clipping_norm"] == pytest.approx(100.0 * np.exp(-0.5 * (1.0 - 0.8)), rel=1e-5)
    _adaptive_round(cfg, 1, current, scale=0.01, phase=names.PHASE_FINETUNE, agg=agg)
    assert agg.privacy_spent()["clipping_norm"] == 100.0  # a new phase starts again from dp-clipping-norm


def test_adaptive_noise_is_flowers_for_the_norm_the_updates_were_clipped_to():
    """The average's noise: Flower's larger multiplier (the count takes its share of the
    privacy, Andrew et al.) times the norm the round clipped to, not the one it adapted to."""
    cfg = RunConfig.from_mapping({**ADAPTIVE, "dp-noise-multiplier": 2.0, "dp-clipping-norm": 0.5})
    big = {"encoder.conv.weight": np.zeros((200, 100), np.float32)}
    updates = [(node, {"encoder.conv.weight": np.full((200, 100), 1e-4 * (i + 1), np.float32)}, 5)
               for i, node in enumerate(NODES)]
    np.random.seed(0)
    agg = Aggregation(cfg)
    out = _round(agg, 1, big, updates)
    _, model_multiplier = compute_adaptive_noise_params(2.0, len(NODES), 2.0)
    expected = compute_stdv(model_multiplier, 0.5, len(NODES))
    assert model_multiplier == pytest.approx(2.0 / np.sqrt(1 - 1 / 4))
    noise = out["encoder.conv.weight"].astype(np.float64) - 2.5e-4
    assert abs(noise.std() - expected) < 0.02 * expected
    spent = agg.privacy_spent()
    assert spent["noise_stdv"] == pytest.approx(expected) and spent["clipping_norm"] == 0.5
    assert spent["next_clipping_norm"] != 0.5 and spent["clipped_count_stddev"] == 2.0


def test_adaptive_clipping_with_flowers_default_count_noise_names_the_key_to_set():
    cfg = RunConfig.from_mapping({**DP, "dp": "central-adaptive", "dp-noise-multiplier": 1.0})
    current = _current()
    with pytest.raises(aggregation.AggregationError, match=re.escape(
            "dp=central-adaptive with 4 hospitals: dp-noise-multiplier=1.0 needs the noise on the count of clipped updates "
            "above 0.5, and Flower's default dp-clipped-count-stddev is hospitals / 20 = 0.2; set dp-clipped-count-stddev above 0.5")):
        Aggregation(cfg).configure(names.PHASE_SSL, 1, current, NODES)


# ------------------------------------------------------------------ the noise multiplier for a target epsilon
@pytest.mark.parametrize("target,releases", [(8.0, 8), (3.0, 8), (1.0, 8), (3.0, 1)])
def test_the_noise_multiplier_for_a_target_epsilon_is_the_smallest_under_it(target, releases):
    z = noise_multiplier_for_epsilon(target, releases, 1e-5)
    at = lambda m: epsilon_after(RunConfig(dp="central-fixed", dp_noise_multiplier=m), releases)  # noqa: E731
    assert at(z) <= target < at(z * 0.999)
    assert z == float(f"{z:.4g}")


@pytest.mark.parametrize("args,message", [
    ((0.0, 8, 1e-5), "target epsilon must be > 0, got 0.0"),
    ((3.0, 0, 1e-5), "releases must be >= 1 (the rounds the budget covers), got 0"),
    ((3.0, 8, 1.0), "delta must be in (0, 1), got 1.0"),
])
def test_bad_target_epsilon_arguments_are_named(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        noise_multiplier_for_epsilon(*args)


# ------------------------------------------------------------------ local
LOCAL = {"dp": "local", "dp-clipping-norm": 1.0, "dp-delta": 1e-5, "dp-local-epsilon": 0.5}


def test_a_local_release_is_the_clipped_update_plus_localdpmods_noise_and_the_global_statistics():
    """The hospital's update (trained minus received) is clipped to the norm by Flower's
    `compute_clip_model_update`, then each value gets N(0, sigma) with LocalDpMod's sigma for
    sensitivity 2 * norm; BatchNorm statistics and the counter go back as received."""
    cfg = RunConfig.from_mapping(LOCAL)
    received = {"encoder.conv.weight": np.zeros((200, 100), np.float32), "encoder.bn.weight": np.ones(200, np.float32),
                "encoder.bn.running_mean": np.zeros(200, np.float32), "encoder.bn.num_batches_tracked": np.array(7, np.int64)}
    trained = {"encoder.conv.weight": np.full((200, 100), 0.1, np.float32), "encoder.bn.weight": np.ones(200, np.float32),
               "encoder.bn.running_mean": np.full(200, 5.0, np.float32), "encoder.bn.num_batches_tracked": np.array(9, np.int64)}
    sigma = 2.0 * np.sqrt(2 * np.log(1.25 / 1e-5)) / 0.5
    assert local_dp.noise_stdv(cfg) == pytest.approx(sigma)
    np.random.seed(0)
    out = local_dp.release(trained, received, cfg)
    np.random.seed(0)  # Flower's noise, drawn in the same (sorted key) order: what is left is the clipped update
    noise = {k: np.random.normal(0, sigma, trained[k].shape) for k in ("encoder.bn.weight", "encoder.conv.weight")}
    clipped = out["encoder.conv.weight"].astype(np.float64) - noise["encoder.conv.weight"]
    np.testing.assert_allclose(clipped, 1.0 / np.sqrt(200 * 100), atol=1e-4)  # norm 0.1 * 141 = 14.1, clipped to 1
    np.testing.assert_allclose(out["encoder.bn.weight"] - noise["encoder.bn.weight"], 1.0, atol=1e-4)
    assert out["encoder.conv.weight"].std() == pytest.approx(sigma, rel=0.02)
    np.testing.assert_array_equal(out["encoder.bn.running_mean"], received["encoder.bn.running_mean"])
    assert int(out["encoder.bn.num_batches_tracked"]) == 7
    assert out["encoder.conv.weight"].dtype == np.float32 and out["encoder.bn.num_batches_tracked"].dtype == np.int64


def test_local_dp_composes_rounds_by_basic_composition_and_stops_at_the_budget():
    """Any strategy aggregates local releases (post-processing); the account is T rounds of
    (dp-local-epsilon, dp-delta) and the round past dp-max-epsilon is refused before it is sent."""
    cfg = RunConfig.from_mapping({**LOCAL, "strategy": "fedmedian", "dp-max-epsilon": 1.2})
    agg = Aggregation(cfg)
    current = _current()
    out = _round(agg, 1, current, _updates(current, scale=0.01))
    np.testing.assert_allclose(out["encoder.conv.weight"], 0.025, atol=1e-6)  # the median of 0.01..0.04: no noise added here
    _round(agg, 2, current, _updates(current, scale=0.01), phase=names.PHASE_FINETUNE)
    spent = agg.privacy_spent()
    assert (spent["epsilon"], spent["delta"], spent["releases"]) == (pytest.approx(1.0), pytest.approx(2e-5), 2)
    assert spent["accounting"] == "basic composition" and spent["round_epsilon"] == 0.5 and spent["sensitivity"] == 2.0
    with pytest.raises(PrivacyBudgetExhausted, match="would exceed max_epsilon"):
        agg.configure(names.PHASE_FINETUNE, 2, current, NODES)


def test_a_hospital_under_local_dp_sends_a_noised_update_and_the_global_statistics(tmp_path, ham10000_dir):
    """The ClientApp's train handler, called as Flower calls it: what leaves the hospital is
    the received model plus clipped update plus noise of LocalDpMod's stdev, its BatchNorm
    statistics the received ones."""
    import torch
    from flwr.app import MessageType

    from fedssl_core.models import FedSSLModel
    from fedssl_flower import client_app
    from tests.flower.test_client_app import hospital_context, message, reply_state

    run_config = {"arch": "resnet18", "pretrained": False, "image-size": 32, "batch-size": 16, "local-steps": 1,
                  "ssl-rounds": 0, "finetune-rounds": 1, "finetune-mode": "full", "local-baseline": False, **LOCAL,
                  "dp-local-epsilon": 0.9}
    ctx = hospital_context(tmp_path, ham10000_dir, run_config, max_images=40)
    torch.manual_seed(0)
    initial = FedSSLModel("resnet18", num_classes=len(names.HAM10000_CLASSES)).state_dict()
    reply = client_app.app(message(initial, MessageType.TRAIN, phase="finetune", round=1), ctx)
    assert not reply.has_error(), reply.error
    sent = reply_state(reply)
    sigma = local_dp.noise_stdv(RunConfig.from_mapping(run_config))
    delta = torch.cat([(sent[k] - initial[k]).flatten() for k in sent
                       if sent[k].is_floating_point() and not k.endswith(("running_mean", "running_var"))])
    assert float(delta.std()) == pytest.approx(sigma, rel=0.01)
    statistics = [k for k in sent if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert statistics  # full fine-tuning: the encoder's BatchNorm travels too
    for k in statistics:  # (a 0-d buffer travels as shape (1,), as every array record carries it)
        assert torch.equal(sent[k], initial[k].reshape(sent[k].shape)), k


@pytest.mark.parametrize("overrides,message", [
    ({"dp": "laplace"}, "dp='laplace'; expected one of off, central-fixed, central-adaptive, local"),
    ({**LOCAL, "dp-local-epsilon": 1.0}, "dp-local-epsilon must be in (0, 1) (the Gaussian mechanism's calibration holds below 1)"),
    ({**DP, "dp-local-epsilon": 0.9}, "dp-local-epsilon acts with dp=local only, not dp=central-fixed"),
    ({**LOCAL, "dp-max-epsilon": 0.4}, "dp-max-epsilon=0.4 is below the epsilon of a single round (0.5 at dp-local-epsilon=0.5)"),
    ({**LOCAL, "register-local-models": True}, "would send each hospital's own model un-noised"),
    ({**DP, "dp-target-quantile": 0.9}, "dp-target-quantile act(s) with dp=central-adaptive only, not dp=central-fixed"),
    ({"dp-clip-norm-lr": 0.1}, "dp-clip-norm-lr act(s) with dp=central-adaptive only, not dp=off"),
    ({**ADAPTIVE, "dp-target-quantile": 1.0}, "dp-target-quantile must be in (0, 1), got 1.0"),
    ({**ADAPTIVE, "dp-clip-norm-lr": 0}, "dp-clip-norm-lr must be > 0, got 0.0"),
    ({**ADAPTIVE, "dp-clipped-count-stddev": -1}, "dp-clipped-count-stddev must be >= 0 (0 = Flower's default, hospitals / 20)"),
    ({**ADAPTIVE, "dp-noise-multiplier": 4.0}, "dp=central-adaptive: dp-noise-multiplier=4.0 needs dp-clipped-count-stddev above 2 "
                                               "(half of it; got 2.0)"),
    ({**ADAPTIVE, "strategy": "krum"}, "dp=central-adaptive needs strategy=fedavg"),
    ({"dp-noise-multiplier": 0}, "dp-noise-multiplier must be > 0"),
    ({"dp-clipping-norm": 0}, "dp-clipping-norm must be > 0, got 0.0"),
    ({"dp-delta": 1}, "dp-delta must be in (0, 1), got 1.0"),
    ({"dp-max-epsilon": -1}, "dp-max-epsilon must be >= 0 (0 = no cap), got -1.0"),
    ({**DP, "strategy": "fedmedian"}, "dp=central-fixed needs strategy=fedavg with server-lr=1 and server-momentum=0"),
    ({**DP, "server-momentum": 0.9}, "Flower accounts the privacy spent only for a strategy whose aggregate_train is FedAvg's"),
    ({**DP, "register-local-models": True}, "would send each hospital's own model un-noised"),
    ({**DP, "hospital-batchnorm": True}, "dp=central-fixed with hospital-batchnorm=true would send each hospital's feature "
                                         "statistics un-noised"),
    ({**DP, "resume-from-registry": True}, "the privacy already spent is not restored"),
    ({**DP, "dp-max-epsilon": 1.0}, "dp-max-epsilon=1.0 is below the epsilon of a single round (4.729 at dp-delta=1e-05"),
])
def test_bad_dp_config_is_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_mapping(overrides)


# ------------------------------------------------------------------ the aggregator's stop at the budget
@MECHANISMS
def test_the_aggregator_stops_cleanly_before_the_round_past_the_budget(tmp_path, monkeypatch, capsys, mechanism):
    """The aggregator's reply path with the Grid stand-in of test_server_app (a garbage
    hospital refused, two accepted): three planned rounds, a budget for two. The third is never
    sent, the second's model is the run's last (the final evaluation scores it, `run` then gives
    the production alias to the versions registered for it), the run records why it stopped,
    and each round's record carries the epsilon spent."""
    from tests.flower.test_server_app import _aggregator

    cfg = RunConfig.from_mapping({**mechanism, "dp-noise-multiplier": 1.0})
    two, three = _flower_accountant(cfg, 2).epsilon, _flower_accountant(cfg, 3).epsilon
    agg = _aggregator(tmp_path, monkeypatch, **mechanism, **{"dp-noise-multiplier": 1.0, "dp-max-epsilon": (two + three) / 2,
                                                      "finetune-rounds": 3})
    agg.aggregation.population = len(agg.hospitals.names())
    pushed = []
    push = agg.messenger.grid.push_messages
    agg.messenger.grid.push_messages = lambda msgs: pushed.append(msgs[0].metadata.group_id) or push(msgs)
    trained = agg._train([(names.PHASE_FINETUNE, r, 3) for r in (1, 2, 3)])
    assert (trained.phase, trained.round) == (names.PHASE_FINETUNE, 2)
    assert pushed == ["finetune-1", "finetune-2"]  # round 3 was refused before anything was sent
    agg._final_evaluation(trained)
    assert [r["round"] for r in agg.report.history] == [1, 2]
    lines = [json.loads(x) for x in (agg.report.folder.path / "rounds.jsonl").read_text().splitlines()]
    assert [x["privacy"]["releases"] for x in lines] == [1, 2]
    assert lines[1]["privacy"]["epsilon"] == pytest.approx(two) and lines[1]["privacy"]["hospitals"] == 2
    assert lines[1]["privacy"]["population"] == 3
    assert any(w.startswith("privacy budget reached: stopped before finetune round 3") for w in agg.report.warnings)
    out = capsys.readouterr().out
    assert "phase=finetune round=2 privacy: epsilon=" in out and "privacy budget reached" in out
    assert agg.report.recipe()["dp"] == mechanism["dp"]
    if mechanism["dp"] == "central-adaptive":  # the norm each round clipped to, and the one it adapted to
        assert agg.report.recipe()["dp-clipped-count-stddev"] == 2.0 and agg.report.recipe()["dp-target-quantile"] == 0.5
        assert lines[1]["privacy"]["clipping_norm"] == lines[0]["privacy"]["next_clipping_norm"]
        assert "phase=finetune round=2 privacy: epsilon=" in out and "(next round's " in out
    else:
        assert "dp-target-quantile" not in agg.report.recipe() and "next_clipping_norm" not in lines[1]["privacy"]
    assert agg.summary("succeeded")["privacy"] == lines[1]["privacy"]

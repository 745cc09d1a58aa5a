import re

import numpy as np
import pytest

from fedssl_flower.config import RunConfig
from fedssl_flower.errors import ConfigError
from fedssl_flower.strategy import AggregationError, ServerOptimizer, weighted_average


def test_run_config_defaults_come_from_pyproject(repo_root):
    import tomllib

    declared = tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = RunConfig.from_mapping(declared)
    assert cfg.as_dict() == {k: declared[k] for k in cfg.as_dict()}  # one default, one place
    assert set(declared) == set(cfg.as_dict())


@pytest.mark.parametrize("key,value,message", [
    ("finetune-mode", "half", "finetune-mode='half'; expected one of linear, full"),
    ("image-size", 8, "image-size must be >= 16, got 8"),
    ("update-encoding", "zip", "update-encoding='zip'"),
    ("ssl-rounds", "three", "run config ssl-rounds='three' is not a valid int"),
    ("server-momentum", 1.0, "server-momentum must be in [0, 1), got 1.0"),
    ("server-lr", 0, "server-lr must be > 0 (1 = plain FedAvg), got 0.0"),
])
def test_bad_run_config_is_named(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_mapping({key: value})


def test_weighted_average_weights_by_examples_and_keeps_int_buffers():
    a = {"w": np.array([0.0, 2.0], dtype=np.float32), "n": np.array(3, dtype=np.int64)}
    b = {"w": np.array([4.0, 6.0], dtype=np.float32), "n": np.array(5, dtype=np.int64)}
    out = weighted_average([(a, 30), (b, 10), ({"w": np.array([99.0, 99.0], dtype=np.float32), "n": np.array(9)}, 0)])
    assert out["w"].tolist() == [1.0, 3.0]
    assert int(out["n"]) == 5


def test_weighted_average_refuses_mismatched_or_empty_updates():
    with pytest.raises(AggregationError, match="different parameter sets"):
        weighted_average([({"a": np.zeros(1)}, 1), ({"b": np.zeros(1)}, 1)])
    with pytest.raises(AggregationError, match="no hospital reported any training examples"):
        weighted_average([({"a": np.zeros(1)}, 0)])


def test_server_optimizer_is_fedavg_by_default_and_fedavgm_otherwise():
    current = {"w": np.array([1.0, 1.0], dtype=np.float32), "bn.running_mean": np.array([0.0], dtype=np.float32),
               "bn.num_batches_tracked": np.array(4, dtype=np.int64)}
    average = {"w": np.array([2.0, 0.0], dtype=np.float32), "bn.running_mean": np.array([3.0], dtype=np.float32),
               "bn.num_batches_tracked": np.array(9, dtype=np.int64)}
    plain = ServerOptimizer().step(current, average, "finetune")
    assert all(np.array_equal(plain[k], average[k]) for k in average)

    opt = ServerOptimizer(lr=2.0, momentum=0.5)
    first = opt.step(current, average, "finetune")
    assert first["w"].tolist() == [3.0, -1.0]  # w + 2 * (avg - w)
    assert first["bn.running_mean"].tolist() == [3.0] and int(first["bn.num_batches_tracked"]) == 9  # statistics: averaged
    second = opt.step(first, {**average, "w": first["w"] + np.float32(1.0)}, "finetune")
    assert second["w"].tolist() == [3.0 + 2 * (0.5 * 1.0 + 1.0), -1.0 + 2 * (0.5 * -1.0 + 1.0)]  # v = 0.5 v + delta
    after_phase = opt.step(current, average, "ssl")  # a new phase starts without velocity
    assert after_phase["w"].tolist() == [3.0, -1.0]
    with pytest.raises(ValueError, match="momentum in"):
        ServerOptimizer(momentum=1.0)


def test_temperature_is_fitted_on_the_summed_held_out_nll_and_baked_into_the_classifier():
    import torch

    from fedssl_core import names
    from fedssl_flower.metrics import aggregate_metrics
    from fedssl_flower.server_app import _temperature_scaled

    grid = names.TEMPERATURE_GRID
    # Two hospitals whose NLL curves have their minima at different temperatures; the bigger one weighs more.
    big = [abs(t - 2.0) + 1 for t in grid]
    small = [abs(t - 0.5) + 1 for t in grid]
    agg = aggregate_metrics({"a": {names.M_NLL_BY_TEMPERATURE: big}, "b": {names.M_NLL_BY_TEMPERATURE: small}},
                            {"a": 900, "b": 100}, list(names.HAM10000_CLASSES))
    assert agg[names.M_TEMPERATURE] == 2.0
    assert agg[names.M_NLL_BY_TEMPERATURE][grid.index(2.0)] == min(agg[names.M_NLL_BY_TEMPERATURE])
    torch.manual_seed(0)
    state = {"encoder.w": torch.randn(3), "classifier.weight": torch.randn(7, 4), "classifier.bias": torch.randn(7)}
    scaled, cal = _temperature_scaled(state, agg)
    x = torch.randn(5, 4)
    logits = x @ state["classifier.weight"].T + state["classifier.bias"]
    served = x @ scaled["classifier.weight"].T + scaled["classifier.bias"]
    assert torch.allclose(torch.softmax(served, 1), torch.softmax(logits / 2.0, 1), atol=1e-6)
    assert torch.equal(scaled["encoder.w"], state["encoder.w"]) and cal["applied"] and cal["temperature"] == 2.0
    # A curve whose best temperature is 1 leaves the classifier as it is.
    flat = aggregate_metrics({"a": {names.M_NLL_BY_TEMPERATURE: [abs(t - 1.0) for t in grid]}}, {"a": 1}, ["x", "y"])
    same, cal = _temperature_scaled(state, flat)
    assert same is state and cal["applied"] is False

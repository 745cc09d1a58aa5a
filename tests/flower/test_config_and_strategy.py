import re

import numpy as np
import pytest

from fedssl_flower.config import RunConfig
from fedssl_flower.errors import ConfigError
from fedssl_flower.strategy import AggregationError, ServerOptimizer, relay_model, relay_order, weighted_average


def test_run_config_defaults_come_from_pyproject(repo_root):
    import tomllib

    declared = tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(declared) == set(RunConfig().as_dict())  # every key in both, none in one only
    differ = {k: (v, declared[k]) for k, v in RunConfig().as_dict().items() if v != declared[k] or type(v) is not type(declared[k])}
    assert not differ, f"RunConfig's defaults and pyproject's (dataclass, pyproject): {differ}"
    assert RunConfig.from_mapping(declared) == RunConfig()  # and they parse to the same config


@pytest.mark.parametrize("key,value,message", [
    ("finetune-mode", "half", "finetune-mode='half'; expected one of linear, full"),
    ("image-size", 8, "image-size must be >= 16, got 8"),
    ("update-encoding", "zip", "update-encoding='zip'"),
    ("ssl-rounds", "three", "run config ssl-rounds='three' is not a valid int"),
    ("server-momentum", 1.0, "server-momentum must be in [0, 1), got 1.0"),
    ("server-lr", 0, "server-lr must be > 0 (1 = plain FedAvg), got 0.0"),
    ("ssl-colour-jitter", 1.5, "ssl-colour-jitter must be in [0, 1] (0 = none), got 1.5"),
    ("ssl-batchnorm", "fixed", "ssl-batchnorm='fixed'; expected one of adapt, frozen"),
])
def test_bad_run_config_is_named(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_mapping({key: value})


@pytest.mark.parametrize("overrides,message", [
    ({"task": "segment"}, "task='segment'; expected one of diagnosis, generate"),
    ({"task": "generate", "image-size": 96}, "task=generate: image-size=96; the generator makes 32 or 64 px images"),
    ({"task": "generate", "image-size": 32, "generate-rounds": 0}, "task=generate needs generate-rounds >= 1, got 0"),
    ({"task": "generate", "image-size": 32, "gan-steps": 0}, "gan-steps must be >= 1, got 0"),
    ({"task": "generate", "image-size": 32, "gan-width": 2}, "gan-width must be in 4..512, got 2"),
    ({"task": "generate", "image-size": 32, "strategy": "fedprox", "proximal-mu": 0.1},
     "task=generate does not train with FedProx's proximal term"),
    ({"task": "generate", "image-size": 32, "resume-from-registry": True}, "the registry keeps the generator only"),
])
def test_bad_generative_run_config_is_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_mapping(overrides)


def test_a_generative_run_needs_no_ssl_or_finetune_rounds():
    cfg = RunConfig.from_mapping({"task": "generate", "image-size": 64, "ssl-rounds": 0, "finetune-rounds": 0})
    assert cfg.generate_rounds == 10 and cfg.image_size == 64


def test_spectral_norm_vectors_are_averaged_as_statistics_not_trained():
    """The discriminator's power-iteration vectors go around the strategy (and DP's clipping), like BatchNorm's."""
    from fedssl_flower.strategy import is_trained

    v = np.zeros(3, dtype=np.float32)
    assert not is_trained("discriminator.features.0.weight_u", v) and not is_trained("discriminator.embed.weight_v", v)
    assert is_trained("discriminator.features.0.weight_orig", v) and is_trained("generator.stem.weight", v)


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
    from fedssl_flower.reporting import temperature_scaled

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
    scaled, cal = temperature_scaled(state, agg)
    x = torch.randn(5, 4)
    logits = x @ state["classifier.weight"].T + state["classifier.bias"]
    served = x @ scaled["classifier.weight"].T + scaled["classifier.bias"]
    assert torch.allclose(torch.softmax(served, 1), torch.softmax(logits / 2.0, 1), atol=1e-6)
    assert torch.equal(scaled["encoder.w"], state["encoder.w"]) and cal["applied"] and cal["temperature"] == 2.0
    # A curve whose best temperature is 1 leaves the classifier as it is.
    flat = aggregate_metrics({"a": {names.M_NLL_BY_TEMPERATURE: [abs(t - 1.0) for t in grid]}}, {"a": 1}, ["x", "y"])
    same, cal = temperature_scaled(state, flat)
    assert same is state and cal["applied"] is False


# ------------------------------------------------------------------ strategies (Flower's own classes)
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import strategy as flwr_strategy  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedssl_flower import aggregation  # noqa: E402
from fedssl_flower.aggregation import Aggregation, check_update  # noqa: E402

NODES = [11, 12, 13, 14, 15]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What Flower's ServerApp process sets before Messages are built."""
    for key, value in {"_run_id": 3, "_node_id": 0, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, key, value)


def _model_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"encoder.conv.weight": rng.normal(size=(4, 3)).astype(np.float32),
            "encoder.bn.weight": rng.normal(size=4).astype(np.float32),
            "encoder.bn.running_mean": rng.normal(size=4).astype(np.float32),
            "encoder.bn.running_var": rng.uniform(0.5, 2, size=4).astype(np.float32),
            "encoder.bn.num_batches_tracked": np.array(7, dtype=np.int64)}


def _updates(current, n=4, seed=1, examples=(30, 10, 20, 40, 25)):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arrays = {k: (v + rng.normal(scale=0.1, size=v.shape).astype(np.float32) if v.dtype == np.float32 else v + i)
                  for k, v in current.items()}
        out.append((NODES[i], arrays, examples[i]))
    return out


def _aggregate(name, current, updates, rnd=1, **config):
    agg = Aggregation(RunConfig.from_mapping({"strategy": name, **config}))
    agg.configure("ssl", rnd, current, [node for node, _, _ in updates])
    return agg, agg.aggregate("ssl", rnd, current, updates)


def _flower_directly(strategy, rounds):
    """Flower's strategy driven as its own ServerApp loop drives it, on float64 arrays of the
    trained parameters only: `rounds` is [(current, updates)]; returns each round's result."""
    results = []
    for rnd, (current, updates) in enumerate(rounds, start=1):
        trained = sorted(k for k in current if aggregation.is_trained(k, current[k]))
        record = ArrayRecord({k: Array(current[k].astype(np.float64)) for k in trained})
        sent = list(strategy.configure_train(rnd, record, ConfigRecord(), aggregation._Hospitals([u[0] for u in updates])))
        by_node = {m.metadata.dst_node_id: m for m in sent}
        replies = [Message(RecordDict({"arrays": ArrayRecord({k: Array(a[k].astype(np.float64)) for k in trained}),
                                       "metrics": MetricRecord({"num-examples": n})}), reply_to=by_node[node])
                   for node, a, n in updates]
        new, _ = strategy.aggregate_train(rnd, replies)
        results.append({k: new[k].numpy().astype(np.float32) for k in trained})
    return results


def test_fedavg_is_flowers_fedavg_bit_for_bit():
    """strategy=fedavg is computed by weighted_average (no per-Array serialisation): the same
    bytes as Flower's FedAvg on the trained parameters, as its ServerApp loop drives it."""
    current = _model_arrays()
    updates = _updates(current) + [(15, {k: v * 0 - 99 for k, v in current.items()}, 0)]  # no examples: left out
    agg, out = _aggregate("fedavg", current, updates)
    assert isinstance(agg.strategy, flwr_strategy.FedAvg)
    expected = weighted_average([(a, n) for _, a, n in updates])
    assert sorted(out) == sorted(expected)
    for k in expected:
        assert out[k].dtype == expected[k].dtype and out[k].tobytes() == expected[k].tobytes(), k
    (flowers,) = _flower_directly(flwr_strategy.FedAvg(), [(current, [u for u in updates if u[2] > 0])])
    for k, v in flowers.items():
        assert (v + np.float32(0.0)).tobytes() == out[k].tobytes(), k


def test_fedavg_keeps_the_server_step_of_server_lr_and_momentum():
    current = _model_arrays()
    updates = _updates(current)
    _, out = _aggregate("fedavg", current, updates, **{"server-lr": 2.0, "server-momentum": 0.5})
    expected = ServerOptimizer(2.0, 0.5).step(current, weighted_average([(a, n) for _, a, n in updates]), "ssl")
    assert all(out[k].tobytes() == expected[k].tobytes() for k in expected)


@pytest.mark.parametrize("name,flower,config", [
    ("fedadam", flwr_strategy.FedAdam(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2), {"server-eta": 0.05, "server-beta-1": 0.8,
                                                                                    "server-beta-2": 0.95, "server-tau": 1e-2}),
    ("fedyogi", flwr_strategy.FedYogi(eta=0.05, tau=1e-2), {"server-eta": 0.05, "server-tau": 1e-2}),
    ("fedadagrad", flwr_strategy.FedAdagrad(eta=0.05, tau=1e-2), {"server-eta": 0.05, "server-tau": 1e-2}),
    ("fedavgm", flwr_strategy.FedAvgM(server_learning_rate=1.5, server_momentum=0.9), {"server-lr": 1.5, "server-momentum": 0.9}),
])
def test_server_optimising_strategies_make_flowers_update_over_rounds(name, flower, config):
    """Two rounds (so moments and momentum carry): the adapter's trained parameters are what
    Flower's strategy makes of the same arrays; statistics are the plain average."""
    agg = Aggregation(RunConfig.from_mapping({"strategy": name, **config}))
    current, rounds, ours = _model_arrays(), [], []
    for rnd in (1, 2):
        updates = _updates(current, seed=rnd)
        agg.configure("ssl", rnd, current, [u[0] for u in updates])
        new = agg.aggregate("ssl", rnd, current, updates)
        rounds.append((current, updates))
        ours.append(new)
        plain = weighted_average([(a, n) for _, a, n in updates])
        for k in ("encoder.bn.running_mean", "encoder.bn.running_var", "encoder.bn.num_batches_tracked"):
            assert new[k].tobytes() == plain[k].tobytes(), k  # BatchNorm statistics bypass the strategy
        assert not np.array_equal(new["encoder.conv.weight"], plain["encoder.conv.weight"])
        current = new
    theirs = _flower_directly(flower, rounds)
    for mine, flowers in zip(ours, theirs, strict=True):
        for k, v in flowers.items():
            np.testing.assert_allclose(mine[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


def test_fedadam_first_round_by_hand():
    current = _model_arrays()
    updates = _updates(current)
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    _, out = _aggregate("fedadam", current, updates, **{"server-eta": eta, "server-beta-1": b1, "server-beta-2": b2, "server-tau": tau})
    key = "encoder.conv.weight"
    w = current[key].astype(np.float64)
    total = sum(n for _, _, n in updates)
    delta = sum(a[key].astype(np.float64) * n / total for _, a, n in updates) - w
    m, v = (1 - b1) * delta, (1 - b2) * delta ** 2
    step = eta * np.sqrt(1 - b2 ** 2) / (1 - b1 ** 2)  # Flower's bias correction at server round 1
    np.testing.assert_allclose(out[key], w + step * m / (np.sqrt(v) + tau), rtol=1e-6)


@pytest.mark.parametrize("name,config", [("fedmedian", {}), ("fedtrimmedavg", {"trim-beta": 0.2}),
                                         ("krum", {"num-malicious-nodes": 1}),
                                         ("multikrum", {"num-malicious-nodes": 1, "num-nodes-to-select": 2})])
def test_robust_strategies_resist_one_reply_scaled_a_hundred_times(name, config):
    current = _model_arrays()
    honest = _updates(current, n=4)
    bad = (NODES[4], {k: (v * 100 if v.dtype == np.float32 else v) for k, v in honest[0][1].items()}, 25)
    key = "encoder.conv.weight"
    honest_mean = np.mean([a[key] for _, a, _ in honest], axis=0)
    spread = max(np.abs(a[key] - honest_mean).max() for _, a, _ in honest)
    _, fedavg = _aggregate("fedavg", current, honest + [bad])
    _, robust = _aggregate(name, current, honest + [bad], **config)
    assert np.abs(fedavg[key] - honest_mean).max() > 10 * spread  # the plain average is dragged away
    assert np.abs(robust[key] - honest_mean).max() <= spread, name  # the robust one stays among the honest


def test_with_four_hospitals_trimming_a_quarter_is_the_median_and_the_default_trims_nothing():
    """Flower's FedTrimmedAvg cuts int(beta * replies) from each end: with 4 hospitals (the
    quality benchmark's sites) trim-beta 0.25 cuts one each side, which is FedMedian's median
    of four (the mean of the middle two), and the default 0.2 cuts none: an unweighted mean."""
    current = _model_arrays()
    updates = _updates(current, n=4)
    _, median = _aggregate("fedmedian", current, updates)
    _, quarter = _aggregate("fedtrimmedavg", current, updates, **{"trim-beta": 0.25})
    _, default = _aggregate("fedtrimmedavg", current, updates)
    for key in ("encoder.conv.weight", "encoder.bn.weight"):
        np.testing.assert_allclose(quarter[key], median[key], rtol=1e-6)
        np.testing.assert_allclose(default[key], np.mean([a[key].astype(np.float64) for _, a, _ in updates], axis=0), rtol=1e-6)
        assert not np.allclose(default[key], median[key])


def test_fedprox_puts_proximal_mu_in_the_train_config():
    agg = Aggregation(RunConfig.from_mapping({"strategy": "fedprox", "proximal-mu": 0.25}))
    assert isinstance(agg.strategy, flwr_strategy.FedProx)
    assert agg.configure("finetune", 1, _model_arrays(), NODES[:2]) == {"proximal-mu": 0.25}
    assert Aggregation(RunConfig()).configure("finetune", 1, _model_arrays(), NODES[:2]) == {}


def test_a_new_phase_gets_a_new_strategy():
    agg = Aggregation(RunConfig.from_mapping({"strategy": "fedadam"}))
    current = _model_arrays()
    agg.configure("ssl", 1, current, NODES[:4])
    agg.aggregate("ssl", 1, current, _updates(current))
    first = agg.strategy
    assert first.m_t is not None
    classifier = {"classifier.weight": np.ones((2, 3), np.float32)}
    agg.configure("finetune", 1, classifier, NODES[:2])
    assert agg.strategy is not first and agg.strategy.m_t is None


def test_check_update_refuses_what_is_not_the_shared_model():
    expected = _model_arrays()
    assert check_update(dict(expected), expected) is None
    assert check_update({**expected, "encoder.bn.num_batches_tracked": np.array([7])}, expected) is None  # a scalar as one element
    nan = {**expected, "encoder.bn.weight": np.array([1, np.nan, 0, 0], np.float32)}
    assert check_update(nan, expected) == "tensor encoder.bn.weight holds NaN or infinite values"
    inf = {**expected, "encoder.conv.weight": np.full((4, 3), np.inf, np.float32)}
    assert check_update(inf, expected) == "tensor encoder.conv.weight holds NaN or infinite values"
    missing = {k: v for k, v in expected.items() if k != "encoder.bn.running_var"}
    assert check_update(missing, expected) == "missing 1 tensor(s) of the shared model: encoder.bn.running_var"
    extra = {**expected, "rotation_head.weight": np.zeros(3, np.float32)}
    assert check_update(extra, expected) == "1 tensor(s) the shared model does not have: rotation_head.weight"
    shape = {**expected, "encoder.conv.weight": np.zeros((3, 4), np.float32)}
    assert check_update(shape, expected) == "tensor encoder.conv.weight has shape (3, 4); the global model's has (4, 3)"
    dtype = {**expected, "encoder.conv.weight": np.zeros((4, 3), np.float64)}
    assert check_update(dtype, expected) == "tensor encoder.conv.weight has dtype float64; the global model's is float32"


@pytest.mark.parametrize("overrides,message", [
    ({"strategy": "fedsgd"}, "strategy='fedsgd'; expected one of fedavg, fedavgm, fedadam"),
    ({"strategy": "fedadam", "server-lr": 0.5}, "server-lr and server-momentum act with strategy=fedavg or fedavgm only, "
                                                 "not strategy=fedadam; its server step is server-eta"),
    ({"server-eta": 0}, "server-eta must be > 0, got 0.0"),
    ({"server-beta-1": 1.0}, "server-beta-1 must be in [0, 1), got 1.0"),
    ({"server-beta-2": -0.1}, "server-beta-2 must be in [0, 1), got -0.1"),
    ({"server-tau": 0}, "server-tau must be > 0, got 0.0"),
    ({"strategy": "fedprox", "proximal-mu": -1}, "proximal-mu must be >= 0 (0 = no proximal term), got -1.0"),
    ({"proximal-mu": 0.1}, "proximal-mu=0.1 acts with strategy=fedprox only, not strategy=fedavg"),
    ({"trim-beta": 0.5}, "trim-beta must be in [0, 0.5), got 0.5"),
    ({"num-malicious-nodes": -1}, "num-malicious-nodes must be >= 0, got -1"),
    ({"num-nodes-to-select": 0}, "num-nodes-to-select must be >= 1, got 0"),
])
def test_bad_strategy_config_is_named_with_its_range(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_mapping(overrides)


@pytest.mark.parametrize("name", aggregation.FLOWER_STRATEGIES)
def test_every_strategy_is_a_flower_strategy_with_its_run_config(name):
    cfg = RunConfig.from_mapping({"strategy": name, "trim-beta": 0.3, "num-malicious-nodes": 2, "num-nodes-to-select": 3,
                                  "server-eta": 0.02, **({"proximal-mu": 0.5} if name == "fedprox" else {})})
    built = aggregation.build_strategy(cfg)
    assert isinstance(built, flwr_strategy.FedAvg)
    for key, attr in aggregation.PARAMETERS[name].items():
        assert getattr(built, attr) == cfg.as_dict()[key], (name, key)


def test_median_cosine_leaves_out_a_flipped_update_and_clips_a_scaled_one_to_the_median_norm():
    """strategy=median-cosine: three hospitals whose updates share a direction, a fourth that
    negates its own: the flipped one points away from the others' coordinate-wise median update
    and is left out, the others are FedAvg'd. A x100 update points the right way: it is kept, clipped
    to the median update norm, so it weighs no more than an honest one."""
    current = _model_arrays()
    trained = [k for k in current if aggregation.is_trained(k, current[k])]
    rng = np.random.default_rng(5)
    common = {k: rng.normal(scale=0.1, size=current[k].shape) for k in trained}

    def honest(i):
        own = np.random.default_rng(10 + i)
        return {k: (current[k] + common[k] + own.normal(scale=0.03, size=current[k].shape)).astype(np.float32)
                if k in trained else current[k] for k in current}

    good = [(NODES[i], honest(i), 10 * (i + 1)) for i in range(3)]
    flipped = {k: (2 * current[k] - honest(3)[k]).astype(np.float32) if k in trained else current[k] for k in current}
    agg, out = _aggregate("median-cosine", current, good + [(NODES[3], flipped, 40)], **{"min-cosine": 0.0})
    assert agg.strategy.last["left_out"] == [3] and agg.strategy.last["cosines"][3] < 0 < min(agg.strategy.last["cosines"][:3])
    # What the round record gets (by node; the aggregator names the hospitals).
    assert agg.facts["left_out"] == [NODES[3]] and list(agg.facts["cosines"]) == NODES[:4]
    # FedAvg of the three kept updates, each scaled down to at most the median update norm.
    kept_scaled = [min(1.0, agg.strategy.last["norm_bound"] / float(np.linalg.norm(np.concatenate(
        [(a[t].astype(np.float64) - current[t]).ravel() for t in trained])))) for _, a, _ in good]
    manual = {k: sum(n * (current[k] + s * (a[k].astype(np.float64) - current[k])) for (_, a, n), s in zip(good, kept_scaled))
              / sum(n for _, _, n in good) for k in trained}
    for k in trained:
        np.testing.assert_allclose(out[k], manual[k], rtol=0, atol=1e-6)
        assert not np.allclose(out[k], weighted_average([(a, n) for _, a, n in good + [(0, flipped, 40)]])[k], atol=1e-3)

    scaled = {k: (current[k] + 100 * (honest(3)[k] - current[k])).astype(np.float32) if k in trained else current[k] for k in current}
    agg, out = _aggregate("median-cosine", current, good + [(NODES[3], scaled, 40)], **{"min-cosine": 0.0})
    assert agg.strategy.last["left_out"] == []  # it points the right way
    step = float(np.linalg.norm(np.concatenate([(out[k].astype(np.float64) - current[k]).ravel() for k in trained])))
    assert step <= agg.strategy.last["norm_bound"] * 1.0001  # a convex mix of updates no longer than the bound


def test_median_cosine_with_nothing_pointing_the_median_way_fails_the_round_naming_the_cosines():
    current = _model_arrays()
    updates = _updates(current, n=2)
    with pytest.raises(AggregationError, match=r"median-cosine left out all 3 updates \(the 0 of lowest cosine, num-malicious-nodes, "
                                               r"and those with cosine <= min-cosine=0.99 with the others' median update; cosines "):
        _aggregate("median-cosine", current, [(node, a, n) for node, a, n in updates] + [
            (NODES[2], {k: (2 * current[k] - updates[0][1][k]) if aggregation.is_trained(k, current[k]) else current[k]
                        for k in current}, 10)], **{"min-cosine": 0.99})


def test_median_cosine_with_num_malicious_nodes_leaves_out_the_lowest_cosine_whatever_its_sign():
    """Nearly orthogonal honest updates (as HAM10000's sites send): every cosine is near 0, some
    honest ones below it; num-malicious-nodes 1 leaves out exactly the lowest, the flipped one."""
    current = {**_model_arrays(), "encoder.conv.weight": np.random.default_rng(3).normal(size=(128, 128)).astype(np.float32)}
    trained = [k for k in current if aggregation.is_trained(k, current[k])]
    rng = np.random.default_rng(7)
    common = {k: rng.normal(scale=0.02, size=current[k].shape) for k in trained}
    own = [{k: rng.normal(scale=0.1, size=current[k].shape) for k in trained} for _ in range(4)]
    ups = [{k: (current[k] + common[k] + own[i][k]).astype(np.float32) if k in trained else current[k] for k in current}
           for i in range(4)]
    ups[3] = {k: (2 * current[k] - ups[3][k]).astype(np.float32) if k in trained else current[k] for k in current}
    replies = [(NODES[i], ups[i], 10) for i in range(4)]
    agg, _ = _aggregate("median-cosine", current, replies, **{"min-cosine": -1.0, "num-malicious-nodes": 1})
    cosines = agg.strategy.last["cosines"]
    assert agg.strategy.last["left_out"] == [3] and cosines[3] == min(cosines)
    assert max(abs(c) for c in cosines[:3]) < 0.2  # nearly orthogonal, as measured on HAM10000


def test_median_cosine_that_would_leave_nothing_out_is_refused():
    with pytest.raises(ConfigError, match=r"strategy=median-cosine with num-malicious-nodes=0 and min-cosine=-1 leaves no update out"):
        RunConfig.from_mapping({"strategy": "median-cosine"})
    assert RunConfig.from_mapping({"strategy": "median-cosine", "num-malicious-nodes": 1}).min_cosine == -1.0


# ------------------------------------------------------------------ cyclic weight transfer
def test_cyclic_takes_the_last_hospitals_model_and_averages_only_the_statistics():
    """strategy=cyclic: the updates come in the order the hospitals trained; the new model's
    trained parameters are the last one's, its BatchNorm statistics FedAvg's over all of them
    (example-weighted mean, integer buffers the max), and no Flower strategy is involved."""
    current = _model_arrays()
    updates = _updates(current, n=3)
    agg = Aggregation(RunConfig.from_mapping({"strategy": "cyclic"}))
    assert agg.strategy is None
    assert agg.configure("finetune", 1, current, NODES[:3]) == {}
    new = agg.aggregate("finetune", 1, current, updates)
    last = updates[-1][1]
    for key in ("encoder.conv.weight", "encoder.bn.weight"):
        assert new[key].tobytes() == last[key].tobytes(), key
    average = weighted_average([(arrays, n) for _, arrays, n in updates])
    for key in ("encoder.bn.running_mean", "encoder.bn.running_var"):
        assert new[key].tobytes() == average[key].tobytes(), key
        assert not np.allclose(new[key], last[key]), key  # the last hospital's alone would differ
    assert int(new["encoder.bn.num_batches_tracked"]) == 7 + 2
    # A hospital that trained on no examples neither serves its model nor weighs in the statistics.
    idle = (NODES[3], {k: v + 1 if v.dtype == np.float32 else v for k, v in current.items()}, 0)
    assert relay_model([(a, n) for _, a, n in [*updates, idle]])["encoder.conv.weight"].tobytes() == last["encoder.conv.weight"].tobytes()


def test_the_relay_order_is_drawn_afresh_every_round_from_the_seed():
    hospitals = ["a", "b", "c", "d"]
    orders = [relay_order(hospitals, 0, "finetune", rnd) for rnd in range(1, 9)]
    assert all(sorted(o) == hospitals for o in orders)
    assert len({tuple(o) for o in orders}) > 1 and len({o[-1] for o in orders}) > 1  # not always the same last
    assert orders == [relay_order(hospitals, 0, "finetune", rnd) for rnd in range(1, 9)]  # reproducible
    assert [relay_order(hospitals, 1, "finetune", rnd) for rnd in range(1, 9)] != orders


@pytest.mark.parametrize("overrides,message", [
    ({"strategy": "cyclic", "secure-aggregation": True},
     "secure-aggregation=true needs a strategy that only averages"),
    ({"strategy": "cyclic", "dp": "central-fixed"}, "dp=central-fixed needs strategy=fedavg"),
    ({"strategy": "cyclic", "server-lr": 2.0}, "server-lr and server-momentum act with strategy=fedavg or fedavgm only, not strategy=cyclic"),
])
def test_cyclic_refuses_what_needs_an_average(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_mapping(overrides)


def test_hospital_batchnorm_is_off_by_default_and_refused_where_no_classifier_could_serve_it():
    """hospital-batchnorm: each hospital's statistics are served with its own label mix, so the
    run must fine-tune a balanced-softmax classifier whose encoder trained on the hospitals' batches."""
    assert RunConfig.from_mapping({}).hospital_batchnorm is False
    assert RunConfig.from_mapping({"hospital-batchnorm": True}).hospital_batchnorm is True
    for overrides, message in [
        ({"finetune-loss": "weighted-ce"}, "hospital-batchnorm=true needs finetune-loss=balanced-softmax (got weighted-ce)"),
        ({"finetune-mode": "linear"}, "hospital-batchnorm=true needs finetune-mode=full (got linear)"),
        ({"finetune-rounds": 0, "ssl-rounds": 1}, "hospital-batchnorm=true needs finetune-rounds >= 1"),
        ({"task": "generate", "image-size": 32}, "hospital-batchnorm=true serves a classifier, which task=generate does not train"),
    ]:
        with pytest.raises(ConfigError) as err:
            RunConfig.from_mapping({"hospital-batchnorm": True, **overrides})
        assert message in str(err.value), (overrides, str(err.value))

import numpy as np
import pytest

from fedssl_flower.config import RunConfig
from fedssl_flower.errors import ConfigError
from fedssl_flower.strategy import AggregationError, weighted_average


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
])
def test_bad_run_config_is_named(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
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

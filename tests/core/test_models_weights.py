import pytest
import torch

from fedssl_core import names, weights
from fedssl_core.errors import ConfigError, WeightsError
from fedssl_core.models import TASK_GROUPS, FedSSLModel, build_inference_model, select_groups


@pytest.mark.parametrize("task", names.MODEL_TASKS)
def test_training_state_loads_into_serving_model(task):
    torch.manual_seed(0)
    model = FedSSLModel(num_classes=5).eval()
    state = select_groups(model.state_dict(), TASK_GROUPS[task])
    serving = build_inference_model(task, names.ARCH_RESNET18, num_classes=5)
    weights.load_into(serving, weights.from_bytes(weights.to_bytes(state)))
    x = torch.randn(2, 3, 32, 32)
    expected = model(x) if task == names.TASK_CLASSIFICATION else model.embed(x)
    assert torch.allclose(serving(x), expected, atol=1e-5)


def test_load_into_names_wrong_keys():
    serving = build_inference_model(names.TASK_CLASSIFICATION, names.ARCH_RESNET18, num_classes=3)
    state = dict(serving.state_dict())
    state.pop("classifier.bias")
    state["classifier.weight"] = torch.zeros(4, 512)
    state["stray.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as err:
        weights.load_into(serving, state)
    msg = str(err.value)
    assert "missing keys: classifier.bias" in msg
    assert "unexpected keys: stray.weight" in msg
    assert "classifier.weight (4, 512) != (3, 512)" in msg


def test_from_bytes_refuses_non_safetensors():
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        weights.from_bytes(b"\x80\x04pickle-bytes-not-weights")


def test_metadata_round_trip_and_atomic_write(tmp_path):
    data = weights.to_bytes({"encoder.w": torch.ones(2)}, {"fedssl.arch": "resnet18"})
    assert weights.read_metadata(data) == {"fedssl.arch": "resnet18"}
    path = weights.atomic_write(tmp_path / "w.safetensors", data)
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left


def test_unknown_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown architecture 'vgg'"):
        FedSSLModel(arch="vgg")

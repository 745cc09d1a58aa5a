"""fedssl_core.hospital_batchnorm: hospitals' BatchNorm statistics carried in a weights file and
served as a model that shares the weights."""

import pytest
import torch

from fedssl_core import hospital_batchnorm, names, weights
from fedssl_core.errors import WeightsError
from fedssl_core.models import build_inference_model


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_inference_model(names.TASK_CLASSIFICATION, names.ARCH_RESNET18, 3)


def _stats(model: torch.nn.Module, shift: float) -> hospital_batchnorm.Statistics:
    return {k: (v + shift if k.endswith("running_mean") else v * (1 + shift)) for k, v in hospital_batchnorm.statistics_of(model).items()}


def test_packed_statistics_travel_in_a_weights_file_beside_the_models_own_tensors():
    model = _model()
    stats = {"b-clinic": _stats(model, 0.5), "a-clinic": _stats(model, 1.0)}
    tensors, meta = hospital_batchnorm.pack(stats)
    blob = weights.to_bytes({**model.state_dict(), **tensors}, meta)
    own, back = hospital_batchnorm.split(weights.from_bytes(blob), weights.read_metadata(blob))
    assert set(own) == set(model.state_dict())
    assert set(back) == set(stats) and all(torch.equal(back[h][k], stats[h][k]) for h in stats for k in stats[h])
    hospital_batchnorm.check(hospital_batchnorm.statistics_of(model), back)
    own, none = hospital_batchnorm.split(model.state_dict(), {})  # a file without statistics
    assert set(own) == set(model.state_dict()) and none == {}


def test_a_hospitals_model_shares_the_weights_and_normalises_with_its_own_statistics():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = _stats(model, 0.7)
    mine = hospital_batchnorm.with_statistics(model, stats)
    assert all(p is q for p, q in zip(mine.parameters(), model.parameters()))  # one copy of the weights
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the shared model keeps its own
    assert all(torch.equal(mine.state_dict()[k], v) for k, v in stats.items())
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert not torch.allclose(mine(x), model(x))
        by_hand = _model()
        by_hand.load_state_dict({**before, **stats})
        assert torch.allclose(mine(x), by_hand.eval()(x))
    assert not mine.training


@pytest.mark.parametrize(("change", "error"), [
    (lambda s, k: {**s, k: s[k][:-1]}, "has shape"),
    (lambda s, k: {**s, k: s[k] * float("nan")}, "is not finite floating point"),
    (lambda s, k: {**s, k: -s[k]}, "has negative variances"),
    (lambda s, k: {kk: v for kk, v in s.items() if kk != k}, "do not fit the model: missing"),
    (lambda s, k: {**s, "encoder.nowhere.running_var": s[k]}, "do not fit the model: unexpected encoder.nowhere.running_var"),
])
def test_statistics_that_do_not_fit_the_model_are_refused_naming_the_hospital(change, error):
    model = _model()
    stats = _stats(model, 0.1)
    key = next(k for k in stats if k.endswith("running_var"))
    with pytest.raises(WeightsError, match=f"hospital 'skinlab'.*{error}"):
        hospital_batchnorm.check(hospital_batchnorm.statistics_of(model), {"skinlab": change(stats, key)})


@pytest.mark.parametrize(("meta", "error"), [
    ('["a", "a"]', "names a hospital twice"),
    ("[]", "must be a non-empty JSON list of hospital names"),
    ('{"a": 1}', "must be a non-empty JSON list of hospital names"),
    ('["a"]', r"tensor hospital_batchnorm\.1\.encoder"),
])
def test_a_weights_file_whose_statistics_name_no_hospital_is_refused(meta, error):
    model = _model()
    tensors, _ = hospital_batchnorm.pack({"a": _stats(model, 0.1), "b": _stats(model, 0.2)})
    with pytest.raises(WeightsError, match=error):
        hospital_batchnorm.split({**model.state_dict(), **tensors}, {hospital_batchnorm.META_KEY: meta})

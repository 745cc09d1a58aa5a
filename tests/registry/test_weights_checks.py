"""Issue 17, item 7: weights that would answer patients with no numbers are refused at upload,
with the reason, and nothing of them is stored; what still overflows at inference is an
error, never a label with NaN probabilities."""

import json

import numpy as np
import pytest
import torch

from fedssl_core import names, weights
from fedssl_core.models import TASK_GROUPS, FedSSLModel, select_groups
from tests.support import processes as P

from .conftest import IMAGE_SIZE, model_body, upload

pytestmark = pytest.mark.integration

PREFIX = "weights rejected for 'clf' (classification, resnet18): "


def state(task: str = names.TASK_CLASSIFICATION) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return select_groups(FedSSLModel(num_classes=3).state_dict(), TASK_GROUPS[task])


def running_var_key(s: dict) -> str:
    return next(k for k in s if k.endswith("running_var"))


def with_value(key: str, value: float) -> bytes:
    s = state()
    s[key] = s[key].clone()
    s[key].view(-1)[0] = value
    return weights.to_bytes(s)


def cast(dtype: torch.dtype) -> bytes:
    return weights.to_bytes({k: v.to(dtype) if v.is_floating_point() else v for k, v in state().items()})


def negative_variance() -> bytes:
    s = state()
    key = running_var_key(s)
    s[key] = -torch.ones_like(s[key])  # finite, but every BatchNorm output becomes NaN
    return weights.to_bytes(s)


@pytest.fixture(scope="module")
def reg(tmp_path_factory, weights_blob):
    work = tmp_path_factory.mktemp("weights-checks")
    with P.cluster(work) as c:
        r = P.start_registry(c, work / "data", max_batch_wait_ms="2")
        with r.client() as http:
            assert http.post("/v1/models", json=model_body()).status_code == 201
            assert http.post("/v1/models", json=model_body("enc", "embedding")).status_code == 201
            assert upload(http, "clf", weights_blob).status_code == 201
        yield r


@pytest.mark.parametrize("blob,error", [
    (lambda: with_value("classifier.weight", float("nan")), PREFIX + "NaN or infinite values in classifier.weight"),
    (lambda: with_value("classifier.bias", float("inf")), PREFIX + "NaN or infinite values in classifier.bias"),
    (lambda: with_value(running_var_key(state()), float("-inf")), PREFIX + f"NaN or infinite values in {running_var_key(state())}"),
    (lambda: cast(torch.int8), PREFIX + "wrong dtype: classifier.bias is int8, expected float32"),
    (lambda: cast(torch.float64), PREFIX + "wrong dtype: classifier.bias is float64, expected float32"),
    (lambda: cast(torch.bool), PREFIX + "wrong dtype: classifier.bias is bool, expected float32"),
    (lambda: cast(torch.float16), PREFIX + "wrong dtype: classifier.bias is float16, expected float32"),
    (negative_variance, PREFIX + f"on a probe image (mid-grey, {IMAGE_SIZE}x{IMAGE_SIZE}) the model's probabilities are not finite (NaN or infinity)"),
], ids=["nan", "inf", "-inf-buffer", "int8", "float64", "bool", "float16", "non-finite-probe"])
def test_unservable_classifier_weights_are_refused_at_upload(reg, blob, error):
    with reg.client() as http:
        r = upload(http, "clf", blob())
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith(error), r.json()["error"]
        assert [v["version"] for v in http.get("/v1/models/clf/versions").json()["versions"]] == [1]
    assert list((reg.data_dir / "artifacts" / ".incoming").iterdir()) == []
    assert len(list((reg.data_dir / "artifacts").glob("??/*.safetensors"))) == 1  # only version 1's file


def test_an_embedding_with_nan_is_refused_too(reg):
    s = state(names.TASK_EMBEDDING)
    key = next(k for k, v in s.items() if v.is_floating_point())
    s[key] = torch.full_like(s[key], float("nan"))
    with reg.client() as http:
        r = upload(http, "enc", weights.to_bytes(s))
        assert (r.status_code, r.json()["error"]) == (400, f"weights rejected for 'enc' (embedding, resnet18): NaN or infinite values in {key}")
        assert http.get("/v1/models/enc/versions").json()["versions"] == []


def test_input_that_overflows_the_model_is_a_400_not_nan_probabilities(reg):
    """Finite FP32 input so large that the forward overflows: a clear 400, never NaN literals."""
    shape = [1, 3, IMAGE_SIZE, IMAGE_SIZE]
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": [3e38] * int(np.prod(shape))}]}
    with reg.client() as http:
        r = http.post("/v2/models/clf/infer", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json() == {"error": "model 'clf' version 1 gives non-finite probabilities (NaN or infinity) for this input; "
                                     "normalised inputs are expected within a few units of 0"}
        body["inputs"][0]["data"] = [0.0] * int(np.prod(shape))
        ok = http.post("/v2/models/clf/infer", json=body).json()
        assert np.isfinite(ok["outputs"][0]["data"]).all()

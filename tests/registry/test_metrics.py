"""/metrics follows Prometheus conventions: checked by promtool, and it counts real traffic."""

import subprocess

import pytest

from tests.conftest import require_tool

pytestmark = pytest.mark.integration


def test_metrics_pass_promtool_and_count_requests(shared_registry, tmp_path):
    promtool = require_tool("promtool")
    with shared_registry.client() as http:
        http.post("/v2/models/clf/infer", json={"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 3, 32, 32],
                                                            "data": [0] * 3072}]})
        http.get("/v1/models/ghost")
        http.post("/v1/runs/x/rounds", json={"phase": "ssl", "round": 1})
        http.put("/v1/runs/r-metrics", json={"status": "running"})
        http.post("/v1/runs/r-metrics/rounds", json={"phase": "ssl", "round": 1, "aggregated": {"loss": 2.5, "balanced_accuracy": 0.3},
                                                     "examples": {"h1": 40}, "duration_seconds": 12.0})
        http.post("/v1/runs/r-metrics/rounds", json={"phase": "finetune", "round": 1,
                                                     "aggregated": {"balanced_accuracy": 0.6, "served_balanced_accuracy": 0.65}})
        text = http.get("/metrics").text
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert 'fedssl_http_requests_total{method="GET",route="/v1/models/{name}",status="404"}' in text
    assert 'fedssl_inference_batch_size_count{model="clf"}' in text
    assert 'fedssl_http_requests_total{method="POST",route="/v2/models/{name}/infer",status="200"}' in text
    assert 'fedssl_federated_round_loss{phase="ssl",run_id="r-metrics"} 2.5' in text
    # a final round scored as served to each hospital naming itself (hospital-batchnorm); not the ssl round
    assert 'fedssl_federated_round_served_balanced_accuracy{phase="finetune",run_id="r-metrics"} 0.65' in text
    assert 'fedssl_federated_round_served_balanced_accuracy{phase="ssl"' not in text
    assert 'fedssl_federated_hospital_examples{hospital="h1",run_id="r-metrics"} 40.0' in text
    assert "fedssl_model_versions" in text and "fedssl_loaded_models 1.0" in text

"""Logs: one line per request; with FEDSSL_REGISTRY_LOG_JSON=true, one JSON object per line."""

import json
import time

import pytest

from tests.support import processes as P

pytestmark = pytest.mark.integration


def access_lines(reg, n, timeout=10.0):
    end = time.monotonic() + timeout
    while True:
        lines = [line for line in reg.proc.text().splitlines() if '"logger": "fedssl.registry.access"' in line]
        if len(lines) >= n or time.monotonic() > end:
            return [json.loads(line) for line in lines]
        time.sleep(0.1)


def test_one_json_line_per_request(cluster, tmp_path):
    reg = P.start_registry(cluster, tmp_path / "data", log_json="true")
    with reg.client() as http:
        before = len(access_lines(reg, 0, timeout=0))  # the readiness probes of start-up
        assert http.get("/v1/models").status_code == 200
        assert http.get("/v1/models/ghost").status_code == 404
        infer = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 3072}]}
        assert http.post("/v2/models/ghost/infer", json=infer).status_code == 404
    lines = access_lines(reg, before + 3)[before:]
    assert [(x["method"], x["path"], x["status"]) for x in lines] == [
        ("GET", "/v1/models", 200), ("GET", "/v1/models/ghost", 404), ("POST", "/v2/models/ghost/infer", 404)]
    for x in lines:
        assert x["level"] == "INFO" and x["client"] == "127.0.0.1" and x["duration_ms"] >= 0
        assert x["message"].startswith(f"{x['method']} {x['path']} {x['status']} ") and x["message"].endswith("ms")
    assert all(json.loads(line) for line in reg.proc.text().splitlines() if line.startswith("{"))  # every JSON line parses

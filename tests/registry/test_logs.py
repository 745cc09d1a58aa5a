"""Logs: one line per request; with FEDSSL_REGISTRY_LOG_JSON=true, one JSON object per line."""

import json
import socket
import time

import pytest

from tests.registry.conftest import model_body, upload
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


def test_a_client_that_leaves_mid_request_is_a_499_not_an_error(cluster, tmp_path, weights_blob):
    reg = P.start_registry(cluster, tmp_path / "data", log_json="true")
    with reg.client() as http:
        assert http.post("/v1/models", json=model_body()).status_code == 201
        assert upload(http, "clf", weights_blob).status_code == 201
        assert http.get("/v2/models/clf/ready").status_code == 200  # loaded: the request below reaches the body
    before = len(access_lines(reg, 0, timeout=0))
    port = int(reg.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v2/models/clf/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + reg.token.encode() + b"\r\nContent-Length: 5000\r\n\r\n{\"inputs\": [")
        time.sleep(0.3)  # the server is now waiting for the rest of the body
    lines = access_lines(reg, before + 1)[before:]
    assert [(x["method"], x["path"], x["status"]) for x in lines] == [("POST", "/v2/models/clf/infer", 499)]
    log = reg.proc.text()
    assert "client disconnected before the request was complete" in log
    assert "unexpected error" not in log and "Traceback" not in log

"""Logs: one line per request; with FEDSSL_REGISTRY_LOG_JSON=true, one JSON object per line."""

import json
import socket
import time

import pytest

from tests.registry.conftest import model_body, upload
from tests.support import processes as P

pytestmark = pytest.mark.integration


def access_lines(reg, paths, n, timeout=10.0):
    """The access lines of requests to `paths`, once there are `n` of them (or after `timeout`).

    Selected by path rather than counted from a starting point: a line is written just after
    its response, so the line of a request made before (a start-up probe, a setup call) may
    still be on its way when the test begins."""
    end = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in reg.proc.text().splitlines() if '"logger": "fedssl.registry.access"' in line]
        lines = [x for x in lines if x["path"] in paths]
        if len(lines) >= n or time.monotonic() > end:
            return lines
        time.sleep(0.1)


def test_one_json_line_per_request(cluster, tmp_path):
    reg = P.start_registry(cluster, tmp_path / "data", log_json="true")
    with reg.client() as http:
        assert http.get("/v1/models").status_code == 200
        assert http.get("/v1/models/ghost").status_code == 404
        infer = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 3072}]}
        assert http.post("/v2/models/ghost/infer", json=infer).status_code == 404
    lines = access_lines(reg, {"/v1/models", "/v1/models/ghost", "/v2/models/ghost/infer"}, 3)
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
    port = int(reg.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v2/models/clf/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + reg.token.encode() + b"\r\nContent-Length: 5000\r\n\r\n{\"inputs\": [")
        time.sleep(0.3)  # the server is now waiting for the rest of the body
    lines = access_lines(reg, {"/v2/models/clf/infer"}, 1)
    assert [(x["method"], x["path"], x["status"]) for x in lines] == [("POST", "/v2/models/clf/infer", 499)]
    log = reg.proc.text()
    assert "client disconnected before the request was complete" in log
    assert "unexpected error" not in log and "Traceback" not in log

"""Nothing is lost: parallel uploads, restarts, and kill -9 in the middle of an upload."""

import os
import signal
import socket
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import processes as P
from tests.support.waiting import wait_for

from .conftest import model_body, upload

pytestmark = pytest.mark.integration


def test_parallel_uploads_get_distinct_gap_free_versions(registry, weights_blob):
    with registry.client() as http:
        http.post("/v1/models", json=model_body())

    def one(_):
        with registry.client() as h:
            r = upload(h, "clf", weights_blob)
            assert r.status_code == 201, r.text
            return r.json()["version"]

    with ThreadPoolExecutor(6) as pool:
        versions = sorted(pool.map(one, range(6)))
    assert versions == [1, 2, 3, 4, 5, 6]


def test_restart_serves_exactly_what_was_there(cluster, tmp_path, weights_blob):
    data = tmp_path / "data"
    reg = P.start_registry(cluster, data)
    with reg.client() as http:
        http.post("/v1/models", json=model_body())
        upload(http, "clf", weights_blob, {"lineage": {"run_id": "r"}})
        http.put("/v1/models/clf/aliases/production", json={"version": 1})
        http.put("/v1/runs/r", json={"status": "succeeded"})
        before = (http.get("/v1/models").json(), http.get("/v1/models/clf/versions").json(), http.get("/v1/runs/r").json())
    reg.proc.kill(signal.SIGTERM)
    again = P.start_registry(cluster, data)
    with again.client() as http:
        after = (http.get("/v1/models").json(), http.get("/v1/models/clf/versions").json(), http.get("/v1/runs/r").json())
        assert http.get("/v1/models/clf/versions/1/weights").content == weights_blob
    assert after == before


def spooled_upload_bytes(pid: int) -> int:
    """Size of the largest deleted file process `pid` holds open: Starlette spools a multipart
    upload over 1 MB to an unlinked temporary file as its body arrives (the route's file in
    the store's .incoming/ is written only once the whole body is there)."""
    largest = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).endswith(" (deleted)"):
                largest = max(largest, os.stat(fd).st_size)
        except OSError:  # closed meanwhile
            pass
    return largest


def test_kill_9_mid_upload_leaves_no_half_version(cluster, tmp_path, weights_blob):
    data = tmp_path / "data"
    reg = P.start_registry(cluster, data)
    with reg.client() as http:
        http.post("/v1/models", json=model_body())
        assert upload(http, "clf", weights_blob).status_code == 201
    # Send the headers and half of a large upload by hand; once the server has received that
    # half (it holds it in the spooled multipart file), kill -9 it.
    boundary = "fedsslboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"w.safetensors\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    total = len(head) + len(weights_blob) + len(f"\r\n--{boundary}--\r\n")
    port = int(reg.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall((f"POST /v1/models/clf/versions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {reg.token}\r\n"
                   f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {total}\r\n\r\n").encode())
        s.sendall(head + weights_blob[: len(weights_blob) // 2])
        received = wait_for(lambda: spooled_upload_bytes(reg.proc.popen.pid) >= len(weights_blob) // 2, 60,
                            "the registry to hold the half-sent upload")
        reg.proc.kill(signal.SIGKILL)
    assert received and reg.proc.popen.returncode == -signal.SIGKILL  # killed mid-upload, not after it
    with sqlite3.connect(data / "registry.db") as db:
        assert db.execute("select count(*) from model_versions").fetchone() == (1,)
    again = P.start_registry(cluster, data)
    with again.client() as http:
        assert [v["version"] for v in http.get("/v1/models/clf/versions").json()["versions"]] == [1]
        assert upload(http, "clf", weights_blob).json()["version"] == 2  # numbering continues without a gap
    leftovers = list((data / "artifacts" / ".incoming").iterdir())
    assert leftovers == []
    assert len(list((data / "artifacts").glob("??/*.safetensors"))) == 1


def test_version_numbers_are_never_reused_after_a_delete(cluster, tmp_path, weights_blob):
    """Issue 17, item 7: deleting the newest version freed its number, and the next upload
    took it: a client holding "version 3" would get other weights."""
    data = tmp_path / "data"
    reg = P.start_registry(cluster, data)
    with reg.client() as http:
        http.post("/v1/models", json=model_body())
        assert [upload(http, "clf", weights_blob).json()["version"] for _ in range(3)] == [1, 2, 3]
        assert http.delete("/v1/models/clf/versions/3").status_code == 204
        assert upload(http, "clf", weights_blob).json()["version"] == 4
        assert http.delete("/v1/models/clf/versions/4").status_code == 204
        assert http.delete("/v1/models/clf/versions/2").status_code == 204
    reg.proc.kill(signal.SIGTERM)
    again = P.start_registry(cluster, data)
    with again.client() as http:
        assert upload(http, "clf", weights_blob).json()["version"] == 5
        assert [v["version"] for v in http.get("/v1/models/clf/versions").json()["versions"]] == [1, 5]
        assert http.get("/v1/models/clf/versions/4").status_code == 404

"""Issue 17, item 6: inputs that were 500s are 4xx answers naming the field, and the
connection they came on stays usable (a 500 made the server drop keep-alive connections)."""

import json

import pytest

from tests.support import processes as P
from tests.support.http import KeepAlive

from .conftest import CLASSES, IMAGE_SIZE, model_body, upload

pytestmark = pytest.mark.integration

HUGE = 2**63  # one past SQLite's int64
INT32_PAST = 2**31  # one past PostgreSQL's INTEGER: the bound has to hold on both databases
PIXELS = {"name": "image", "datatype": "UINT8", "shape": [1, 3, IMAGE_SIZE, IMAGE_SIZE], "data": [0] * (3 * IMAGE_SIZE * IMAGE_SIZE)}
JSON = {"content-type": "application/json"}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture(scope="module")
def reg(tmp_path_factory, weights_blob):
    """A registry with classifier `clf` version 1 (production) and a run `run-1`."""
    work = tmp_path_factory.mktemp("bad-inputs")
    with P.cluster(work) as c:
        r = P.start_registry(c, work / "data")
        with r.client() as http:
            assert http.post("/v1/models", json=model_body()).status_code == 201
            assert upload(http, "clf", weights_blob).status_code == 201
            assert http.put("/v1/models/clf/aliases/production", json={"version": 1}).status_code == 200
            assert http.put("/v1/runs/run-1", json={"status": "running"}).status_code == 200
        yield r


def multipart(field: str, filename: str, content: bytes, ctype: str, extra: dict[str, str] | None = None) -> tuple[bytes, dict]:
    boundary = "fedssl-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in (extra or {}).items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                 f"Content-Type: {ctype}\r\n\r\n".encode() + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {"content-type": f"multipart/form-data; boundary={boundary}"}


def png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (90, 90, 90)).save(buf, "PNG")
    return buf.getvalue()


CASES = [  # id, method, path, body (bytes or a JSON-able value), headers, status, words the error must contain
    ("v1 version 2^63", "GET", f"/v1/models/clf/versions/{HUGE}", None, {}, 422, ["version", "2147483647"]),
    ("v1 version 2^31", "GET", f"/v1/models/clf/versions/{INT32_PAST}", None, {}, 422, ["version", "2147483647"]),
    ("v1 weights 2^63", "GET", f"/v1/models/clf/versions/{HUGE}/weights", None, {}, 422, ["version"]),
    ("v1 delete 2^63", "DELETE", f"/v1/models/clf/versions/{HUGE}", None, {}, 422, ["version"]),
    ("alias target 2^63", "PUT", "/v1/models/clf/aliases/staging", {"version": HUGE}, JSON, 422, ["version", "2147483647"]),
    ("predict ?version=2^63", "POST", f"/v1/models/clf:predict?version={HUGE}", "png", {}, 422, ["version"]),
    ("round 2^63", "POST", "/v1/runs/run-1/rounds", {"phase": "ssl", "round": HUGE}, JSON, 422, ["round", "2147483647"]),
    ("round 2^31", "POST", "/v1/runs/run-1/rounds", {"phase": "ssl", "round": INT32_PAST}, JSON, 422, ["round"]),
    ("v2 version 2^63", "GET", f"/v2/models/clf/versions/{HUGE}", None, {}, 400, ["version", "2147483647"]),
    ("v2 infer version 2^63", "POST", f"/v2/models/clf/versions/{HUGE}/infer", {"inputs": [PIXELS]}, JSON, 400, ["version"]),
    ("v2 version ²", "GET", "/v2/models/clf/versions/%C2%B2", None, {}, 400, ["version must be a positive integer", "²"]),
    ("v2 version ١", "GET", "/v2/models/clf/versions/%D9%A1/ready", None, {}, 400, ["version must be a positive integer", "١"]),
    ("v2 infer version ١", "POST", "/v2/models/clf/versions/%D9%A1/infer", {"inputs": [PIXELS]}, JSON, 400, ["version"]),
    ("v1 version ١", "GET", "/v1/models/clf/versions/%D9%A1", None, {}, 422, ["version"]),
    ("v2 nested body", "POST", "/v2/models/clf/infer", nested(100_000).encode(), JSON, 400, ["nest"]),
    ("v2 nested input", "POST", "/v2/models/clf/infer", b'{"inputs": [' + nested(50_000).encode() + b"]}", JSON, 400, ["nest"]),
    ("v2 nested id", "POST", "/v2/models/clf/infer", {"id": json.loads(nested(500)), "inputs": [PIXELS]}, JSON, 400, ["id", "string"]),
    ("v2 input name list", "POST", "/v2/models/clf/infer", {"inputs": [{**PIXELS, "name": ["image"]}]}, JSON, 400, ["name", "list"]),
    ("v2 input name object", "POST", "/v2/models/clf/infer", {"inputs": [{**PIXELS, "name": {"a": 1}}]}, JSON, 400, ["name", "dict"]),
    ("v2 nested data", "POST", "/v2/models/clf/infer", b'{"inputs": [{"name": "image", "datatype": "UINT8", '
     b'"shape": [1, 3, 32, 32], "data": ' + nested(900).encode() + b"}]}", JSON, 400, ["data"]),
    ("v1 nested run body", "PUT", "/v1/runs/run-2", b'{"config": {"a": ' + nested(100_000).encode() + b"}}", JSON, 422, ["nest"]),
    ("v1 deep run config", "PUT", "/v1/runs/run-2", b'{"config": {"a": ' + nested(500).encode() + b"}}", JSON, 422, ["config.a", "nest"]),
    ("NaN in a run", "PUT", "/v1/runs/run-2", b'{"config": {"lr": NaN}}', JSON, 422, ["config.lr", "finite"]),
    ("Infinity in a round", "POST", "/v1/runs/run-1/rounds", b'{"phase": "ssl", "round": 1, "aggregated": {"loss": Infinity}}', JSON,
     422, ["aggregated.loss", "finite"]),
    ("huge int in a round metric", "POST", "/v1/runs/run-1/rounds", b'{"phase": "ssl", "round": 1, "aggregated": {"loss": 1' + b"0" * 400 + b"}}",
     JSON, 422, ["aggregated.loss"]),
    ("bytes_sent -1", "POST", "/v1/runs/run-1/rounds", {"phase": "ssl", "round": 1, "bytes_sent": -1}, JSON, 422, ["bytes_sent", "greater than or equal to 0"]),
    ("bytes_received -1", "POST", "/v1/runs/run-1/rounds", {"phase": "ssl", "round": 1, "bytes_received": -1}, JSON, 422, ["bytes_received"]),
    ("examples -1", "POST", "/v1/runs/run-1/rounds", {"phase": "ssl", "round": 1, "examples": {"a": -1}}, JSON, 422, ["examples.a"]),
    ("duration -1", "POST", "/v1/runs/run-1/rounds", {"phase": "ssl", "round": 1, "duration_seconds": -1}, JSON, 422, ["duration_seconds"]),
    ("round for a bad run id", "POST", "/v1/runs/..%00/rounds", {"phase": "ssl", "round": 1}, JSON, 400, ["run id"]),
    ("lone surrogate in a description", "POST", "/v1/models", b'{"name": "s", "task": "embedding", "description": "\\ud800", '
     b'"input_spec": {"image_size": 32}}', JSON, 422, ["description", "surrogate"]),
    ("NUL in a description", "POST", "/v1/models", b'{"name": "s", "task": "embedding", "description": "a\\u0000b", '
     b'"input_spec": {"image_size": 32}}', JSON, 422, ["description", "NUL"]),
    ("std 0", "POST", "/v1/models", {**model_body("z"), "input_spec": {"image_size": 32, "class_names": CLASSES, "std": [0, 0, 0]}},
     JSON, 422, ["input_spec.std", "greater than 0"]),
    ("std -1", "POST", "/v1/models", {**model_body("z"), "input_spec": {"image_size": 32, "class_names": CLASSES, "std": [1, -1, 1]}},
     JSON, 422, ["input_spec.std.1"]),
    ("mean NaN", "POST", "/v1/models", b'{"name": "z", "task": "embedding", "input_spec": {"image_size": 32, "mean": [NaN, 0, 0]}}',
     JSON, 422, ["input_spec.mean", "finite"]),
    ("duplicate class names", "POST", "/v1/models", {**model_body("z"), "input_spec": {"image_size": 32, "class_names": ["a", "b", "a"]}},
     JSON, 422, ["input_spec.class_names", "'a'", "more than once"]),
    ("empty class name", "POST", "/v1/models", {**model_body("z"), "input_spec": {"image_size": 32, "class_names": ["a", ""]}},
     JSON, 422, ["input_spec.class_names"]),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_4xx_naming_the_field_and_the_connection_lives(reg, method, path, body, headers, status, words):
    if body == "png":
        body, headers = multipart("file", "x.png", png_bytes(), "image/png")
    elif body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    conn = KeepAlive(reg.url, reg.token)
    try:
        got, _, answer = conn.request(method, path, body, headers)
        error = json.loads(answer)["error"]
        assert got == status, error
        for word in words:
            assert word in error, error
        # the same connection answers the next request: nothing made the server drop it
        assert conn.request("GET", "/v2/health/live")[0] == 200
    finally:
        conn.close()


def test_nothing_is_stored_by_a_refused_round_or_model(reg):
    with reg.client() as http:
        assert http.get("/v1/runs/run-1/rounds").json()["rounds"] == []
        assert [m["name"] for m in http.get("/v1/models").json()["models"]] == ["clf"]
        assert http.get("/v1/runs/run-2").status_code == 404
        assert http.get("/v1/models/clf").json()["aliases"] == {"production": 1}


@pytest.mark.parametrize("metadata,words", [
    (nested(100_000), ["metadata", "nest"]),
    ('{"lineage": {"a": ' + nested(500) + "}}", ["metadata", "lineage.a", "nest"]),
    ('{"lineage": {"loss": NaN}}', ["metadata", "lineage.loss", "finite"]),
])
def test_bad_upload_metadata_is_refused_naming_the_field(reg, weights_blob, metadata, words):
    body, headers = multipart("file", "w.safetensors", weights_blob, "application/octet-stream", {"metadata": metadata})
    conn = KeepAlive(reg.url, reg.token)
    try:
        status, _, answer = conn.request("POST", "/v1/models/clf/versions", body, headers)
        error = json.loads(answer)["error"]
        assert status == 400, error
        for word in words:
            assert word in error, error
        assert conn.request("GET", "/v2/health/live")[0] == 200
    finally:
        conn.close()
    with reg.client() as http:
        assert [v["version"] for v in http.get("/v1/models/clf/versions").json()["versions"]] == [1]
    assert list((reg.data_dir / "artifacts" / ".incoming").iterdir()) == []


def test_good_inputs_next_to_the_bounds_still_work(reg):
    big = 2**31 - 1
    with reg.client() as http:
        assert http.put("/v1/runs/run-ok", json={"status": "running"}).status_code == 200
        r = http.post("/v1/runs/run-ok/rounds", json={"phase": "finetune", "round": big, "bytes_sent": 0, "bytes_received": 2**62,
                                                      "examples": {"a": 0}, "duration_seconds": 0.0})
        assert r.status_code == 201, r.text
        assert http.get(f"/v1/models/clf/versions/{big}").json() == {"error": f"model 'clf' has no version {big}"}
        assert http.get(f"/v2/models/clf/versions/{big}").json() == {"error": f"model 'clf' has no version {big}"}
        assert http.get("/v1/models/clf/versions/01").json()["version"] == 1

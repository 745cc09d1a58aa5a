"""Registry API against a real server on a free port with a real SQLite file."""

import json

import pytest

from fedssl_core import weights

from .conftest import model_body, upload

pytestmark = pytest.mark.integration


def test_model_version_alias_lifecycle(registry, weights_blob):
    with registry.client() as http:
        assert http.post("/v1/models", json=model_body()).status_code == 201
        r1 = upload(http, "clf", weights_blob, {"tags": {"phase": "finetune"},
                                                "lineage": {"run_id": "r9", "round": 2, "phase": "finetune", "hospitals": ["a", "b"],
                                                            "metrics": {"balanced_accuracy": 0.5}}})
        assert r1.status_code == 201
        v1 = r1.json()
        assert v1["version"] == 1 and v1["size_bytes"] == len(weights_blob) and v1["sha256"] == weights.sha256_hex(weights_blob)
        assert v1["lineage"]["hospitals"] == ["a", "b"] and v1["tags"] == {"phase": "finetune"}
        assert upload(http, "clf", weights_blob).json()["version"] == 2
        assert http.put("/v1/models/clf/aliases/production", json={"version": 1}).json()["aliases"] == {"production": 1}
        assert http.put("/v1/models/clf/aliases/staging", json={"version": 2}).status_code == 200
        listed = http.get("/v1/models").json()["models"]
        assert listed == [http.get("/v1/models/clf").json()]
        assert listed[0]["latest_version"] == 2 and listed[0]["aliases"] == {"production": 1, "staging": 2}
        assert http.get("/v1/models/clf/versions/1/weights").content == weights_blob
        # An alias holds its version; moving it frees the version for deletion.
        r = http.delete("/v1/models/clf/versions/1")
        assert r.status_code == 409 and r.json() == {"error": "version 1 of 'clf' is held by alias(es) production; move or delete them first"}
        assert http.put("/v1/models/clf/aliases/production", json={"version": 2}).status_code == 200
        assert http.delete("/v1/models/clf/versions/1").status_code == 204
        assert [v["version"] for v in http.get("/v1/models/clf/versions").json()["versions"]] == [2]
        assert http.delete("/v1/models/clf/aliases/staging").status_code == 204
        assert http.get("/v1/models/clf").json()["aliases"] == {"production": 2}


def test_runs_and_rounds_json_and_csv(registry):
    with registry.client() as http:
        assert http.put("/v1/runs/run-1", json={"status": "running", "planned_rounds": {"ssl": 1, "finetune": 1},
                                                 "hospitals": {"a": {"ssl_task": "simclr"}}}).status_code == 200
        for phase in ("ssl", "finetune"):
            body = {"phase": phase, "round": 1, "aggregated": {"loss": 1.5, "balanced_accuracy": 0.4},
                    "hospitals": {"a": {"loss": 1.5, "examples": 10}}, "examples": {"a": 10},
                    "duration_seconds": 3.0, "bytes_sent": 100, "bytes_received": 50}
            assert http.post("/v1/runs/run-1/rounds", json=body).status_code == 201
        assert http.post("/v1/runs/run-1/rounds", json={**body, "aggregated": {"loss": 1.0}}).status_code == 201  # retried: replaces
        run = http.get("/v1/runs/run-1").json()
        assert run["rounds_done"] == {"ssl": 1, "finetune": 1} and run["rounds_total"] == 2
        rounds = http.get("/v1/runs/run-1/rounds").json()["rounds"]
        assert [(r["phase"], r["round"]) for r in rounds] == [("ssl", 1), ("finetune", 1)]
        assert rounds[1]["aggregated"] == {"loss": 1.0}
        csv_text = http.get("/v1/runs/run-1/rounds.csv").text.splitlines()
        assert csv_text[0].startswith("phase,round,hospital,examples,loss")
        assert csv_text[1].startswith("ssl,1,aggregated,,1.5") and csv_text[2].startswith("ssl,1,a,10,1.5")
        assert http.get("/v1/runs").json()["runs"][0]["run_id"] == "run-1"


@pytest.mark.parametrize("method,path,kwargs,status,error", [
    ("POST", "/v1/models", {"json": model_body()}, 401, "missing bearer token: send 'Authorization: Bearer <token>'"),
])
def test_writes_need_the_token(registry, method, path, kwargs, status, error):
    with registry.client(token="") as anon, registry.client(token="wrong") as wrong:
        r = anon.request(method, path, **kwargs)
        assert (r.status_code, r.json()) == (status, {"error": error})
        r = wrong.request(method, path, **kwargs)
        assert (r.status_code, r.json()) == (401, {"error": "invalid bearer token"})
        assert anon.get("/v1/models").status_code == 200  # reads are open unless READ_AUTH


def test_read_auth_protects_reads(cluster, tmp_path):
    from tests.support import processes as P

    reg = P.start_registry(cluster, tmp_path / "ra", read_auth="true")
    with reg.client(token="") as anon, reg.client() as http:
        assert anon.get("/v1/models").status_code == 401
        assert http.get("/v1/models").status_code == 200
        assert anon.get("/v2/health/ready").status_code == 200  # probes stay open
        infer = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 3072}]}
        r = anon.post("/v2/models/clf/infer", json=infer)
        assert (r.status_code, r.json()) == (401, {"error": "missing bearer token: send 'Authorization: Bearer <token>'"})
        r = http.post("/v2/models/clf/infer", json=infer)  # past the token check: the model does not exist
        assert (r.status_code, r.json()) == (404, {"error": "model 'clf' not found"})


def test_request_bodies_over_the_limit_are_refused_declared_or_chunked(cluster, tmp_path):
    from tests.support import processes as P

    reg = P.start_registry(cluster, tmp_path / "small", max_upload_bytes="2048")
    big = b'{"name": "' + b"x" * 4096 + b'"}'
    with reg.client() as http:
        r = http.post("/v1/models", content=big, headers={"content-type": "application/json"})
        assert (r.status_code, r.json()) == (413, {"error": f"request body of {len(big)} bytes exceeds the limit of 2048 bytes"})
        r = http.post("/v1/models", content=iter([big[:1000], big[1000:]]), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers  # sent chunked: the size is only known as it arrives
        assert (r.status_code, r.json()) == (413, {"error": "request body exceeds the limit of 2048 bytes"})
        body = json.dumps(model_body()).encode()
        r = http.post("/v1/models", content=iter([body[:50], body[50:]]), headers={"content-type": "application/json"})
        assert r.status_code == 201, r.text  # a chunked body under the limit is read whole
        assert [m["name"] for m in http.get("/v1/models").json()["models"]] == ["clf"]


def test_openapi_documents_every_route_including_v2_infer(registry):
    with registry.client() as http:
        first, again = http.get("/openapi.json").json(), http.get("/openapi.json").json()
    assert again == first  # built once, served the same
    paths = first["paths"]
    assert set(paths["/v2/models/{name}/infer"]) == {"post"}
    op = paths["/v2/models/{name}/versions/{version}/infer"]["post"]
    assert [p["name"] for p in op["parameters"]] == ["name", "version"]
    assert set(op["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert {"200", "400", "401", "404", "413", "503"} <= set(op["responses"])
    assert "/v2/models/{name}/ready" in paths and "/v1/models/{name}/versions" in paths


@pytest.fixture(scope="module")
def refusing_registry(tmp_path_factory):
    """One registry for every bad-input case: each must leave it as it found it (model `clf`, no
    version), which each case asserts, so they can share one server instead of starting eleven."""
    from tests.support import processes as P

    work = tmp_path_factory.mktemp("refusing-registry")
    with P.cluster(work) as c:
        yield P.start_registry(c, work / "data")


@pytest.mark.parametrize("case", ["bad_name", "dup", "bad_task", "unknown_model", "unknown_version", "malformed_json",
                                  "not_safetensors", "wrong_shape", "pickle", "wrong_content_type", "bad_metadata"])
def test_bad_inputs_get_exact_errors(refusing_registry, weights_blob, case):
    with refusing_registry.client() as http:
        http.post("/v1/models", json=model_body())
        if case == "bad_name":
            r = http.post("/v1/models", json={**model_body(), "name": "../etc"})
            assert r.status_code == 422 and "name: Value error, must match" in r.json()["error"]
        elif case == "dup":
            r = http.post("/v1/models", json=model_body())
            assert (r.status_code, r.json()) == (409, {"error": "model 'clf' already exists"})
        elif case == "bad_task":
            r = http.post("/v1/models", json={**model_body("x"), "task": "segmentation"})
            assert r.status_code == 422 and r.json()["error"].startswith("invalid request: task:")
        elif case == "unknown_model":
            r = http.get("/v1/models/nope")
            assert (r.status_code, r.json()) == (404, {"error": "model 'nope' not found"})
            r = http.get("/v1/models/..%2Fsecret")
            assert r.status_code in (400, 404) and "error" in r.json()
        elif case == "unknown_version":
            r = http.get("/v1/models/clf/versions/7")
            assert (r.status_code, r.json()) == (404, {"error": "model 'clf' has no version 7"})
        elif case == "malformed_json":
            r = http.post("/v1/models", content=b"{not json", headers={"content-type": "application/json"})
            assert r.status_code == 422 and r.json()["error"].startswith("invalid request:")
        elif case == "not_safetensors":
            r = upload(http, "clf", b"\x00\x01 definitely not weights")
            assert r.status_code == 400 and r.json()["error"].startswith("weights rejected for 'clf' (classification, resnet18): not a valid safetensors file")
        elif case == "wrong_shape":
            from .conftest import classifier_bytes

            r = upload(http, "clf", classifier_bytes(num_classes=5))
            assert r.status_code == 400 and r.json()["error"].endswith("weights do not fit the model: shape mismatch: classifier.bias (5,) != (3,), classifier.weight (5, 512) != (3, 512)")
        elif case == "pickle":
            import io
            import pickle

            buf = io.BytesIO()
            pickle.dump({"x": 1}, buf)
            r = upload(http, "clf", buf.getvalue())
            assert r.status_code == 400 and "not a valid safetensors file" in r.json()["error"]
        elif case == "wrong_content_type":
            r = http.post("/v1/models/clf/versions", files={"file": ("w.bin", weights_blob, "text/plain")})
            assert (r.status_code, r.json()) == (415, {"error": "weights must be a safetensors file sent as application/octet-stream, got text/plain"})
        elif case == "bad_metadata":
            r = upload(http, "clf", weights_blob, {"lineage": "not an object"})
            assert r.status_code == 400 and r.json()["error"].startswith("metadata is not valid: lineage:")
        assert [v["version"] for v in http.get("/v1/models/clf/versions").json()["versions"]] == []  # nothing half-created
        assert [m["name"] for m in http.get("/v1/models").json()["models"]] == ["clf"]


def test_refuses_to_start_without_a_token(tmp_path):
    from tests.support import processes as P

    r = P.registry_start_refused(tmp_path, timeout=60)
    assert r.returncode == 2
    assert "FEDSSL_REGISTRY_TOKEN is not set: the registry refuses to start without a write token" in r.stderr


def test_v1_answers_are_their_declared_models_and_keep_every_key(registry, weights_blob):
    """Every /v1 JSON answer validates against the model its route declares (`schemas.*Response`),
    dumps back to exactly what was sent (a declaration drops nothing: a run's and a round's keys
    beyond the declared ones included; a classifier's answer has no encoder keys), and the
    OpenAPI schema references each model."""
    import io

    from PIL import Image

    from fedssl_registry import schemas as S

    jpeg = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 120, 90)).save(jpeg, "JPEG")
    with registry.client() as http:
        answers = [(S.ModelResponse, http.post("/v1/models", json=model_body())),
                   (S.VersionResponse, upload(http, "clf", weights_blob, {"tags": {"phase": "finetune"},
                                                                         "lineage": {"run_id": "r1", "round": 2}})),
                   (S.ModelResponse, http.put("/v1/models/clf/aliases/production", json={"version": 1})),
                   (S.ModelList, http.get("/v1/models")), (S.ModelResponse, http.get("/v1/models/clf")),
                   (S.VersionList, http.get("/v1/models/clf/versions")), (S.VersionResponse, http.get("/v1/models/clf/versions/1")),
                   (S.PredictResponse, http.post("/v1/models/clf:predict", files={"file": ("a.jpg", jpeg.getvalue(), "image/jpeg")})),
                   (S.RunResponse, http.put("/v1/runs/r1", json={"status": "running", "planned_rounds": {"finetune": 2},
                                                                  "aggregator_note": "kept"})),
                   (S.PostedRound, http.post("/v1/runs/r1/rounds", json={"phase": "finetune", "round": 1,
                                                                         "aggregated": {"balanced_accuracy": 0.5}, "extra": [1, 2]})),
                   (S.RunList, http.get("/v1/runs")), (S.RunResponse, http.get("/v1/runs/r1")),
                   (S.RoundList, http.get("/v1/runs/r1/rounds"))]
        schema = http.get("/openapi.json").json()
    for model, r in answers:
        assert r.status_code in (200, 201), (model.__name__, r.text)
        assert model.model_validate(r.json()).model_dump(exclude_unset=True) == r.json(), model.__name__
    predicted = answers[7][1].json()
    assert set(predicted) == {"model", "version", "label", "probabilities"}  # no hospital named, no embedding
    run = answers[-2][1].json()
    assert run["aggregator_note"] == "kept" and run["rounds_done"] == {"finetune": 1} and run["rounds_total"] == 1
    assert answers[-1][1].json()["rounds"][0]["extra"] == [1, 2] and answers[9][1].json()["run_id"] == "r1"

    def declared(path: str, method: str, status: str = "200") -> dict:
        return schema["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
    for path, method, status, name in (("/v1/models", "get", "200", "ModelList"), ("/v1/models", "post", "201", "ModelResponse"),
                                       ("/v1/models/{name}/versions/{version}", "get", "200", "VersionResponse"),
                                       ("/v1/models/{name}:predict", "post", "200", "PredictResponse"),
                                       ("/v1/runs/{run_id}", "put", "200", "RunResponse"),
                                       ("/v1/runs/{run_id}/rounds", "get", "200", "RoundList")):
        assert declared(path, method, status) == {"$ref": f"#/components/schemas/{name}"}, (path, method)
    assert schema["components"]["schemas"]["RunResponse"]["additionalProperties"] is True

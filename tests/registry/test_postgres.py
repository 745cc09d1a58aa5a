"""The registry on a real PostgreSQL server (FEDSSL_REGISTRY_DATABASE_URL): the same API,
parallel uploads numbered without gaps, a restart that loses nothing, inference."""

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import processes as P
from tests.support.postgres import postgres

from .conftest import model_body, upload

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def database_url():
    with postgres() as url:
        yield url


def test_registry_on_postgresql(cluster, tmp_path, weights_blob, database_url):
    data = tmp_path / "data"
    reg = P.start_registry(cluster, data, database_url=database_url)
    assert not (data / "registry.db").exists()  # nothing went to SQLite
    with reg.client() as http:
        assert http.post("/v1/models", json=model_body()).status_code == 201
        assert http.post("/v1/models", json=model_body()).json() == {"error": "model 'clf' already exists"}

    def one(_):
        with reg.client() as h:
            r = upload(h, "clf", weights_blob, {"lineage": {"run_id": "r1", "round": 2}})
            assert r.status_code == 201, r.text
            return r.json()["version"]

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(one, range(4))) == [1, 2, 3, 4]
    with reg.client() as http:
        assert http.put("/v1/models/clf/aliases/production", json={"version": 3}).status_code == 200
        assert http.put("/v1/runs/r1", json={"status": "succeeded"}).status_code in (200, 201)
        before = (http.get("/v1/models").json(), http.get("/v1/models/clf/versions").json(), http.get("/v1/runs/r1").json())
        infer = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 3072}]}
        r = http.post("/v2/models/clf/infer", json=infer)
        assert r.status_code == 200 and r.json()["model_version"] == "3"  # the production alias
    reg.proc.kill(signal.SIGTERM)
    reg.proc.popen.wait(30)

    again = P.start_registry(cluster, data, database_url=database_url)
    with again.client() as http:
        after = (http.get("/v1/models").json(), http.get("/v1/models/clf/versions").json(), http.get("/v1/runs/r1").json())
        assert http.get("/v1/models/clf/versions/4/weights").content == weights_blob
        assert upload(http, "clf", weights_blob).json()["version"] == 5
        assert http.delete("/v1/models/clf/versions/5").status_code == 204
        assert upload(http, "clf", weights_blob).json()["version"] == 6  # a deleted number is never given again
    assert after == before
    assert [v["lineage"] for v in before[1]["versions"]] == [{"run_id": "r1", "round": 2}] * 4


@pytest.mark.parametrize("url,error", [
    ("postgresql+psycopg://fedssl:s3cret@127.0.0.1:1/fedssl",
     "cannot open the database postgresql+psycopg://fedssl:***@127.0.0.1:1/fedssl: connection failed:"),
    ("mysql://fedssl:s3cret@db/fedssl", "cannot open the database mysql://fedssl:***@db/fedssl: No module named 'MySQLdb'"),
    ("not a url", "invalid settings: FEDSSL_REGISTRY_DATABASE_URL is not a database URL; expected e.g. postgresql+psycopg://"),
])
def test_a_wrong_database_url_is_a_clear_start_up_error(tmp_path, url, error):
    r = P.registry_start_refused(tmp_path, token="t", database_url=url)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith(f"fedssl-registry: {error}"), r.stderr[-2000:]
    assert "s3cret" not in r.stderr and "Traceback" not in r.stderr

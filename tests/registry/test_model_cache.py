"""Which model versions stay loaded (issue 17, item 5): switching between more versions than
the cache held reloaded a model on every request (~1.2 s of the one torch thread each), so
one client could make every request slow."""

import re

import pytest

from fedssl_registry.inference.repository import LoadLimit, pinned_versions
from tests.support import processes as P

from .conftest import model_body, upload


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_load_limit_counts_loads_in_any_60_seconds():
    clock = Clock()
    limit = LoadLimit(2, clock)
    assert limit.take("a") is None
    clock.now += 10
    assert limit.take("a") is None
    assert limit.take("b") is None  # per model
    clock.now += 5
    assert limit.take("a") == 45  # the first load leaves the window 45 s from now
    assert limit.take("a") == 45  # a refusal counts nothing
    clock.now += 45
    assert limit.take("a") is None
    assert limit.take("a") == 10
    clock.now += 9.5
    assert limit.take("a") == 1  # whole seconds, never 0


def test_no_load_limit_when_zero():
    limit = LoadLimit(0, Clock())
    assert all(limit.take("a") is None for _ in range(100))


@pytest.mark.parametrize("aliases, latest, pinned", [
    ({}, 5, {5}),
    ({"production": 2}, 5, {2}),
    ({"production": 2, "staging": 4}, 5, {2, 4}),
    ({"staging": 4}, 5, {4, 5}),
    ({}, None, set()),
])
def test_pinned_versions_are_the_alias_targets_and_the_default(aliases, latest, pinned):
    assert pinned_versions({"aliases": aliases, "latest_version": latest}) == pinned


def metric(http, name: str, **labels) -> float:
    text = http.get("/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as prometheus_client writes them
    pattern = rf"^{name}{{{re.escape(want)}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.integration
def test_cycling_through_versions_is_limited_and_never_unloads_the_served_ones(cluster, tmp_path, weights_blob):
    reg = P.start_registry(cluster, tmp_path / "data", model_cache_size="1", model_loads_per_minute="2")
    with reg.client() as http:
        assert http.post("/v1/models", json=model_body()).status_code == 201
        assert [upload(http, "clf", weights_blob).json()["version"] for _ in range(5)] == [1, 2, 3, 4, 5]
        assert http.put("/v1/models/clf/aliases/production", json={"version": 3}).status_code == 200

        def infer(version: int | None):
            path = "/v2/models/clf/infer" if version is None else f"/v2/models/clf/versions/{version}/infer"
            body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 3072}]}
            return http.post(path, json=body)

        assert infer(None).json()["model_version"] == "3"  # pinned: production
        assert infer(1).status_code == 200  # on demand, load 1 of 2
        assert infer(2).status_code == 200  # load 2 of 2; 1 leaves the one-version cache
        refused = infer(1)
        assert refused.status_code == 429
        retry = int(refused.headers["retry-after"])
        assert 1 <= retry <= 60
        assert refused.json() == {"error": (
            f"model 'clf' version 1 is not loaded, and loading it would exceed this model's 2 loads per minute of versions "
            f"no alias points at (FEDSSL_REGISTRY_MODEL_LOADS_PER_MINUTE); retry after {retry} s, or ask for a version kept "
            "loaded (the production alias, else the latest, and other aliases: 3)")}
        ready = http.get("/v2/models/clf/versions/4/ready")
        assert ready.status_code == 429 and "retry-after" in ready.headers
        assert http.post("/v1/models/clf:predict", params={"version": 5},
                         files={"file": ("x.png", b"\x89PNG", "image/png")}).status_code == 429  # before decoding the image

        # What is served stays served and fast: the production version, the cached on-demand one,
        # and a version an alias now points at (pinned, so neither refused nor counted).
        assert infer(None).status_code == 200
        assert infer(2).status_code == 200
        assert http.put("/v1/models/clf/aliases/staging", json={"version": 4}).status_code == 200
        assert infer(4).status_code == 200
        assert infer(2).status_code == 200  # the pinned version 4 did not evict the on-demand 2
        assert metric(http, "fedssl_model_loads_total", model="clf", kind="on_demand") == 2
        assert metric(http, "fedssl_model_loads_total", model="clf", kind="pinned") == 2  # 3 once, 4 once
        assert metric(http, "fedssl_model_loads_refused_total", model="clf") == 3
        assert metric(http, "fedssl_loaded_models") == 3  # 3 and 4 pinned, 2 on demand

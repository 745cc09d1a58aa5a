"""`:predict` on every kind of image (issue 15, item 3): 200 for each readable kind, a 400
naming the problem for the unreadable ones; the model's input spec says what it expects."""

import pytest

from tests.support.image_kinds import kinds

from .conftest import IMAGE_SIZE

KINDS = kinds()


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_predict_answers_every_kind(shared_registry, kind):
    with shared_registry.client() as http:
        r = http.post("/v1/models/clf:predict", files={"file": (kind.filename, kind.data, kind.content_type)})
    if kind.good:
        assert r.status_code == 200, r.text
        assert abs(sum(r.json()["probabilities"].values()) - 1) < 1e-4
    else:
        assert r.status_code == 400, r.text
        assert kind.problem in r.json()["error"], r.text


def test_the_input_spec_says_channels_size_and_normalisation(shared_registry):
    with shared_registry.client() as http:
        spec = http.get("/v1/models/clf").json()["input_spec"]
    assert spec["channels"] == 3 and spec["image_size"] == IMAGE_SIZE
    assert len(spec["mean"]) == len(spec["std"]) == 3

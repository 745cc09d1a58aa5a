"""Inference: KServe v2 with a real v2 client from PyPI (tritonclient), JSON and binary
tensors; multipart image prediction; bad inputs with exact errors."""

import io
import json

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from PIL import Image

from fedssl_core import hospital_batchnorm, label_shift, names, weights
from fedssl_core.models import build_inference_model
from fedssl_core.preprocessing import normalize
from fedssl_flower.data.decode import decode_one

from .conftest import (CLASSES, HOSPITAL_COUNTS, IMAGE_SIZE, classifier_bytes, classifier_with_statistics_bytes,
                       hospital_statistics, model_body, upload)

pytestmark = pytest.mark.integration


def reference(blob: bytes, pixels: np.ndarray) -> np.ndarray:
    model = build_inference_model(names.TASK_CLASSIFICATION, "resnet18", len(CLASSES))
    weights.load_into(model, weights.from_bytes(blob))
    with torch.inference_mode():
        return torch.softmax(model(normalize(torch.from_numpy(pixels))), 1).numpy()


def pixels(n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)


def client(reg):
    return triton.InferenceServerClient(reg.url.removeprefix("http://"))


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infers_uint8_images(shared_registry, weights_blob, binary):
    c = client(shared_registry)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("clf")
    meta = c.get_model_metadata("clf")
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"input": "FP32", "image": "UINT8"}
    x = pixels()
    inp = triton.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=binary)
    res = c.infer("clf", [inp], outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary),
                                         triton.InferRequestedOutput("label", binary_data=binary)])
    probs = res.as_numpy("probabilities")
    np.testing.assert_allclose(probs, reference(weights_blob, x), atol=1e-5)
    assert [s.decode() if isinstance(s, bytes) else s for s in res.as_numpy("label")] == [CLASSES[i] for i in probs.argmax(1)]
    assert res.get_response()["model_version"] == "1"


def test_fp32_json_tensor_and_versioned_route(shared_registry, weights_blob):
    x = pixels(2, seed=1)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                        "data": normalize(torch.from_numpy(x)).numpy().reshape(-1).tolist()}]}
    with shared_registry.client() as http:
        r = http.post("/v2/models/clf/versions/1/infer", json=body)
    assert r.status_code == 200
    out = {o["name"]: o for o in r.json()["outputs"]}
    np.testing.assert_allclose(np.array(out["probabilities"]["data"]).reshape(2, 3), reference(weights_blob, x), atol=1e-5)


def test_a_chunked_binary_request_is_read_whole(shared_registry, weights_blob):
    x = pixels(2, seed=2)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    body = header + x.tobytes()
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]  # no Content-Length: Transfer-Encoding chunked
    with shared_registry.client() as http:
        r = http.post("/v2/models/clf/infer", content=iter(chunks),
                      headers={"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    np.testing.assert_allclose(np.array(out["probabilities"]["data"]).reshape(2, 3), reference(weights_blob, x), atol=1e-5)


def test_predict_uploaded_image(shared_registry, weights_blob, ham10000_dir):
    path = next((ham10000_dir / "HAM10000_images_part_1").glob("*.jpg"))
    with shared_registry.client() as http:
        r = http.post("/v1/models/clf:predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "clf" and body["version"] == 1 and set(body["probabilities"]) == set(CLASSES)
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)


def test_predict_upload_and_v2_uint8_of_the_same_file_agree(shared_registry, weights_blob, ham10000_dir):
    """One real JPEG, two ways in: uploaded to `:predict`, and decoded the hospitals' way and
    sent as v2 UINT8 pixels. Same preprocessing, so the same probabilities, to the bit."""
    path = sorted((ham10000_dir / "HAM10000_images_part_1").glob("*.jpg"))[1]
    x = decode_one(path, IMAGE_SIZE)[None]
    header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    with shared_registry.client() as http:
        predicted = http.post("/v1/models/clf:predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
        inferred = http.post("/v2/models/clf/infer", content=header + x.tobytes(),
                             headers={"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})
    assert predicted.status_code == 200 and inferred.status_code == 200, (predicted.text, inferred.text)
    n = int(inferred.headers["inference-header-content-length"])
    v2 = np.frombuffer(inferred.content[n:], dtype=np.float32)
    upload = np.array([predicted.json()["probabilities"][c] for c in CLASSES], dtype=np.float32)
    assert np.array_equal(upload, v2), (upload, v2)
    np.testing.assert_allclose(v2, reference(weights_blob, x)[0], atol=1e-5)


def test_a_model_registered_with_test_time_augmentation_serves_the_mean_over_the_views(shared_registry, weights_blob,
                                                                                       ham10000_dir):
    """input_spec test_time_augmentation = dihedral: `:predict` and v2 UINT8 of one real JPEG
    both answer the softmax averaged over its 8 flips and 90-degree turns (computed here view by
    view with the plain model), which a turned copy of the image shares, and which differs from
    the plain model's answer."""
    path = sorted((ham10000_dir / "HAM10000_images_part_1").glob("*.jpg"))[2]
    x = decode_one(path, IMAGE_SIZE)[None]
    views = [np.ascontiguousarray(np.rot90(v, k, axes=(-2, -1))) for v in (x, x[..., ::-1]) for k in range(4)]
    expected = np.mean([reference(weights_blob, v)[0] for v in views], axis=0)
    turned = np.ascontiguousarray(np.rot90(x, 1, axes=(-2, -1)))
    with shared_registry.client() as http:
        meta = http.get("/v2/models/clf-tta").json()
        predicted = http.post("/v1/models/clf-tta:predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
        inferred = [http.post("/v2/models/clf-tta/infer", json={"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(a.shape),
                                                                             "data": a.reshape(-1).tolist()}]})
                    for a in (x, turned)]
    assert meta["parameters"]["test_time_augmentation"] == "dihedral", meta
    assert predicted.status_code == 200 and all(r.status_code == 200 for r in inferred), (predicted.text, [r.text for r in inferred])
    upload = np.array([predicted.json()["probabilities"][c] for c in CLASSES], dtype=np.float32)
    v2, v2_turned = (np.array(r.json()["outputs"][0]["data"], dtype=np.float32) for r in inferred)
    np.testing.assert_allclose(upload, expected, atol=1e-5)
    np.testing.assert_allclose(v2, expected, atol=1e-5)
    np.testing.assert_allclose(v2_turned, expected, atol=1e-5)
    assert np.abs(reference(weights_blob, x)[0] - expected).max() > 1e-3  # the views do change the answer


def test_a_named_hospital_is_served_its_own_label_mix_by_predict_and_v2(shared_registry, weights_blob, ham10000_dir):
    """A classifier that carries its hospitals' label counts: `:predict?hospital=` and v2's
    `parameters.hospital` answer the plain probabilities times that hospital's prior over the
    federation's (`fedssl_core.label_shift`), and say which hospital they served."""
    path = sorted((ham10000_dir / "HAM10000_images_part_1").glob("*.jpg"))[3]
    x = decode_one(path, IMAGE_SIZE)[None]
    plain = reference(weights_blob, x)
    ratios = label_shift.ratios(HOSPITAL_COUNTS, len(CLASSES))
    with shared_registry.client() as http:
        as_is = http.post("/v1/models/clf-sites:predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
        served = {h: http.post("/v1/models/clf-sites:predict", params={"hospital": h},
                               files={"file": (path.name, path.read_bytes(), "image/jpeg")}) for h in HOSPITAL_COUNTS}
        v2 = http.post("/v2/models/clf-sites/infer", json={"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(x.shape),
                                                                       "data": x.reshape(-1).tolist()}],
                                                           "parameters": {"hospital": "skinlab"}})
    assert as_is.status_code == 200 and "hospital" not in as_is.json()
    np.testing.assert_allclose([as_is.json()["probabilities"][c] for c in CLASSES], plain[0], atol=1e-5)
    for h, r in served.items():
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["hospital"] == h and body["label"] == max(body["probabilities"], key=body["probabilities"].get)
        np.testing.assert_allclose([body["probabilities"][c] for c in CLASSES], label_shift.adjust(plain, ratios[h])[0], atol=1e-5)
    assert served["dermaclinic"].json()["probabilities"] != served["skinlab"].json()["probabilities"]
    assert v2.status_code == 200, v2.text
    out = {o["name"]: o for o in v2.json()["outputs"]}
    assert v2.json()["parameters"] == {"hospital": "skinlab"}
    np.testing.assert_allclose(out["probabilities"]["data"], label_shift.adjust(plain, ratios["skinlab"])[0], atol=1e-5)
    assert out["label"]["data"] == [served["skinlab"].json()["label"]]


def test_a_named_hospital_is_served_with_its_own_batchnorm_statistics_and_label_mix(shared_registry, weights_blob, ham10000_dir):
    """A classifier that also carries its hospitals' BatchNorm statistics (hospital-batchnorm):
    `:predict?hospital=` and v2's `parameters.hospital` answer the softmax of the model holding
    that hospital's statistics, times its prior over the federation's; a caller naming no
    hospital gets the shared model as it is."""
    path = sorted((ham10000_dir / "HAM10000_images_part_1").glob("*.jpg"))[4]
    x = decode_one(path, IMAGE_SIZE)[None]
    ratios = label_shift.ratios(HOSPITAL_COUNTS, len(CLASSES))
    stats = hospital_statistics()

    def with_statistics(h: str) -> np.ndarray:  # the plain model, its encoder's BatchNorm buffers replaced by hand
        state = {**weights.from_bytes(weights_blob), **stats[h]}
        return reference(weights.to_bytes(state), x)

    with shared_registry.client() as http:
        as_is = http.post("/v1/models/clf-site-bn:predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
        served = {h: http.post("/v1/models/clf-site-bn:predict", params={"hospital": h},
                               files={"file": (path.name, path.read_bytes(), "image/jpeg")}) for h in HOSPITAL_COUNTS}
        v2 = http.post("/v2/models/clf-site-bn/infer", json={"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(x.shape),
                                                                         "data": x.reshape(-1).tolist()}],
                                                             "parameters": {"hospital": "skinlab"}})
    assert as_is.status_code == 200, as_is.text
    np.testing.assert_allclose([as_is.json()["probabilities"][c] for c in CLASSES], reference(weights_blob, x)[0], atol=1e-5)
    for h, r in served.items():
        assert r.status_code == 200, r.text
        got = [r.json()["probabilities"][c] for c in CLASSES]
        np.testing.assert_allclose(got, label_shift.adjust(with_statistics(h), ratios[h])[0], atol=1e-5)
        label_mix_only = label_shift.adjust(reference(weights_blob, x), ratios[h])[0]
        assert np.abs(np.array(got) - label_mix_only).max() > 1e-3  # the statistics do change the answer
    assert v2.status_code == 200 and v2.json()["parameters"] == {"hospital": "skinlab"}, v2.text
    out = {o["name"]: o for o in v2.json()["outputs"]}
    np.testing.assert_allclose(out["probabilities"]["data"], label_shift.adjust(with_statistics("skinlab"), ratios["skinlab"])[0], atol=1e-5)


def test_hospitals_batchnorm_statistics_that_do_not_fit_are_refused_at_upload_naming_why(registry):
    good = hospital_statistics()
    key = next(k for k in good["skinlab"] if k.endswith("running_var"))
    cases = [
        (classifier_with_statistics_bytes({"skinlab": good["skinlab"]}),
         "names hospitals ['skinlab'], but the label counts (fedssl.label_counts) name ['dermaclinic', 'skinlab']"),
        (classifier_with_statistics_bytes({**good, "skinlab": {**good["skinlab"], key: -good["skinlab"][key]}}),
         f"hospital 'skinlab''s {key} has negative variances"),
        (classifier_with_statistics_bytes({**good, "skinlab": {**good["skinlab"], key: good["skinlab"][key][:-1]}}),
         f"hospital 'skinlab''s {key} has shape"),
        (classifier_with_statistics_bytes({**good, "skinlab": {k: v for k, v in good["skinlab"].items() if k != key}}),
         f"hospital 'skinlab''s BatchNorm statistics do not fit the model: missing {key}"),
        (classifier_with_statistics_bytes(**{hospital_batchnorm.META_KEY: "skinlab"}), "fedssl.hospital_batchnorm is not JSON"),
        (classifier_with_statistics_bytes(**{hospital_batchnorm.META_KEY: '["skinlab"]'}),
         "names no hospital of fedssl.hospital_batchnorm"),
    ]
    blob = classifier_with_statistics_bytes()
    cases.append((weights.to_bytes(weights.from_bytes(blob), {k: v for k, v in weights.read_metadata(blob).items()
                                                              if k != hospital_batchnorm.META_KEY}),
                  "but no fedssl.hospital_batchnorm metadata naming their hospitals"))
    with registry.client() as http:
        assert http.post("/v1/models", json=model_body("clf-bad-bn")).status_code == 201
        for blob, error in cases:
            r = upload(http, "clf-bad-bn", blob)
            assert r.status_code == 400 and error in r.text, (error, r.text)
        assert http.get("/v1/models/clf-bad-bn/versions").json()["versions"] == []


@pytest.mark.parametrize(("model", "hospital", "error"), [
    ("clf-sites", "nowhere", "unknown hospital 'nowhere'; model 'clf-sites' version 1 was trained by dermaclinic, skinlab"),
    ("clf", "dermaclinic", "model 'clf' version 1 records no hospitals' label counts"),
    ("clf-sites", 3, "parameters.hospital must be a string"),
])
def test_a_hospital_the_model_cannot_serve_is_a_400_naming_why(shared_registry, model, hospital, error):
    x = pixels(1)
    with shared_registry.client() as http:
        v2 = http.post(f"/v2/models/{model}/infer", json={"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(x.shape),
                                                                      "data": x.reshape(-1).tolist()}],
                                                      "parameters": {"hospital": hospital}})
        predict = (http.post(f"/v1/models/{model}:predict", params={"hospital": hospital}, files={"file": ("a.png", png(8, 8), "image/png")})
                   if isinstance(hospital, str) else None)
    assert v2.status_code == 400 and error in v2.text, v2.text
    if predict is not None:
        assert predict.status_code == 400 and error in predict.text, predict.text


def test_a_classifier_with_bad_label_counts_is_refused_at_upload_naming_the_hospital(registry):
    with registry.client() as http:
        assert http.post("/v1/models", json=model_body("clf-bad-counts")).status_code == 201
        r = upload(http, "clf-bad-counts", classifier_bytes(**{label_shift.META_KEY: '{"dermaclinic": [1, 2]}'}))
    assert r.status_code == 400 and "hospital 'dermaclinic': expected 3 non-negative training image counts" in r.text, r.text


def test_an_unknown_test_time_augmentation_is_refused_naming_the_field(shared_registry):
    with shared_registry.client() as http:
        r = http.post("/v1/models", json=model_body("clf-x", test_time_augmentation="sideways"))
    assert r.status_code == 422, r.text
    assert "test_time_augmentation" in r.text and "dihedral" in r.text, r.text


def png(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


PIXELS = {"name": "image", "datatype": "UINT8", "shape": [1, 3, IMAGE_SIZE, IMAGE_SIZE]}
MALFORMED = [  # (request JSON, bytes after it as binary tensor data or None, the 400's error)
    ({"inputs": [{**PIXELS, "parameters": {"binary_data_size": "abc"}}]}, b"abc",
     "binary_data_size of input 'image' must be an integer, got 'abc'"),
    ({"inputs": [{**PIXELS, "parameters": {"binary_data_size": 5}}]}, b"12345",
     "input 'image' has 5 bytes; shape [1, 3, 32, 32] of UINT8 needs 3072"),
    ({"inputs": [{**PIXELS, "parameters": {"binary_data_size": 3072}}]}, bytes(3080),
     "input 'image' takes 3072 bytes after the JSON header (its binary_data_size), but 3080 follow it"),
    ({"inputs": [{**PIXELS, "data": [0] * 3072}]}, b"xyz",
     "input 'image' has its values in 'data', but 3 bytes follow the JSON header: send them as its binary data "
     "(parameters.binary_data_size) or leave them out"),
    ({"inputs": [{**PIXELS, "data": [0] * 3072, "parameters": "binary_data_size"}]}, None,
     "'parameters' of input 'image' must be an object, got str"),
    ({"inputs": [{**PIXELS, "data": [0] * 3072}], "parameters": [1]}, None,
     "'parameters' of the request must be an object, got list"),
    ({"inputs": [{**PIXELS, "data": [0] * 3072}], "outputs": [{"name": "label", "parameters": [1]}]}, None,
     "'parameters' of output 'label' must be an object, got list"),
    ({"inputs": [{**PIXELS, "data": [0] * 3072}], "outputs": [{"name": ["label"]}]}, None,
     "'outputs' must be a list of objects, each with a name"),
    ({"inputs": [{**PIXELS, "shape": [True, 3, IMAGE_SIZE, IMAGE_SIZE], "data": [0] * 3072}]}, None,
     "input 'image' has shape [True, 3, 32, 32]; expected [N, 3, 32, 32]"),
]


@pytest.mark.parametrize(("request_json", "binary", "error"), MALFORMED)
def test_malformed_v2_structure_is_a_400_naming_the_field(shared_registry, request_json, binary, error):
    header = json.dumps(request_json).encode()
    headers = {"content-type": "application/json"}
    if binary is not None:
        headers = {"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    with shared_registry.client() as http:
        r = http.post("/v2/models/clf/infer", content=header + (binary or b""), headers=headers)
    assert (r.status_code, r.json()) == (400, {"error": error})


@pytest.mark.parametrize("suffix", ["", "/ready"])
def test_v2_version_routes_answer_a_bad_version_like_infer(shared_registry, suffix):
    with shared_registry.client() as http:
        ok = http.get(f"/v2/models/clf/versions/1{suffix}")
        assert ok.status_code == 200 and (ok.json()["versions"] == ["1"] if not suffix else ok.json()["ready"])
        for version, status, error in (("latest", 400, "version must be a positive integer (ASCII digits, at most 2147483647), got 'latest'"),
                                       ("0", 400, "version must be a positive integer (ASCII digits, at most 2147483647), got '0'"),
                                       ("9", 404, "model 'clf' has no version 9")):
            r = http.get(f"/v2/models/clf/versions/{version}{suffix}")
            assert (r.status_code, r.json()) == (status, {"error": error})


@pytest.mark.parametrize("case", ["shape", "dtype", "count", "json", "unknown_model", "unknown_version", "version_not_a_number",
                                  "version_zero", "get_infer", "not_image", "text_type", "bomb", "too_big", "no_alias"])
def test_inference_bad_inputs(shared_registry, case):
    good = {"name": "image", "datatype": "UINT8", "shape": [1, 3, IMAGE_SIZE, IMAGE_SIZE], "data": [0] * (3 * IMAGE_SIZE * IMAGE_SIZE)}
    with shared_registry.client() as http:
        if case == "shape":
            r = http.post("/v2/models/clf/infer", json={"inputs": [{**good, "shape": [1, 3, 64, 64]}]})
            expected = (400, "input 'image' has shape [1, 3, 64, 64]; expected [N, 3, 32, 32]")
        elif case == "dtype":
            r = http.post("/v2/models/clf/infer", json={"inputs": [{**good, "datatype": "FP32"}]})
            expected = (400, "input 'image' must have datatype UINT8, got 'FP32'")
        elif case == "count":
            r = http.post("/v2/models/clf/infer", json={"inputs": [{**good, "data": [0, 1]}]})
            expected = (400, "input 'image' has 2 values; shape [1, 3, 32, 32] needs 3072")
        elif case == "json":
            r = http.post("/v2/models/clf/infer", content=b"{oops", headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"].startswith("request body is not valid JSON")
            return
        elif case == "unknown_model":
            r = http.post("/v2/models/ghost/infer", json={"inputs": [good]})
            expected = (404, "model 'ghost' not found")
        elif case == "unknown_version":
            r = http.post("/v2/models/clf/versions/9/infer", json={"inputs": [good]})
            expected = (404, "model 'clf' has no version 9")
        elif case == "version_not_a_number":
            r = http.post("/v2/models/clf/versions/latest/infer", json={"inputs": [good]})
            expected = (400, "version must be a positive integer (ASCII digits, at most 2147483647), got 'latest'")
        elif case == "version_zero":
            r = http.post("/v2/models/clf/versions/0/infer", json={"inputs": [good]})
            expected = (400, "version must be a positive integer (ASCII digits, at most 2147483647), got '0'")
        elif case == "get_infer":
            r = http.get("/v2/models/clf/infer")
            assert r.headers["allow"] == "POST"
            expected = (405, "Method Not Allowed")
        elif case == "not_image":
            r = http.post("/v1/models/clf:predict", files={"file": ("x.jpg", b"GIF89a....", "image/jpeg")})
            assert r.status_code == 400 and r.json()["error"].startswith("not a decodable JPEG or PNG image")
            return
        elif case == "text_type":
            r = http.post("/v1/models/clf:predict", files={"file": ("x.txt", b"hello", "text/plain")})
            expected = (415, "expected a JPEG or PNG image (image/jpeg, image/png), got text/plain")
        elif case == "bomb":
            r = http.post("/v1/models/clf:predict", files={"file": ("big.png", png(8000, 6000), "image/png")})
            expected = (400, "image is 8000x6000 pixels; at most 40000000 pixels are accepted")
        elif case == "too_big":
            r = http.post("/v1/models/clf:predict", files={"file": ("x.png", b"\x89PNG" + b"0" * (11 * 1024 * 1024), "image/png")})
            expected = (413, "image exceeds 10485760 bytes")
        elif case == "no_alias":
            r = http.post("/v1/models/clf:predict?alias=canary", files={"file": ("x.png", png(40, 40), "image/png")})
            expected = (404, "model 'clf' has no alias 'canary'")
        assert (r.status_code, r.json()) == (expected[0], {"error": expected[1]})


def test_a_request_over_the_batch_cap_is_refused_naming_the_limit(shared_registry, weights_blob):
    """Issue 17, item 4: one v2 request could carry any N (2,048 images took 1 GB and the model
    for 7-15 s). N is capped (FEDSSL_REGISTRY_MAX_INFER_BATCH, 64 by default), the cap is in the
    model metadata, and a request at the cap is still answered, row for row."""
    with shared_registry.client() as http:
        for path in ("/v2/models/clf", "/v2/models/clf/versions/1"):
            assert http.get(path).json()["parameters"]["max_batch_size"] == 64
        for n, status in ((65, 413), (64, 200)):
            x = pixels(n, seed=n)
            header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(x.shape),
                                             "parameters": {"binary_data_size": x.nbytes}}]}).encode()
            r = http.post("/v2/models/clf/infer", content=header + x.tobytes(),
                          headers={"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})
            assert r.status_code == status, r.text
            if status == 413:
                assert r.json() == {"error": "input 'image' has 65 images; at most 64 per request "
                                             "(parameters.max_batch_size in the model's metadata): send them in several requests"}
            else:  # 64 rows, more than a forward takes (max_batch_size 32): split, and reassembled in order
                out = {o["name"]: o for o in r.json()["outputs"]}
                np.testing.assert_allclose(np.array(out["probabilities"]["data"]).reshape(64, 3), reference(weights_blob, x), atol=1e-5)


def test_v2_json_answers_are_their_declared_models_and_the_openapi_schema_names_each_one(shared_registry):
    """Every v2 JSON answer validates against the model its route declares
    (`inference.v2_datamodels`, as KServe's v2_datamodels), the declaration drops nothing the
    answer carried (metadata parameters, a request's id, the hospital served), and the OpenAPI
    schema references each model, the plain-ASGI infer routes' JSON answer included."""
    from fedssl_registry.inference import v2_datamodels as dm

    x = pixels(2)
    with shared_registry.client() as http:
        answers = [(dm.ServerLiveResponse, http.get("/v2/health/live")), (dm.ServerReadyResponse, http.get("/v2/health/ready")),
                   (dm.ServerMetadataResponse, http.get("/v2")), (dm.ModelMetadataResponse, http.get("/v2/models/clf-sites")),
                   (dm.ModelMetadataResponse, http.get("/v2/models/clf/versions/1")),
                   (dm.ModelReadyResponse, http.get("/v2/models/clf/ready")),
                   (dm.ModelReadyResponse, http.get("/v2/models/clf/versions/1/ready")),
                   (dm.InferenceResponse, http.post("/v2/models/clf-sites/infer", json={
                       "id": "req-7", "parameters": {"hospital": "skinlab"},
                       "inputs": [{"name": "image", "datatype": "UINT8", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}))]
        schema = http.get("/openapi.json").json()
    for model, r in answers:
        assert r.status_code == 200, (model.__name__, r.text)
        assert model.model_validate(r.json()).model_dump(exclude_none=True) == r.json(), model.__name__
    meta = answers[3][1].json()
    assert set(meta["parameters"]) == {"task", "architecture", "class_names", "mean", "std", "max_batch_size", "test_time_augmentation"}
    assert meta["versions"] == ["1"] and answers[5][1].json() == {"name": "clf", "version": "1", "ready": True}
    inferred = answers[-1][1].json()
    assert inferred["id"] == "req-7" and inferred["parameters"] == {"hospital": "skinlab"}
    assert [(o["name"], o["shape"]) for o in inferred["outputs"]] == [("probabilities", [2, len(CLASSES)]), ("label", [2])]

    def json_schema(path: str, method: str = "get") -> dict:
        return schema["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
    for path, name in (("/v2/health/live", "ServerLiveResponse"), ("/v2", "ServerMetadataResponse"),
                       ("/v2/models/{name}", "ModelMetadataResponse"), ("/v2/models/{name}/versions/{version}/ready", "ModelReadyResponse")):
        assert json_schema(path) == {"$ref": f"#/components/schemas/{name}"}, path
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        assert json_schema(path, "post") == {"$ref": "#/components/schemas/InferenceResponse"}
    components = schema["components"]["schemas"]
    assert set(components["InferenceResponse"]["required"]) == {"model_name", "model_version", "outputs"}
    assert components["InferenceResponse"]["properties"]["outputs"]["items"] == {"$ref": "#/components/schemas/ResponseOutput"}
    assert set(components["ResponseOutput"]["required"]) == {"name", "datatype", "shape"}

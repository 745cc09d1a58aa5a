"""Issue 16, item 4: a generation model served and shown. A real class-conditional GAN's
generator registered as versions of a `generation` model, then drawn from over real HTTP:
`:generate` (JSON and zip, by version and alias), KServe v2 (`class` with `seed` or
`latent`, JSON and binary tensors through tritonclient), the refusals a client can act on,
the metrics, and the dashboard's gallery in a real headless Chromium.

Every image is compared with what `fedssl_core.generative.sample` gives here, in this process,
for the same weights, classes and seed: serving adds nothing and loses nothing."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import zipfile

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from PIL import Image

from fedssl_core import generative, names, weights
from fedssl_core.models import select_groups
from tests.support import processes as P

from .conftest import model_body, upload

pytestmark = pytest.mark.integration

CLASSES = ["akiec", "bcc", "bkl"]
SIZE, Z_DIM, WIDTH = 32, 16, 8
LIMIT = 8  # FEDSSL_REGISTRY_MAX_GENERATE_COUNT of the test registry
GEN = "gen"


def make_gan(seed: int, num_classes: int = len(CLASSES)) -> generative.ConditionalGAN:
    torch.manual_seed(seed)
    gan = generative.ConditionalGAN(num_classes=num_classes, image_size=SIZE, z_dim=Z_DIM, width=WIDTH)
    with torch.no_grad():  # a few training-mode passes, so BatchNorm's running statistics are not their initial 0 and 1
        for _ in range(2):
            gan.generator(torch.randn(8, Z_DIM), torch.arange(8) % num_classes)
    return gan.eval()


def generator_blob(gan: generative.ConditionalGAN, state: dict | None = None) -> bytes:
    meta = {**generative.generator_meta(gan.spec), "fedssl.task": names.TASK_GENERATION, "fedssl.arch": names.ARCH_CGAN}
    return weights.to_bytes(state if state is not None else select_groups(gan.state_dict(), [names.GROUP_GENERATOR]), meta)


def local(gan: generative.ConditionalGAN, labels, seed: int = 0, latent: np.ndarray | None = None) -> np.ndarray:
    """What serving must answer: `generative.sample` here, channels last."""
    z = None if latent is None else torch.from_numpy(latent)
    return generative.sample(gan.generator, torch.as_tensor(labels), seed, z=z).permute(0, 2, 3, 1).numpy()


def generator_spec(**extra) -> dict:
    return {"image_size": SIZE, "channels": 3, "class_names": CLASSES, "z_dim": Z_DIM, **extra}


def decode(png_bytes: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(png_bytes))
    assert im.format == "PNG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
    return np.asarray(im)


@pytest.fixture(scope="module")
def gans() -> dict[int, generative.ConditionalGAN]:
    return {1: make_gan(0), 2: make_gan(1)}


@pytest.fixture(scope="module")
def reg(tmp_path_factory, gans, weights_blob):
    """Generation model `gen`: v1 (alias staging) and v2 (the default: no production alias),
    each with lineage metrics of its round; classifier `clf` v1."""
    work = tmp_path_factory.mktemp("generate")
    with P.cluster(work) as c:
        r = P.start_registry(c, work / "data", max_generate_count=str(LIMIT))
        with r.client() as http:
            created = http.post("/v1/models", json={"name": GEN, "task": "generation", "input_spec": generator_spec()})
            assert created.status_code == 201, created.text
            assert created.json()["architecture"] == names.ARCH_CGAN  # the default of a generation model
            assert created.json()["input_spec"] == generator_spec()
            for v, gan in gans.items():
                lineage = {"run_id": "gen-run", "phase": names.PHASE_GENERATE, "round": v, "hospitals": ["h1", "h2"],
                           "metrics": {"fid": 90.0 - 10 * v, "precision": 0.2 * v, "recall": 0.1 * v}}
                resp = upload(http, GEN, generator_blob(gan), {"lineage": lineage})
                assert resp.status_code == 201, resp.text
            assert http.put(f"/v1/models/{GEN}/aliases/staging", json={"version": 1}).status_code == 200
            assert http.post("/v1/models", json=model_body()).status_code == 201
            assert upload(http, "clf", weights_blob).status_code == 201
        yield r


def generate(http, body: dict, query: str = "", name: str = GEN):
    return http.post(f"/v1/models/{name}:generate{query}", json=body)


# ---------------------------------------------------------------------- :generate
def test_generate_answers_count_pngs_equal_to_the_generators_own_samples(reg, gans):
    with reg.client() as http:
        r = generate(http, {"class": "bcc", "count": 4, "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert {k: body[k] for k in ("model_name", "model_version", "class", "class_index", "seed")} == {
        "model_name": GEN, "model_version": 2, "class": "bcc", "class_index": 1, "seed": 7}
    assert [im["index"] for im in body["images"]] == [0, 1, 2, 3]
    pixels = np.stack([decode(base64.b64decode(im["png_base64"])) for im in body["images"]])
    assert np.array_equal(pixels, local(gans[2], [1] * 4, seed=7))
    assert len({p.tobytes() for p in pixels}) == 4  # four latents, four images


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_images(reg):
    with reg.client() as http:
        a, b = (generate(http, {"class": "akiec", "count": 3, "seed": 11}).json() for _ in range(2))
        by_index = generate(http, {"class": 0, "count": 3, "seed": 11}).json()
        other = generate(http, {"class": "akiec", "count": 3, "seed": 12}).json()
        default = generate(http, {"class": "akiec", "count": 3}).json()
        zero = generate(http, {"class": "akiec", "count": 3, "seed": 0}).json()
    assert a["images"] == b["images"] == by_index["images"]
    assert by_index["class"] == "akiec" and by_index["class_index"] == 0
    assert all(x["png_base64"] != y["png_base64"] for x, y in zip(a["images"], other["images"]))
    assert default["seed"] == 0 and default["images"] == zero["images"]


def test_zip_format_is_a_zip_of_the_same_pngs(reg):
    with reg.client() as http:
        z = generate(http, {"class": "bkl", "count": 3, "seed": 5, "format": "zip"})
        j = generate(http, {"class": "bkl", "count": 3, "seed": 5}).json()
        again = generate(http, {"class": "bkl", "count": 3, "seed": 5, "format": "zip"})
    assert z.status_code == 200, z.text
    assert z.headers["content-type"] == "application/zip"
    assert z.headers["content-disposition"] == 'attachment; filename="gen-v2-bkl-5.zip"'
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        assert zf.testzip() is None
        assert zf.namelist() == ["bkl-5-0.png", "bkl-5-1.png", "bkl-5-2.png"]
        assert [zf.read(n) for n in zf.namelist()] == [base64.b64decode(im["png_base64"]) for im in j["images"]]
    assert z.content == again.content  # fixed timestamps: the same request, the same file


def test_version_and_alias_routes_serve_that_versions_generator(reg, gans):
    with reg.client() as http:
        v1 = generate(http, {"class": "bcc", "count": 2, "seed": 3}, "?version=1").json()
        staging = generate(http, {"class": "bcc", "count": 2, "seed": 3}, "?alias=staging").json()
        v2 = generate(http, {"class": "bcc", "count": 2, "seed": 3}, "?version=2").json()
        missing = generate(http, {"class": "bcc", "count": 1}, "?alias=production")
        no_version = generate(http, {"class": "bcc", "count": 1}, "?version=9")
    assert v1["model_version"] == staging["model_version"] == 1 and v2["model_version"] == 2
    assert v1["images"] == staging["images"] != v2["images"]
    for body, gan in ((v1, gans[1]), (v2, gans[2])):
        pixels = np.stack([decode(base64.b64decode(im["png_base64"])) for im in body["images"]])
        assert np.array_equal(pixels, local(gan, [1, 1], seed=3))
    assert missing.status_code == 404 and missing.json() == {"error": f"model {GEN!r} has no alias 'production'"}
    assert no_version.status_code == 404 and no_version.json() == {"error": f"model {GEN!r} has no version 9"}


BAD = [  # id, name, body, status, words the error must contain
    ("count over the limit", GEN, {"class": "bcc", "count": LIMIT + 1}, 413,
     [f"count {LIMIT + 1}", f"the {LIMIT} images", "FEDSSL_REGISTRY_MAX_GENERATE_COUNT"]),
    ("count 0", GEN, {"class": "bcc", "count": 0}, 422, ["count", "greater than or equal to 1"]),
    ("no count", GEN, {"class": "bcc"}, 422, ["count", "required"]),
    ("no class", GEN, {"count": 1}, 422, ["class", "required"]),
    ("unknown class", GEN, {"class": "mel", "count": 1}, 400, ["unknown class 'mel'", "0: 'akiec', 1: 'bcc', 2: 'bkl'"]),
    ("class index out of range", GEN, {"class": 3, "count": 1}, 400, ["class index 3", "3 classes", "2: 'bkl'"]),
    ("class a float", GEN, {"class": 1.0, "count": 1}, 422, ["class"]),
    ("negative seed", GEN, {"class": "bcc", "count": 1, "seed": -1}, 422, ["seed", "greater than or equal to 0"]),
    ("seed a string", GEN, {"class": "bcc", "count": 1, "seed": "x"}, 422, ["seed"]),
    ("wrong format", GEN, {"class": "bcc", "count": 1, "format": "png"}, 422, ["format", "'json' or 'zip'"]),
    ("extra field", GEN, {"class": "bcc", "count": 1, "colour": "red"}, 422, ["colour", "Extra inputs are not permitted"]),
    ("on a classifier", "clf", {"class": "bcc", "count": 1}, 400,
     ["model 'clf' is a classification model", ":generate serves generation models", "/v1/models/clf:predict"]),
]


@pytest.mark.parametrize(("name", "body", "status", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_generate_request_is_a_4xx_naming_what_was_wrong(reg, name, body, status, words):
    with reg.client() as http:
        r = generate(http, body, name=name)
    error = r.json()["error"]
    assert r.status_code == status, error
    for word in words:
        assert word in error, error


def test_an_image_to_a_generator_is_refused_naming_generate(reg):
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (90, 90, 90)).save(png, "PNG")
    pixels = {"name": "image", "datatype": "UINT8", "shape": [1, 3, SIZE, SIZE], "data": [0] * (3 * SIZE * SIZE)}
    with reg.client() as http:
        predicted = http.post(f"/v1/models/{GEN}:predict", files={"file": ("x.png", png.getvalue(), "image/png")})
        inferred = http.post(f"/v2/models/{GEN}/infer", json={"inputs": [pixels]})
        class_to_clf = http.post("/v2/models/clf/infer", json={"inputs": [{"name": "class", "datatype": "INT64", "shape": [1], "data": [0]}]})
    assert predicted.status_code == 400
    assert predicted.json()["error"] == (
        f"model {GEN!r} is a generation model, and :predict serves embedding and classification models; use POST "
        f'/v1/models/{GEN}:generate with a JSON body {{"class", "count", "seed"}}, or /v2 infer with input \'class\' (INT64) '
        "and 'seed' or 'latent'")
    assert inferred.status_code == 400
    assert inferred.json()["error"] == (
        f"model {GEN!r} is a generation model: it takes no images (input 'image' is for embedding and classification models); "
        f"its inputs are 'class' (INT64 [N], class indices), and 'seed' (INT64 [1]) or 'latent' (FP32 [N, {Z_DIM}])")
    assert class_to_clf.status_code == 400 and "generation model's inputs" in class_to_clf.json()["error"]


# ---------------------------------------------------------------------- KServe v2
def test_v2_metadata_of_a_generator(reg):
    with reg.client() as http:
        meta = http.get(f"/v2/models/{GEN}").json()
        one = http.get(f"/v2/models/{GEN}/versions/1").json()
    assert meta["versions"] == ["1", "2"] and one["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "class", "datatype": "INT64", "shape": [-1]},
                              {"name": "latent", "datatype": "FP32", "shape": [-1, Z_DIM]},
                              {"name": "seed", "datatype": "INT64", "shape": [1]}]
    assert meta["outputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, SIZE, SIZE, 3]}]
    params = meta["parameters"]
    assert params["task"] == "generation" and params["architecture"] == names.ARCH_CGAN and params["class_names"] == CLASSES
    assert params["z_dim"] == Z_DIM and params["max_batch_size"] == LIMIT and params["optional_inputs"] == ["latent", "seed"]


@pytest.mark.parametrize("binary", [True, False])
def test_v2_infer_class_and_seed_through_tritonclient(reg, gans, binary):
    c = triton.InferenceServerClient(reg.url.removeprefix("http://"))
    assert c.is_model_ready(GEN)
    labels = np.array([0, 2, 1, 2], dtype=np.int64)
    cls = triton.InferInput("class", [4], "INT64")
    cls.set_data_from_numpy(labels, binary_data=binary)
    seed = triton.InferInput("seed", [1], "INT64")
    seed.set_data_from_numpy(np.array([5], dtype=np.int64), binary_data=binary)
    res = c.infer(GEN, [cls, seed], outputs=[triton.InferRequestedOutput("images", binary_data=binary)])
    images = res.as_numpy("images")
    assert images.dtype == np.uint8 and images.shape == (4, SIZE, SIZE, 3)
    assert np.array_equal(images, local(gans[2], labels, seed=5))
    assert res.get_response()["model_version"] == "2"


def test_v2_infer_class_and_latent_and_the_same_as_generate(reg, gans):
    latent = np.random.default_rng(0).standard_normal((3, Z_DIM)).astype(np.float32)
    body = {"inputs": [{"name": "class", "datatype": "INT64", "shape": [3], "data": [2, 0, 1]},
                       {"name": "latent", "datatype": "FP32", "shape": [3, Z_DIM], "data": latent.reshape(-1).tolist()}]}
    with reg.client() as http:
        r = http.post(f"/v2/models/{GEN}/versions/1/infer", json=body)
        seeded = http.post(f"/v2/models/{GEN}/infer", json={"inputs": [
            {"name": "class", "datatype": "INT64", "shape": [3], "data": [1, 1, 1]},
            {"name": "seed", "datatype": "INT64", "shape": [1], "data": [9]}]})
        generated = generate(http, {"class": "bcc", "count": 3, "seed": 9}).json()
    assert r.status_code == 200, r.text
    out = r.json()["outputs"]
    assert [(o["name"], o["datatype"], o["shape"]) for o in out] == [("images", "UINT8", [3, SIZE, SIZE, 3])]
    assert r.json()["model_version"] == "1"
    assert np.array_equal(np.array(out[0]["data"], dtype=np.uint8).reshape(3, SIZE, SIZE, 3), local(gans[1], [2, 0, 1], latent=latent))
    # v2 with a seed and :generate with that seed draw the same images
    v2_images = np.array(seeded.json()["outputs"][0]["data"], dtype=np.uint8).reshape(3, SIZE, SIZE, 3)
    assert np.array_equal(v2_images, np.stack([decode(base64.b64decode(im["png_base64"])) for im in generated["images"]]))


CLASS = {"name": "class", "datatype": "INT64", "shape": [2], "data": [0, 1]}
SEED = {"name": "seed", "datatype": "INT64", "shape": [1], "data": [1]}


def latent(rows: int) -> dict:
    return {"name": "latent", "datatype": "FP32", "shape": [rows, Z_DIM], "data": [0.5] * (rows * Z_DIM)}


V2_BAD = [  # id, inputs, status, the error
    ("latent rows mismatch", [CLASS, latent(3)], 400, "input 'latent' has 3 rows and input 'class' 2: one latent row per image"),
    ("seed and latent", [CLASS, SEED, latent(2)], 400, "give input 'seed' (latents drawn from it) or 'latent' (the latents "
                                                         "themselves), not both"),
    ("no class", [SEED], 400, "input 'class' is missing: a generation model takes 'class' (INT64 [N], class indices), and "
                              f"'seed' (INT64 [1]) or 'latent' (FP32 [N, {Z_DIM}])"),
    ("class out of range", [{**CLASS, "data": [0, 3]}], 400,
     f"input 'class' has index 3; model {GEN!r} draws classes 0..2 (0: 'akiec', 1: 'bcc', 2: 'bkl')"),
    ("class FP32", [{**CLASS, "datatype": "FP32"}], 400, "input 'class' must have datatype INT64, got 'FP32'"),
    ("class fractional", [{**CLASS, "data": [0, 1.5]}], 400, "input 'class' data is not a list of INT64 numbers: found float64 values"),
    ("class 2-d", [{**CLASS, "shape": [2, 1]}], 400, "input 'class' has shape [2, 1]; expected [N]"),
    ("latent wrong width", [CLASS, {**latent(2), "shape": [2, Z_DIM + 1]}], 400,
     f"input 'latent' has shape [2, {Z_DIM + 1}]; expected [N, {Z_DIM}]"),
    ("latent NaN", [CLASS, {**latent(2), "data": [float("nan")] + [0.0] * (2 * Z_DIM - 1)}], 400,
     "input 'latent' contains NaN or infinite values"),
    ("negative seed", [CLASS, {**SEED, "data": [-1]}], 400, "input 'seed' is -1; expected an integer >= 0"),
    ("seed of 2", [CLASS, {**SEED, "shape": [2], "data": [1, 2]}], 400, "input 'seed' has shape [2]; expected [1]"),
    ("class twice", [CLASS, CLASS], 400, "input 'class' appears more than once"),
    ("too many images", [{**CLASS, "shape": [LIMIT + 1], "data": [0] * (LIMIT + 1)}], 413,
     f"input 'class' asks for {LIMIT + 1} images; at most {LIMIT} per request (parameters.max_batch_size in the model's "
     "metadata): send them in several requests"),
    ("unknown input", [CLASS, {**SEED, "name": "noise"}], 400, "unknown input 'noise'; a generation model takes 'class' (INT64 [N], "
                                                               f"class indices), and 'seed' (INT64 [1]) or 'latent' (FP32 [N, {Z_DIM}])"),
]


@pytest.mark.parametrize(("inputs", "status", "error"), [b[1:] for b in V2_BAD], ids=[b[0] for b in V2_BAD])
def test_a_bad_v2_generation_request_is_refused_with_the_reason(reg, inputs, status, error):
    with reg.client() as http:
        # json.dumps writes NaN as the v2 parser (Python's json) reads it, so the finiteness check is reached
        r = http.post(f"/v2/models/{GEN}/infer", content=json.dumps({"inputs": inputs}), headers={"content-type": "application/json"})
    assert (r.status_code, r.json()) == (status, {"error": error})


def test_binary_inputs_must_add_up_to_the_bytes_sent(reg):
    labels = np.array([0, 1], dtype=np.int64)
    header = json.dumps({"inputs": [{**CLASS, "data": None, "parameters": {"binary_data_size": labels.nbytes}}]}).encode()
    with reg.client() as http:
        r = http.post(f"/v2/models/{GEN}/infer", content=header + labels.tobytes() + b"\0" * 8,
                      headers={"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})
    assert (r.status_code, r.json()) == (400, {"error": "the inputs' binary_data_size add up to 16 bytes, but 24 follow the JSON header"})


# ---------------------------------------------------------------------- registration
@pytest.mark.parametrize(("body", "error"), [
    ({"name": "g2", "task": "generation", "input_spec": {"image_size": SIZE, "class_names": CLASSES}},
     "a generation model needs input_spec.z_dim: the length of its generator's latent vectors"),
    ({"name": "g2", "task": "generation", "input_spec": {"image_size": SIZE, "z_dim": Z_DIM}},
     "a generation model needs input_spec.class_names (at least 1): the classes it draws, in the generator's class-index order"),
    ({"name": "g2", "task": "generation", "architecture": "resnet18", "input_spec": generator_spec()},
     "a generation model has architecture 'cgan-sn' (fedssl_core.generative), got 'resnet18'"),
    ({"name": "g2", "task": "generation", "input_spec": generator_spec(image_size=48)},
     "a generation model's input_spec.image_size is one of 32, 64, got 48"),
    ({"name": "g2", "task": "generation", "input_spec": generator_spec(mean=[0.5, 0.5, 0.5])},
     "input_spec.mean: not used by a generation model (it draws pixels and normalises nothing); send image_size, channels, "
     "class_names and z_dim"),
    ({"name": "g2", "task": "embedding", "input_spec": {"image_size": SIZE, "z_dim": Z_DIM}},
     "architecture 'cgan-sn' and input_spec.z_dim are for task 'generation' (a class-conditional image generator), not 'embedding'"),
])
def test_a_generation_model_needs_its_classes_latent_width_and_architecture(reg, body, error):
    with reg.client() as http:
        r = http.post("/v1/models", json=body)
        assert (r.status_code, r.json()) == (400, {"error": error})
        assert http.get("/v1/models/g2").status_code == 404


def test_weights_that_do_not_fit_the_model_are_refused_naming_why(reg, gans):
    four = make_gan(2, num_classes=4)
    whole = generator_blob(gans[1], gans[1].state_dict())  # the discriminator's tensors too
    with reg.client() as http:
        wrong_classes = upload(http, GEN, generator_blob(four))
        with_discriminator = upload(http, GEN, whole)
        assert [v["version"] for v in http.get(f"/v1/models/{GEN}/versions").json()["versions"]] == [1, 2]
    assert wrong_classes.status_code == 400
    assert wrong_classes.json()["error"] == (
        f"weights rejected for {GEN!r} (generation, cgan-sn): the generator in these weights (safetensors metadata) has "
        "num_classes 4 (the model's input_spec: 3); register it under a model whose input_spec has its classes, image size and z_dim")
    assert with_discriminator.status_code == 400
    assert "unexpected keys: discriminator." in with_discriminator.json()["error"]


def test_metadata_that_claims_another_generator_shape_than_its_tensors_is_refused(reg, gans):
    """The generator is built from the file's metadata: a width the tensors do not have (here 512,
    some 100M parameters) is refused by comparing shapes before anything of that size exists."""
    blob = generator_blob(gans[1])
    meta = {**weights.read_metadata(blob), "fedssl.width": "512"}
    with reg.client() as http:
        def versions():
            return [v["version"] for v in http.get(f"/v1/models/{GEN}/versions").json()["versions"]]
        before = versions()
        r = upload(http, GEN, weights.to_bytes(weights.from_bytes(blob), meta))
        assert versions() == before  # nothing registered
    assert r.status_code == 400
    assert "weights do not fit the model: shape mismatch: generator." in r.json()["error"]


CAPPED = """
import resource
from fedssl_core import generative
from fedssl_registry import service
gan = generative.ConditionalGAN(num_classes=3, image_size=32, z_dim=16, width=8)
state = {f"generator.{k}": v for k, v in gan.generator.state_dict().items()}
meta = {**generative.generator_meta(gan.spec), "fedssl.width": "512"}
model = {"input_spec": {"image_size": 32, "class_names": ["a", "b", "c"], "z_dim": 16}}
vm = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmSize"))) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 200 * 2**20, resource.RLIM_INFINITY))  # 200 MB more, as a container limit would
try:
    service.servable_generator(model, state, meta)
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_a_claimed_shape_is_checked_before_a_generator_of_that_size_is_built():
    """Under an address-space cap of 200 MB above what the process holds, the width-512 claim
    (a ~400 MB generator) is refused for its shapes; building it first would fail to allocate."""
    out = subprocess.run([sys.executable, "-c", CAPPED], env=P.base_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("WeightsError weights do not fit the model: shape mismatch: generator."), out.stdout


# ---------------------------------------------------------------------- metrics, docs, dashboard
def test_generated_images_are_counted_and_the_route_is_in_the_openapi_schema(reg):
    with reg.client() as http:
        before = http.get("/metrics").text
        assert generate(http, {"class": "bcc", "count": 2}).status_code == 200
        after = http.get("/metrics").text
        schema = http.get("/openapi.json").json()

    def counted(text: str) -> float:
        line = next((x for x in text.splitlines() if x.startswith(f'fedssl_generated_images_total{{model="{GEN}"}}')), None)
        return float(line.split()[-1]) if line else 0.0

    assert counted(after) - counted(before) == 2
    op = schema["paths"]["/v1/models/{name}:generate"]["post"]
    assert set(op["responses"]) >= {"200", "400", "404", "413", "422"}
    assert "application/zip" in op["responses"]["200"]["content"]
    body_ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert set(schema["components"]["schemas"][body_ref]["properties"]) == {"class", "count", "seed", "format"}


@pytest.mark.browser
def test_dashboard_shows_a_per_class_gallery_and_the_metrics_over_versions(reg, browser, gans):
    resp = httpx.get(reg.url + f"/dashboard/models/{GEN}")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    tab = browser.tab(1280, 900)
    tab.goto(f"{reg.url}/dashboard/models/{GEN}")
    tab.wait_for(f"document.getElementById('gallery')?.dataset.done === '{len(CLASSES)}'", timeout=60)
    assert tab.eval("document.getElementById('gallery').dataset.version") == "2"
    rows = tab.eval("[...document.querySelectorAll('#gallery .gallery-row')].map(r => [r.dataset.class, r.querySelectorAll('img.gallery-img').length])")
    assert rows == [[c, 8] for c in CLASSES], (tab.text("#gallery"), tab.errors)
    # the first image of class 'bkl' is the first of :generate's 8 at seed 0, to the pixel
    src = tab.eval("document.querySelector('#gallery .gallery-row[data-class=\"bkl\"] img').src")
    assert np.array_equal(decode(base64.b64decode(src.removeprefix("data:image/png;base64,"))), local(gans[2], [2] * 8)[0])
    fid = tab.eval("""[...document.querySelectorAll('[data-chart="fid"] circle.pt')].map(c => [c.dataset.x, Number(c.dataset.value)])""")
    assert fid == [["v1", 80.0], ["v2", 70.0]]
    assert tab.eval("[...document.querySelectorAll('.versions-table thead th')].map(th => th.textContent)")[5:8] == ["fid", "precision", "recall"]
    # another seed draws other images; version 1 through its URL
    tab.eval("document.getElementById('gallery-seed').value = '4'; document.getElementById('gallery-draw').click()")
    tab.wait_for(f"document.getElementById('gallery').dataset.seed === '4' && document.getElementById('gallery').dataset.done === '{len(CLASSES)}'")
    tab.goto(f"{reg.url}/dashboard/models/{GEN}?version=1")
    tab.wait_for(f"document.getElementById('gallery')?.dataset.version === '1' && document.getElementById('gallery').dataset.done === '{len(CLASSES)}'")
    assert tab.count("#gallery img.gallery-img") == 8 * len(CLASSES) and tab.count("#gallery .error-text") == 0
    tab.browser.pump(0.2)
    assert tab.errors == [], f"the page logged errors (CSP violation, exception, failed request): {tab.errors}"

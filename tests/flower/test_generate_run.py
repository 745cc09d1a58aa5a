"""Real processes: registry + SuperLink + 2 SuperNodes on real HAM10000 images at 32 px, a
generative run (task=generate): two rounds of the class-conditional GAN, each averaged,
scored at the hospitals (FID, precision/recall, memorisation) and registered; then the
registry draws images from the production generator with POST :generate."""

import base64
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fedssl_core import generative, names
from tests.support import processes as P

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def generative_run(tmp_path_factory, ham10000_dir):
    work = tmp_path_factory.mktemp("generative")
    with P.cluster(work) as c:
        registry = P.start_registry(c, work / "registry")
        _, port = P.start_superlink(c, registry=registry)
        for i in range(2):
            P.start_supernode(c, port, f"node-{i}", P.node_config(
                hospital=f"hospital-{i}", **{"data-path": str(ham10000_dir), "partition-id": i, "num-partitions": 2,
                                             "max-images": 150, "cache-dir": str(work / "cache")}))
        result = P.submit(port, work, "task=generate", "generate-rounds=2", "gan-steps=2", "image-size=32", "batch-size=16",
                          "gan-width=8", "gan-z-dim=16", "gan-eval-samples=24")
        assert result.returncode == 0, result.stdout + result.stderr + c.logs()
        with registry.client() as http:
            state = {
                "models": http.get("/v1/models").json()["models"],
                "versions": http.get(f"/v1/models/{names.GENERATOR_MODEL}/versions").json()["versions"],
                "runs": http.get("/v1/runs").json()["runs"],
                "generated": http.post(f"/v1/models/{names.GENERATOR_MODEL}:generate",
                                       json={"class": "mel", "count": 3, "seed": 7}).json(),
            }
        yield result, work, state | {"registry_url": registry.url}


def test_progress_shows_the_generator_scores(generative_run):
    result, _, _ = generative_run
    assert "2 generative rounds (class-conditional GAN, 32 px, 2 steps per round)" in result.stdout
    joined = [x for x in result.stdout.splitlines() if " joined (node " in x]
    assert len(joined) == 2 and not any("ssl-task" in x for x in joined), joined  # no SSL in a generative run
    for rnd in (1, 2):
        line = next(x for x in result.stdout.splitlines() if f"phase=generate round={rnd}/2 hospitals=2" in x)
        assert "fid=" in line and "fid=n/a" not in line and "precision=" in line and "too_close=" in line


def test_both_networks_are_averaged_and_every_round_is_scored_at_the_hospitals(generative_run):
    _, work, _ = generative_run
    (run_dir,) = (work / "runs").iterdir()
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [(r["phase"], r["round"], r["hospital"]) for r in rows] == [
        ("generate", str(rnd), h) for rnd in ("1", "2") for h in ("aggregated", "hospital-0", "hospital-1")]
    for r in rows:
        assert float(r[names.M_FID]) > 0 and 0 <= float(r[names.M_GEN_PRECISION]) <= 1 and 0 <= float(r[names.M_GEN_RECALL]) <= 1
        assert 0 <= float(r[names.M_TOO_CLOSE]) <= 1 and 0 <= float(r[names.M_TOO_CLOSE_PIXELS]) <= 1
        assert float(r[names.M_MEMORISATION_RATIO]) > 0
        if r["hospital"] != "aggregated":  # the local-only GAN beside it, scored the same way
            assert float(r[names.LOCAL_ONLY_PREFIX + names.M_FID]) > 0
            assert float(r[names.M_GENERATOR_LOSS]) == float(r[names.M_GENERATOR_LOSS])  # finite, not NaN
    # Round 1's global GAN differs from the initial one in both networks: both were averaged.
    after = load_file(run_dir / "weights" / "generate-round-001.safetensors")
    torch.manual_seed(0)
    initial = generative.ConditionalGAN(len(names.HAM10000_CLASSES), 32, z_dim=16, width=8).state_dict()
    assert set(after) == set(initial)
    for group in (names.GROUP_GENERATOR, names.GROUP_DISCRIMINATOR):
        assert any(not torch.equal(after[k], initial[k]) for k in initial if k.startswith(f"{group}.") and k.endswith(("weight", "weight_orig"))), group
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["model"]["arch"] == names.ARCH_CGAN
    # Each hospital extracted its real images' features once for the whole run (held-out and
    # training subsets), kept beside its models, never sent.
    for h in ("hospital-0", "hospital-1"):
        (cache,) = (work / "cache" / "state").glob(f"run-*/{h}/real_features.npz")
        with np.load(cache) as saved:
            assert sorted(k.split("-")[0] for k in saved.files) == ["heldout", "train"]
    assert summary["final_metrics"]["generate"][names.M_FID] > 0


def test_each_round_registers_a_generator_with_lineage(generative_run):
    _, work, state = generative_run
    run_id = next((work / "runs").iterdir()).name
    model = next(m for m in state["models"] if m["name"] == names.GENERATOR_MODEL)
    assert model["task"] == names.TASK_GENERATION and model["architecture"] == names.ARCH_CGAN
    assert model["input_spec"]["image_size"] == 32 and model["input_spec"]["z_dim"] == 16
    assert model["input_spec"]["class_names"] == list(names.HAM10000_CLASSES)
    assert [v["lineage"]["round"] for v in state["versions"]] == [1, 2]
    last = state["versions"][-1]
    assert last["aliases"] == ["production"] and last["lineage"]["run_id"] == run_id and last["lineage"]["phase"] == "generate"
    assert last["lineage"]["metrics"][names.M_FID] > 0 and names.M_TOO_CLOSE in last["lineage"]["metrics"]
    assert last["lineage"]["recipe"]["task"] == "generate" and last["lineage"]["recipe"]["gan-steps"] == 2
    assert last["lineage"]["budget"]["rounds"] == {"generate": 2}
    # No encoder or classifier: a generative run trains neither.
    assert {m["name"] for m in state["models"]} == {names.GENERATOR_MODEL}
    (run,) = state["runs"]
    assert run["status"] == "succeeded" and run["planned_rounds"] == {"generate": 2} and run["phase"] == "generate"


def test_the_registry_draws_the_same_images_the_run_s_generator_does(generative_run):
    _, work, state = generative_run
    out = state["generated"]
    assert out["class"] == "mel" and out["class_index"] == names.HAM10000_CLASSES.index("mel") and out["seed"] == 7
    served = [torch.from_numpy(np.asarray(Image.open(io.BytesIO(base64.b64decode(i["png_base64"])))))
              for i in out["images"]]
    assert len(served) == 3 and all(img.shape == (32, 32, 3) for img in served)
    (run_dir,) = (work / "runs").iterdir()
    gen = generative.Generator(len(names.HAM10000_CLASSES), 32, z_dim=16, width=8)
    generative.load_generator(gen, load_file(run_dir / "weights" / "generate-round-002.safetensors"))
    local = generative.sample(gen.eval(), torch.full((3,), out["class_index"]), seed=7)
    assert torch.equal(torch.stack(served).permute(0, 3, 1, 2), local)


@pytest.mark.browser
def test_the_dashboard_shows_the_run_s_scores_and_a_gallery_of_its_generator(generative_run, browser):
    """The run page charts what the hospitals measured (FID per hospital and aggregated, the
    GAN's losses, global vs local-only generator); the model page draws 8 images per class."""
    _, work, state = generative_run
    (run_dir,) = (work / "runs").iterdir()
    history = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    tab = browser.tab(1280, 860)
    tab.goto(f"{state['registry_url']}/dashboard/runs/{run_dir.name}")
    tab.wait_for("document.querySelector('[data-chart=\"fid\"]') && document.querySelector('[data-chart=\"global_vs_local\"]')")
    fid = tab.eval("""Object.fromEntries([...document.querySelectorAll('[data-chart="fid"] g.series')].map(
        g => [g.dataset.series, [...g.querySelectorAll('circle.pt')].map(c => Number(c.dataset.value))]))""")
    assert fid["aggregated"] == pytest.approx([r["aggregated"][names.M_FID] for r in history])
    assert fid["hospital-0"] == pytest.approx([r["hospitals"]["hospital-0"][names.M_FID] for r in history])
    assert tab.eval("document.querySelectorAll('[data-chart=\"gan_loss\"] g.series').length") == 2
    bars = tab.eval("""[...document.querySelectorAll('[data-chart="global_vs_local"] rect.bar')].map(b => Number(b.dataset.value))""")
    last = history[-1]["hospitals"]
    assert sorted(bars) == pytest.approx(sorted(v for h in last.values() for v in (h[names.M_FID], h[names.LOCAL_ONLY_PREFIX + names.M_FID])))
    tab.goto(f"{state['registry_url']}/dashboard/models/{names.GENERATOR_MODEL}")
    tab.wait_for(f"document.getElementById('gallery')?.dataset.done === '{len(names.HAM10000_CLASSES)}'", timeout=60)
    rows = tab.eval("[...document.querySelectorAll('#gallery .gallery-row')].map(r => [r.dataset.class, r.querySelectorAll('img.gallery-img').length])")
    assert rows == [[c, 8] for c in names.HAM10000_CLASSES]
    assert tab.errors == [], tab.errors

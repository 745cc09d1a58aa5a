"""./deploy-local.sh on the real brain MRI hospitals (one folder per hospital, each naming its
class folders its own way): the layout and the folder -> class map are printed before training,
one SuperNode per hospital folder, and the served classifier speaks the reconciled class names.
The run registers each hospital's own (local-only) classifier (--register-local-models), and
the dashboard, in a real headless Chromium, scores one MRI slice with the global model and
every hospital's own model side by side (screenshots: docs/screenshots/mri-*.png with
FEDSSL_UPDATE_SCREENSHOTS=1)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request

import httpx
import pytest

from fedssl_core import names
from tests.conftest import REPO_ROOT, free_port
from tests.registry import cdp
from tests.test_deploy_local import alive, env_for, pids, script, stop_everything

pytestmark = pytest.mark.integration
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
HOSPITALS = ["aiims-delhi", "nimhans-bengaluru", "tata-memorial-mumbai"]


def test_without_a_label_map_normal_is_refused_before_anything_starts(tmp_path, brain_mri_dir):
    env = env_for(tmp_path / "home", free_port(), free_port())
    r = script(env, "up", "--data", str(brain_mri_dir), "--image-size", "32", timeout=300)
    assert r.returncode != 0
    assert "hospital tata-memorial-mumbai: folder 'Normal' matches no known class" in r.stderr
    assert "nearest: 'notumor'" in r.stderr and "--label-map (e.g. 'tata-memorial-mumbai:Normal=notumor')" in r.stderr
    assert f"--data {brain_mri_dir} cannot be federated as it is" in r.stderr
    assert not (tmp_path / "home" / "pids").exists() or pids(tmp_path / "home") == {}  # nothing started


@pytest.fixture(scope="module")
def mri_run(tmp_path_factory, brain_mri_dir):
    home = tmp_path_factory.mktemp("fedssl-mri")
    env = env_for(home, free_port(), free_port())
    started = time.monotonic()
    up = script(env, "up", "--data", str(brain_mri_dir), "--label-map", "tata-memorial-mumbai:Normal=notumor",
                "--rounds", "1", "--finetune-rounds", "1", "--image-size", "32", "--local-steps", "2",
                "--ssl-tasks", "simclr,rotation", "--max-images", "24", "--round-timeout", "240", "--register-local-models")
    print(f"deploy-local.sh up on the brain MRI hospitals took {time.monotonic() - started:.0f}s")
    try:
        yield home, env, up
    finally:
        stop_everything(env, home)


def test_the_layout_and_the_class_map_are_printed_before_training(mri_run):
    _, _, up = mri_run
    out = up.stdout + up.stderr
    assert up.returncode == 0, out[-6000:]
    assert "data layout: hospital-folders at " in out and "classes: glioma, meningioma, notumor, pituitary" in out
    assert "  nimhans-bengaluru: 'no_tumor' -> 'notumor' (case/separators/generic word)" in out
    assert "  tata-memorial-mumbai: 'Normal' -> 'notumor' (label-map)" in out
    assert re.search(r"aiims-delhi\s+1989\s+727\s+335\s+636\s+291", out)
    assert out.index("data layout:") < out.index("submitting the run")
    for name in HOSPITALS:
        assert f"starting SuperNode {name} (ssl-task=" in out
        assert re.search(rf"hospital {name} joined \(node \d+\): ssl-task=\w+, imagefolder data", out)
    assert "on 3 hospitals (hospital-folders data, at most 24 images each)" in out
    assert re.search(r"phase=finetune round=1/1 hospitals=3 loss=\d", out)


def test_the_served_classifier_has_the_reconciled_classes_and_classifies_an_mri_slice(mri_run, brain_mri_dir):
    home, _, up = mri_run
    assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
    (line,) = [ln.strip() for ln in up.stdout.splitlines() if ln.strip().startswith("curl ") and ":predict" in ln]
    assert str(brain_mri_dir) in line  # a real slice of one of the hospitals
    r = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["model"] == "fedssl-classifier" and list(body["probabilities"]) == CLASSES
    url = (home / "registry.url").read_text().strip() + "/v1/models/fedssl-classifier"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {(home / 'registry.token').read_text().strip()}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert json.load(resp)["input_spec"]["class_names"] == CLASSES


def test_the_run_records_which_folder_became_which_class(mri_run):
    home, _, up = mri_run
    assert up.returncode == 0
    (run_dir,) = (home / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["classes"] == CLASSES
    assert summary["hospitals"]["tata-memorial-mumbai"]["audit"]["label_map"]["Normal"] == "notumor"
    assert summary["hospitals"]["nimhans-bengaluru"]["audit"]["label_map"]["pituitary_tumor"] == "pituitary"
    # The registry's run record says the same, so the dashboard and an auditor see it too.
    url = (home / "registry.url").read_text().strip() + "/v1/runs"
    headers = {"Authorization": f"Bearer {(home / 'registry.token').read_text().strip()}"}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
        (run,) = json.load(resp)["runs"]
    with urllib.request.urlopen(urllib.request.Request(f"{url}/{run['run_id']}", headers=headers), timeout=30) as resp:
        recorded = json.load(resp)["hospitals"]
    assert recorded["tata-memorial-mumbai"]["label_map"]["Normal"] == "notumor"
    assert recorded["aiims-delhi"]["label_map"]
    layout = json.loads((home / "layout.json").read_text())
    assert layout["kind"] == "hospital-folders" and [h["name"] for h in layout["hospitals"]] == HOSPITALS
    running = {name for name, pid in pids(home).items() if alive(pid)}
    assert running == {"registry"}  # the SuperNodes, named after their folders, are stopped too


LOCAL_MODELS = {h: names.LOCAL_MODEL_PREFIX + h for h in HOSPITALS}


def _registry(home) -> httpx.Client:
    return httpx.Client(base_url=(home / "registry.url").read_text().strip(), timeout=60,
                        headers={"Authorization": f"Bearer {(home / 'registry.token').read_text().strip()}"})


def test_each_hospitals_own_model_is_registered_beside_the_global_one(mri_run, brain_mri_dir):
    home, _, up = mri_run
    assert up.returncode == 0
    assert "compare them on one image:" in up.stdout
    slice_ = next((brain_mri_dir / "nimhans-bengaluru" / "glioma_tumor").glob("*.jpg"))
    with _registry(home) as http:
        models = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
        (run,) = http.get("/v1/runs").json()["runs"]
        run = http.get(f"/v1/runs/{run['run_id']}").json()
        last = http.get(f"/v1/runs/{run['run_id']}/rounds").json()["rounds"][-1]
        global_version = models[names.CLASSIFIER_MODEL]["aliases"]["production"]
        assert sorted(m for m in models if m.startswith(names.LOCAL_MODEL_PREFIX)) == sorted(LOCAL_MODELS.values())
        for hospital, name in LOCAL_MODELS.items():
            model = models[name]
            assert model["task"] == "classification" and model["input_spec"]["class_names"] == CLASSES
            (version,) = http.get(f"/v1/models/{name}/versions").json()["versions"]
            lin = version["lineage"]
            assert lin["local_only"] is True and lin["hospital"] == hospital and lin["hospitals"] == [hospital]
            assert lin["run_id"] == run["run_id"] and (lin["phase"], lin["round"]) == ("finetune", 1)
            assert lin["global_model"] == {"name": names.CLASSIFIER_MODEL, "version": global_version}
            # Its scores are the ones its hospital reported for it on its own held-out images.
            mine = last["hospitals"][hospital]
            assert lin["metrics"]["balanced_accuracy"] == pytest.approx(mine[names.LOCAL_ONLY_PREFIX + "balanced_accuracy"])
            assert lin["metrics"]["confusion_matrix"] == mine[names.LOCAL_ONLY_PREFIX + "confusion_matrix"]
            assert version["tags"]["kind"] == "local-only" and version["aliases"] == ["production"]
            assert run["local_models"][hospital] == {"model": name, "version": version["version"],
                                                     "global_model": {"name": names.CLASSIFIER_MODEL, "version": global_version}}
            answer = http.post(f"/v1/models/{name}:predict", files={"file": (slice_.name, slice_.read_bytes(), "image/jpeg")})
            assert answer.status_code == 200, answer.text
            assert list(answer.json()["probabilities"]) == CLASSES
        # The global version and the local ones are different models.
        weights = {http.get(f"/v1/models/{n}/versions").json()["versions"][-1]["sha256"] for n in [names.CLASSIFIER_MODEL, *LOCAL_MODELS.values()]}
        assert len(weights) == 1 + len(HOSPITALS)


def _shoot(tab: cdp.Tab, directory, name: str) -> None:
    tab.browser.pump(0.3)
    path = tab.screenshot(directory / name)
    assert path.stat().st_size > 10_000
    if os.environ.get("FEDSSL_UPDATE_SCREENSHOTS") == "1":
        shutil.copy(path, REPO_ROOT / "docs" / "screenshots" / name)


def test_the_dashboard_scores_one_slice_with_the_global_model_and_every_hospitals_own(mri_run, brain_mri_dir, browser, tmp_path):
    home, _, up = mri_run
    assert up.returncode == 0
    url = (home / "registry.url").read_text().strip()
    slice_ = next((brain_mri_dir / "tata-memorial-mumbai" / "pituitary tumor").glob("*.jpg"))
    with _registry(home) as http:
        (run,) = http.get("/v1/runs").json()["runs"]
    tab = browser.tab(1280, 860)
    tab.goto(f"{url}/dashboard/runs/{run['run_id']}")
    tab.wait_for("document.querySelector('#try-local') && document.querySelectorAll('.local-models li[data-hospital] a').length === 3")
    links = tab.eval("""Object.fromEntries([...document.querySelectorAll('.local-models li[data-hospital]')].map(
        li => [li.dataset.hospital, li.querySelector('a').textContent]))""")
    assert links == {h: f"{LOCAL_MODELS[h]} v1" for h in HOSPITALS}
    assert tab.eval("document.documentElement.scrollWidth - window.innerWidth") <= 0  # nothing sticks out at a laptop width
    # The hospitals page of class-per-folder data: the reconciled classes, per hospital.
    assert tab.eval("[...document.querySelectorAll('.hospitals-table thead th')].map(th => th.textContent)")[6:10] == CLASSES
    _shoot(tab, tmp_path, "mri-run.png")

    tab.goto(url + tab.eval("document.getElementById('try-local').getAttribute('href')"))
    tab.wait_for("document.getElementById('predict')")
    ticked = tab.eval("[...document.querySelectorAll('.pick input:checked')].map(b => b.dataset.model)")
    assert ticked == [names.CLASSIFIER_MODEL, *LOCAL_MODELS.values()]
    tab.set_files("#image-input", [slice_])
    tab.wait_for("!document.getElementById('predict').disabled && document.querySelector('.preview img')")
    tab.click("#predict")
    tab.wait_for("document.querySelector('.results').dataset.done === '4'", timeout=90)
    cards = tab.eval("""[...document.querySelectorAll('.results article.result')].map(a => ({
        model: a.dataset.model, kind: a.dataset.kind, hospital: a.dataset.hospital || null,
        label: a.querySelector('.pred-label')?.dataset.label,
        probs: Object.fromEntries([...a.querySelectorAll('g.prob')].map(g => [g.dataset.class, Number(g.dataset.p)]))}))""")
    assert [(c["model"], c["kind"], c["hospital"]) for c in cards] == [
        (names.CLASSIFIER_MODEL, "global", None), *[(LOCAL_MODELS[h], "local", h) for h in HOSPITALS]]
    with _registry(home) as http:
        for card in cards:
            expected = http.post(f"/v1/models/{card['model']}:predict",
                                 files={"file": (slice_.name, slice_.read_bytes(), "image/jpeg")}).json()
            assert card["label"] == expected["label"] and card["probs"] == pytest.approx(expected["probabilities"], abs=1e-6)
    status = tab.text(".try-status")
    assert status.startswith(f"The global model says {cards[0]['label']};") and all(f"{h}: " in status for h in HOSPITALS)
    _shoot(tab, tmp_path, "mri-try.png")
    assert tab.errors == [], tab.errors

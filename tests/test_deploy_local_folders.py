"""./deploy-local.sh on the real brain MRI hospitals (one folder per hospital, each naming its
class folders its own way): the layout and the folder -> class map are printed before training,
one SuperNode per hospital folder, and the served classifier speaks the reconciled class names."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import free_port
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
                "--ssl-tasks", "simclr,rotation", "--max-images", "24", "--round-timeout", "240")
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

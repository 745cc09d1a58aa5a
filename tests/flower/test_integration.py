"""Real processes: registry + SuperLink + 2 SuperNodes (SimCLR and rotation hospitals), one
SSL round (encoder and SSL heads shared) and one fine-tune round on real HAM10000 images at 32 px."""

import csv
import json

import pytest

from fedssl_core import names
from fedssl_flower.data import load_hospital_data
from tests.support import processes as P

pytestmark = pytest.mark.integration

TASKS = P.FEDERATION_TASKS


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ham10000_dir):
    work = tmp_path_factory.mktemp("federation")
    with P.cluster(work) as c:
        registry = P.start_registry(c, work / "registry")
        _, port = P.start_superlink(c, registry=registry)
        nodes, configs = [], {}
        for i, task in enumerate(TASKS):
            configs[f"hospital-{task}"] = {"hospital": f"hospital-{task}", "ssl-task": task, "data-path": str(ham10000_dir),
                                           "partition-id": i, "num-partitions": 2, "max-images": 150,
                                           "cache-dir": str(work / "cache")}
            nodes.append(P.start_supernode(c, port, f"node-{task}", P.node_config(**configs[f"hospital-{task}"])))
        result = P.submit(port, work, "ssl-rounds=1", "finetune-rounds=1", "image-size=32", "probe-epochs=5", "local-steps=2",
                          "batch-size=32", "share=encoder-and-heads", "hospital-batchnorm=true")
        assert result.returncode == 0, result.stdout + result.stderr + c.logs()
        with registry.client() as http:
            state = {
                "models": http.get("/v1/models").json()["models"],
                "classifier_versions": http.get(f"/v1/models/{names.CLASSIFIER_MODEL}/versions").json()["versions"],
                "encoder_versions": http.get(f"/v1/models/{names.ENCODER_MODEL}/versions").json()["versions"],
                "runs": http.get("/v1/runs").json()["runs"],
            }
            image = next((ham10000_dir / "HAM10000_images_part_1").glob("*.jpg"))
            state["prediction"] = http.post(f"/v1/models/{names.CLASSIFIER_MODEL}:predict",
                                            files={"file": (image.name, image.read_bytes(), "image/jpeg")}).json()
            state["prediction_for_hospital"] = http.post(f"/v1/models/{names.CLASSIFIER_MODEL}:predict",
                                                         params={"hospital": "hospital-simclr"},
                                                         files={"file": (image.name, image.read_bytes(), "image/jpeg")}).json()
            state["classifier_weights"] = http.get(f"/v1/models/{names.CLASSIFIER_MODEL}/versions/1/weights").content
            state["image"] = image
            state["rounds_csv"] = http.get(f"/v1/runs/{state['runs'][0]['run_id']}/rounds.csv").text
            state["rounds"] = http.get(f"/v1/runs/{state['runs'][0]['run_id']}/rounds").json()["rounds"]
            state["served_to"] = {}  # each hospital's held-out split, as v2 answers it when the hospital names itself
            for hospital, config in configs.items():
                data = load_hospital_data(config, 32)
                x = data.test_images.numpy()
                r = http.post(f"/v2/models/{names.CLASSIFIER_MODEL}/infer", json={
                    "inputs": [{"name": "image", "datatype": "UINT8", "shape": list(x.shape), "data": x.reshape(-1).tolist()}],
                    "parameters": {"hospital": hospital}})
                assert r.status_code == 200, r.text
                state["served_to"][hospital] = (data.test_labels.tolist(), next(o["data"] for o in r.json()["outputs"]
                                                                                if o["name"] == "label"))
        state["messages_received"] = [node.text().count("Received successfully") for node in nodes]
        yield result, work, state


def test_progress_is_printed(finished_run):
    result, _, _ = finished_run
    assert "phase=ssl round=1/1 hospitals=2" in result.stdout
    assert "phase=finetune round=1/1 hospitals=2" in result.stdout
    assert "finished: completed" in result.stdout


def test_each_round_is_one_exchange(finished_run):
    """A hospital gets one message per round, which also scores the previous round's global
    model, and one final evaluation: describe + 2 rounds + 1 = 4 messages, not 6."""
    _, work, state = finished_run
    assert state["messages_received"] == [4, 4]
    (run_dir,) = (work / "runs").iterdir()
    history = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["timing"]["evaluated_in"] for r in history] == ["finetune round 1", "a final evaluation"]
    for r in history:  # every round's global model was scored at both hospitals
        assert all(names.M_TEST_EXAMPLES in m and names.M_EXAMPLES in m for m in r["hospitals"].values()), r["hospitals"]


def test_run_folder_has_metrics_weights_and_summary(finished_run):
    _, work, _ = finished_run
    (run_dir,) = (work / "runs").iterdir()
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [(r["phase"], r["round"], r["hospital"]) for r in rows] == [
        ("ssl", "1", "aggregated"), ("ssl", "1", "hospital-rotation"), ("ssl", "1", "hospital-simclr"),
        ("finetune", "1", "aggregated"), ("finetune", "1", "hospital-rotation"), ("finetune", "1", "hospital-simclr")]
    by = {(r["phase"], r["hospital"]): r for r in rows}
    assert float(by[("ssl", "hospital-simclr")]["ssl_loss_simclr"]) > 0
    assert float(by[("ssl", "hospital-rotation")]["ssl_loss_rotation"]) > 0
    for h in ("hospital-rotation", "hospital-simclr"):
        r = by[("finetune", h)]
        assert 0 <= float(r["balanced_accuracy"]) <= 1 and 0 <= float(r["local_only_balanced_accuracy"]) <= 1
    assert int(by[("finetune", "aggregated")]["examples"]) == sum(int(by[("finetune", h)]["examples"]) for h in ("hospital-rotation", "hospital-simclr"))
    assert sorted(p.name for p in (run_dir / "weights").iterdir()) == ["finetune-round-001.safetensors", "ssl-round-001.safetensors"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["classes"] == list(names.HAM10000_CLASSES)
    assert sorted(summary["hospitals"]) == ["hospital-rotation", "hospital-simclr"]
    assert summary["final_metrics"]["finetune"]["confusion_matrix"]


def test_with_share_encoder_and_heads_each_ssl_head_is_averaged_with_the_encoder(finished_run):
    """Each hospital trained its own task's head; the aggregator averaged both heads (the other
    hospital sent each back unchanged), so the SSL round's global model moved in all three."""
    import torch
    from safetensors.torch import load_file

    from fedssl_core.models import FedSSLModel

    _, work, state = finished_run
    (run_dir,) = (work / "runs").iterdir()
    after = load_file(run_dir / "weights" / "ssl-round-001.safetensors")
    torch.manual_seed(0)  # the aggregator's initial model: run config seed 0
    initial = FedSSLModel(names.ARCH_EFFICIENTNET_LITE0, num_classes=len(names.HAM10000_CLASSES), pretrained=True).state_dict()
    for group in (names.GROUP_ENCODER, names.GROUP_PROJECTION_HEAD, names.GROUP_ROTATION_HEAD):
        keys = [k for k in initial if k.startswith(f"{group}.") and initial[k].is_floating_point()]
        assert any(not torch.equal(after[k], initial[k]) for k in keys), group
    assert all(torch.equal(after[k], initial[k]) for k in initial if k.startswith(f"{names.GROUP_CLASSIFIER}."))
    assert state["classifier_versions"][0]["lineage"]["recipe"]["share"] == "encoder-and-heads"


def test_models_are_registered_with_lineage_and_aliases(finished_run):
    _, work, state = finished_run
    run_id = next((work / "runs").iterdir()).name
    by_name = {m["name"]: m for m in state["models"]}
    assert by_name[names.CLASSIFIER_MODEL]["task"] == "classification"
    assert by_name[names.ENCODER_MODEL]["task"] == "embedding"
    (clf,) = state["classifier_versions"]
    assert clf["lineage"]["run_id"] == run_id and clf["lineage"]["phase"] == "finetune" and clf["lineage"]["round"] == 1
    assert clf["lineage"]["hospitals"] == ["hospital-rotation", "hospital-simclr"]
    assert 0 <= clf["lineage"]["metrics"]["balanced_accuracy"] <= 1
    assert clf["aliases"] == ["production"] and clf["synthetic_data"] is False
    # The recipe and budget behind the version, and the temperature it is served at.
    recipe, budget = clf["lineage"]["recipe"], clf["lineage"]["budget"]
    assert recipe["arch"] == names.ARCH_EFFICIENTNET_LITE0 and recipe["pretrained"] is True and recipe["image-size"] == 32
    assert recipe["ssl_tasks"] == {"hospital-rotation": "rotation", "hospital-simclr": "simclr"}
    assert recipe["keep-optimizer-state"] is True and recipe["server-lr"] == 1.0 and recipe["strategy"] == "fedavg"  # the app's defaults
    assert budget["rounds"] == {"ssl": 1, "finetune": 1} and budget["local_steps_per_round"] == recipe["local-steps"] > 0
    cal = clf["lineage"]["calibration"]
    assert cal["temperature"] in names.TEMPERATURE_GRID and cal["applied"] == (cal["temperature"] != 1.0)
    assert 0 <= clf["lineage"]["metrics"]["ece"] <= 1
    assert [v["lineage"]["phase"] for v in state["encoder_versions"]] == ["ssl", "finetune"]
    assert state["encoder_versions"][-1]["aliases"] == ["production"]
    # register-local-models is off by default: no hospital's own model left its hospital.
    assert not [m["name"] for m in state["models"] if m["name"].startswith(names.LOCAL_MODEL_PREFIX)]
    assert "local_models" not in state["runs"][0]


def test_registry_tracked_the_run_and_serves_the_classifier(finished_run):
    _, _, state = finished_run
    (run,) = state["runs"]
    assert run["status"] == "succeeded" and run["rounds_done"] == {"ssl": 1, "finetune": 1}
    assert set(run["hospitals"]) == {"hospital-rotation", "hospital-simclr"}
    assert sum(run["hospitals"]["hospital-simclr"]["class_counts"].values()) == run["hospitals"]["hospital-simclr"]["train_examples"]
    assert state["rounds_csv"].splitlines()[0].startswith("phase,round,hospital,")
    assert len(state["rounds_csv"].splitlines()) == 1 + 6
    pred = state["prediction"]
    assert pred["model"] == names.CLASSIFIER_MODEL and pred["version"] == 1
    assert pred["label"] in names.HAM10000_CLASSES
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_the_classifier_serves_a_named_hospital_its_own_statistics_and_label_mix(finished_run):
    """The registered classifier carries each hospital's training label counts (balanced
    softmax, the default), as its start-up audit counted them, and, with hospital-batchnorm,
    each hospital's BatchNorm statistics of the final encoder over its own images: so
    `:predict?hospital=` answers the softmax of the model normalising with that hospital's
    statistics, times its prior over the federation's."""
    import numpy as np
    import torch

    from fedssl_core import hospital_batchnorm, label_shift, weights
    from fedssl_core.models import build_inference_model
    from fedssl_core.preprocessing import load_image, normalize

    _, _, state = finished_run
    (run,) = state["runs"]
    (clf,) = state["classifier_versions"]
    counts = {h: [run["hospitals"][h]["class_counts"][c] for c in names.HAM10000_CLASSES] for h in run["hospitals"]}
    assert clf["lineage"]["label_counts"] == counts and clf["lineage"]["hospital_batchnorm"] == sorted(counts)
    blob = state["classifier_weights"]
    own, stats = hospital_batchnorm.split(weights.from_bytes(blob), weights.read_metadata(blob))
    assert sorted(stats) == sorted(counts)
    shared = hospital_batchnorm.statistics_of(build_inference_model(names.TASK_CLASSIFICATION, names.ARCH_EFFICIENTNET_LITE0, 7))
    assert set(stats["hospital-simclr"]) == set(shared)
    # each hospital's statistics are its own: they differ from the other's and from the shared model's
    means = [k for k in shared if k.endswith("running_mean")]
    assert any(not torch.allclose(stats["hospital-simclr"][k], stats["hospital-rotation"][k]) for k in means)
    assert any(not torch.allclose(stats["hospital-simclr"][k], own[k]) for k in means)

    model = build_inference_model(names.TASK_CLASSIFICATION, names.ARCH_EFFICIENTNET_LITE0, 7, clf["lineage"]["recipe"]["test-time-augmentation"])
    weights.load_into(model, {**own, **stats["hospital-simclr"]})
    x = normalize(load_image(state["image"].read_bytes(), 32)[None], *names.NORMALIZATION[names.ARCH_EFFICIENTNET_LITE0])
    with torch.inference_mode():
        expected = label_shift.adjust(torch.softmax(model(torch.from_numpy(x)), 1).numpy(),
                                      label_shift.ratios(counts, len(names.HAM10000_CLASSES))["hospital-simclr"])[0]
    pred = state["prediction_for_hospital"]
    assert pred["hospital"] == "hospital-simclr" and pred["version"] == 1
    got = np.array([pred["probabilities"][c] for c in names.HAM10000_CLASSES])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    plain = np.array([[state["prediction"]["probabilities"][c] for c in names.HAM10000_CLASSES]])
    assert not np.allclose(got, plain[0], atol=1e-4)
    assert "every hospital's BatchNorm statistics received (hospital-rotation, hospital-simclr)" in finished_run[0].stdout


def test_the_run_records_the_classifier_scored_as_served_to_each_hospital_that_names_itself(finished_run):
    """hospital-batchnorm: at the final evaluation each hospital scores the classifier as
    `:predict?hospital=` serves it (its own statistics and label mix, at the temperature it is
    served at). Those recorded scores are what the registry's answers to each hospital's own
    held-out images give; the classifier version's lineage carries them too."""
    import numpy as np

    result, _, state = finished_run
    final = [r for r in state["rounds"] if r["phase"] == names.PHASE_FINETUNE][-1]
    (clf,) = state["classifier_versions"]
    totals = np.zeros((7, 7), dtype=np.int64)
    for hospital, (labels, answered) in state["served_to"].items():
        answered = [names.HAM10000_CLASSES.index(label) for label in answered]
        expected = np.zeros((7, 7), dtype=np.int64)
        np.add.at(expected, (labels, answered), 1)
        assert final["hospitals"][hospital][names.M_SERVED_CONFUSION_MATRIX] == expected.tolist(), hospital
        totals += expected
    assert final["aggregated"][names.M_SERVED_CONFUSION_MATRIX] == totals.tolist()
    recall = np.diag(totals)[totals.sum(1) > 0] / totals.sum(1)[totals.sum(1) > 0]
    assert final["aggregated"][names.M_SERVED_BALANCED_ACCURACY] == pytest.approx(recall.mean())
    assert clf["lineage"]["metrics"][names.M_SERVED_BALANCED_ACCURACY] == pytest.approx(recall.mean())
    assert names.M_SERVED_MACRO_AUC in clf["lineage"]["metrics"]
    assert "phase=finetune round=1 as served to each hospital naming itself" in result.stdout
    assert "served_balanced_accuracy" in state["rounds_csv"].splitlines()[0]


def test_a_hospital_without_its_dataset_fails_the_run_with_its_error(tmp_path):
    with P.cluster(tmp_path) as c:
        _, port = P.start_superlink(c)
        for i in range(2):
            P.start_supernode(c, port, f"n{i}", P.node_config(hospital=f"h{i}", **{"data-path": str(tmp_path / "missing")}))
        result = P.submit(port, tmp_path, "ssl-rounds=1", "finetune-rounds=0", "image-size=32", timeout=300)
    assert result.returncode == 1
    assert "hospital(s) failed at start-up" in result.stderr
    assert f"no HAM10000_metadata.csv under {tmp_path / 'missing'}" in result.stderr

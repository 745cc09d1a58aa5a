"""bench/quality.py end to end on a few real HAM10000 images per site: it runs the arms,
scores them on the pooled test, keeps fewer labels when asked, counts the bytes each update
encoding puts on the wire, and appends to its JSON so a long benchmark can run in pieces."""

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT

SMALL = ["--max-images-per-site", "40", "--image-size", "16", "--ssl-rounds", "1", "--finetune-rounds", "2", "--local-steps", "1",
         "--batch-size", "8"]


def bench(tmp_path, ham10000_dir, *args):
    return subprocess.run(
        [sys.executable, "-m", "bench.quality", "--data", str(ham10000_dir), *SMALL, "--cache-dir", str(tmp_path / "cache"),
         "--out", str(tmp_path / "quality.json"), *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )


def test_quality_bench_runs_arms_on_the_four_sites_and_appends(tmp_path, ham10000_dir):
    proc = bench(tmp_path, ham10000_dir, "--arms", "federated,int8,no-ssl@0.5", "--seeds", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "quality.json").read_text())
    sites = result["data"]["sites"]
    assert sorted(sites) == ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]
    assert result["data"]["pooled_test"] == sum(s["test"] for s in sites.values())
    assert all(s["val"] > 0 for s in sites.values())  # validation lesions carved from training
    runs = {r["arm"]: r for r in result["runs"]}
    assert set(runs) == {"federated", "int8", "no-ssl@0.5"}
    fed = runs["federated"]
    assert [c["round"] for c in fed["curve"]] == [1, 2]
    assert 0.0 <= fed["test"]["balanced_accuracy"] <= 1.0
    assert 0.0 <= fed["test"]["ece"] <= 1.0 and fed["test"]["temperature"] > 0
    assert 0.0 <= fed["ssl_probe_val"]["knn_balanced_accuracy"] <= 1.0
    assert [(c["phase"], c["round"]) for c in fed["communication"]] == [("ssl", 1), ("finetune", 1), ("finetune", 2)]
    # no SSL: the SSL rounds' compute goes to fine-tuning (2 x ssl-rounds more rounds), on half the labels
    assert [c["round"] for c in runs["no-ssl@0.5"]["curve"]] == [1, 2, 3, 4]
    assert runs["no-ssl@0.5"]["label_fraction"] == 0.5
    assert runs["no-ssl@0.5"]["labelled_train_images"] < fed["labelled_train_images"]
    s = result["summary"]["test"]
    full, int8 = s["federated"]["bytes_per_hospital_per_round"]["finetune"], s["int8"]["bytes_per_hospital_per_round"]["finetune"]
    assert 0.2 < int8 / full < 0.3
    assert "balanced accuracy" in proc.stdout

    # A second piece, scored on the validation split, is appended next to the first.
    proc = bench(tmp_path, ham10000_dir, "--arms", "probes", "--seeds", "0", "--eval", "val")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "quality.json").read_text())
    assert sorted((r["arm"], r["eval"]) for r in result["runs"]) == [
        ("federated", "test"), ("int8", "test"), ("no-ssl@0.5", "test"), ("probes", "val")]
    probes = next(r for r in result["runs"] if r["arm"] == "probes")
    assert set(probes) >= {"probe_random", "probe_start"}
    assert "probes" in result["summary"]["val"] and "probes" not in result["summary"]["test"]


def test_quality_bench_refuses_unknown_arms_and_fractions(tmp_path):
    for arms, message in (("federated,fedprox", "unknown arm 'fedprox'"), ("federated@1.5", "label fraction")):
        proc = subprocess.run([sys.executable, "-m", "bench.quality", "--arms", arms, "--out", str(tmp_path / "q.json")],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert message in proc.stderr

"""bench/quality.py end to end on a few real HAM10000 images per site: it runs the arms,
scores them on the pooled test and counts the bytes each update encoding puts on the wire."""

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_quality_bench_runs_arms_on_the_four_sites_and_counts_bytes(tmp_path, ham10000_dir):
    out = tmp_path / "quality.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.quality", "--data", str(ham10000_dir), "--arms", "federated,int8,local", "--seeds", "0",
         "--max-images-per-site", "40", "--image-size", "16", "--ssl-rounds", "1", "--finetune-rounds", "2",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert sorted(result["data"]["sites"]) == ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]
    assert result["data"]["pooled_test"] == sum(s["test"] for s in result["data"]["sites"].values())
    runs = {r["arm"]: r for r in result["runs"]}
    assert set(runs) == {"federated", "int8", "local"}
    for arm in ("federated", "int8"):
        assert [c["round"] for c in runs[arm]["curve"]] == [1, 2]
        assert 0.0 <= runs[arm]["test"]["balanced_accuracy"] <= 1.0
        assert [(c["phase"], c["round"]) for c in runs[arm]["communication"]] == [("ssl", 1), ("finetune", 1), ("finetune", 2)]
    assert set(runs["local"]["sites"]) == set(result["data"]["sites"])
    # The whole model goes out in round 1; later rounds carry the shared groups only, and int8
    # carries about a quarter of float32's bytes.
    s = result["summary"]
    full, int8 = s["federated"]["bytes_per_hospital_per_round"]["finetune"], s["int8"]["bytes_per_hospital_per_round"]["finetune"]
    assert 0.2 < int8 / full < 0.3
    assert s["federated"]["bytes_first_round_per_hospital"] > 0
    assert "balanced accuracy" in proc.stdout


def test_quality_bench_refuses_unknown_arms(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.quality", "--arms", "federated,fedprox", "--out", str(tmp_path / "q.json")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unknown arm(s) fedprox" in proc.stderr

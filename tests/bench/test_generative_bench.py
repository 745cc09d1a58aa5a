"""bench/generative.py end to end on a few real HAM10000 images per site: the federated, local and
pooled GANs are trained and scored (FID, precision/recall, memorisation, TSTR), generated grids go
to --figures and figures with real images to --private-figures only, and a rerun of one arm
replaces its own entry in the JSON."""

import json
import math
import subprocess
import sys

from tests.conftest import REPO_ROOT

SMALL = ["--max-images-per-site", "60", "--rounds", "2", "--steps", "2", "--width", "8", "--eval-samples", "32",
         "--curve-samples", "16", "--tstr-per-class", "8", "--score-every", "1"]


def bench(tmp_path, ham10000_dir, *args):
    return subprocess.run(
        [sys.executable, "-m", "bench.generative", "--data", str(ham10000_dir), *SMALL, "--cache-dir", str(tmp_path / "cache"),
         "--out", str(tmp_path / "generative.json"), "--figures", str(tmp_path / "figures"),
         "--private-figures", str(tmp_path / "private"), *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )


def in_unit_interval(x) -> bool:
    return x is not None and 0.0 <= x <= 1.0


def test_generative_bench_scores_every_arm_and_a_rerun_replaces_its_entry(tmp_path, ham10000_dir):
    proc = bench(tmp_path, ham10000_dir, "--arms", "federated,local,pooled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "generative.json").read_text())
    assert sorted(result["data"]["sites"]) == ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]
    runs = {r["arm"]: r for r in result["runs"]}
    assert set(runs) == {"federated", "local", "pooled"}
    for arm, r in runs.items():
        s = r["scores"]
        assert math.isfinite(s["fid"]) and s["fid"] >= 0, arm
        assert all(in_unit_interval(s[k]) for k in ("precision", "recall", "too_close_fraction", "tstr_synthetic", "tstr_real")), arm
        assert r["eval"] == "test" and r["seed"] == 0 and r["command"].startswith("python -m bench.generative")
        assert r["machine"]["torch_threads"] >= 1 and r["seconds"] > 0
        assert r["budget"]["generator_steps_total"] == 2 * 2 * 4
    # the same budget: 4 sites x R x K steps in all, the pooled GAN taking all of them
    assert runs["pooled"]["budget"]["generator_steps_per_model"] == 16
    assert runs["local"]["budget"]["generator_steps_per_model"] == 4
    fed = runs["federated"]
    assert [c["round"] for c in fed["curve"]] == [1, 2] and all(math.isfinite(c["fid"]) for c in fed["curve"])
    assert fed["scores"]["generated_examples"] == fed["scores"]["real_examples"] == 32
    assert set(fed["memorisation"]) >= {"too_close_fraction", "distance_ratio", "too_close_indices", "closest", "figure"}
    assert fed["tstr"]["synthetic"]["training_examples"] == 8 * len(result["data"]["class_names"])
    assert set(fed["augmentation"]["sites"]) == set(result["data"]["sites"])
    for a in fed["augmentation"]["sites"].values():
        assert in_unit_interval(a["real_only"]["balanced_accuracy"]) and in_unit_interval(a["real_plus_synthetic"]["balanced_accuracy"])
    assert set(runs["local"]["sites"]) == set(result["data"]["sites"])
    # generated grids to --figures; anything showing real images only to --private-figures
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    assert "federated-seed0-test-32px-samples.png" in figures and not any("memorisation" in f or "real" in f for f in figures)
    assert (tmp_path / "private" / "real-train-32px.png").is_file()
    assert (tmp_path / "private" / "federated-seed0-test-32px-memorisation.png").is_file()
    assert "FID" in proc.stdout
    pooled_first = next(r for r in result["runs"] if r["arm"] == "pooled")

    # A rerun of one arm replaces its own entry and leaves the others (this one keeps Adam's moments across rounds).
    assert pooled_first["config"]["keep-optimizer-state"] is False
    proc = bench(tmp_path, ham10000_dir, "--arms", "pooled", "--rounds", "1", "--keep-optimizer-state", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "generative.json").read_text())
    assert sorted(r["arm"] for r in result["runs"]) == ["federated", "local", "pooled"]
    pooled = next(r for r in result["runs"] if r["arm"] == "pooled")
    assert pooled["budget"]["rounds"] == 1 and [c["round"] for c in pooled["curve"]] == [1]
    assert pooled["config"]["keep-optimizer-state"] is True and "--keep-optimizer-state true" in pooled["command"]
    assert set(result["summary"]["test"]) == {"federated", "local", "pooled"}


def test_generative_bench_refuses_an_unknown_arm_before_loading_data(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.generative", "--arms", "federated,diffusion", "--out", str(tmp_path / "g.json")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unknown arm 'diffusion'" in proc.stderr
    assert not (tmp_path / "g.json").exists()

"""bench/generative_family.py end to end on a few real HAM10000 images per site, at a tiny budget:
the GAN and the DDPM trained federated (rounds of the 4 sites, each site on its own images, the
site models averaged) and pooled, scored on the pooled validation split, and a rerun replacing only
the entries of its own models, label, seed and number of rounds."""

import json
import math
import subprocess
import sys

from tests.conftest import REPO_ROOT

SMALL = ["--max-images-per-site", "40", "--minutes", "0.01", "--gan-chunk", "2", "--ddpm-base", "8", "--ddim-steps", "2",
         "--eval-samples", "8", "--timing-images", "4", "--ddpm-raw", "false", "--ddpm-cfg2", "false", "--clock", "cpu"]
SITES = ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]


def family(tmp_path, ham10000_dir, *args):
    return subprocess.run(
        [sys.executable, "-m", "bench.generative_family", "--data", str(ham10000_dir), *SMALL,
         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "family.json"), "--figures", str(tmp_path / "figures"), *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )


def test_family_bench_trains_both_models_federated_and_pooled(tmp_path, ham10000_dir):
    proc = family(tmp_path, ham10000_dir, "--models", "gan,ddpm", "--federated-rounds", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "family.json").read_text())
    assert sorted(result["data"]["site_train"]) == SITES
    runs = {r["variant"]: r for r in result["runs"]}
    assert set(runs) == {"gan-fed2", "ddpm-fed2"}
    for name, r in runs.items():
        t = r["training"]
        assert r["federated_rounds"] == 2 and t["rounds"] == 2 and t["sites"] == SITES, name
        # every site trained in every round, and the steps add up
        assert len(t["steps_per_site_round"]) == 2 and all(len(rnd) == 4 and min(rnd) >= 1 for rnd in t["steps_per_site_round"]), name
        assert t["steps"] == sum(map(sum, t["steps_per_site_round"])), name
        s = r["scores"]
        assert math.isfinite(s["fid"]) and s["fid"] >= 0 and 0 <= s["precision"] <= 1 and 0 <= s["recall"] <= 1, name
        assert (tmp_path / "figures" / f"family-{name}.png").is_file()
    assert math.isfinite(runs["ddpm-fed2"]["training"]["mean_loss"])
    assert all(min(rnd) >= 2 for rnd in runs["gan-fed2"]["training"]["steps_per_site_round"])  # a first chunk always runs whole

    # A pooled run of the GAN is another entry: the federated ones stay.
    proc = family(tmp_path, ham10000_dir, "--models", "gan")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "family.json").read_text())
    runs = {r["variant"]: r for r in result["runs"]}
    assert set(runs) == {"gan-fed2", "ddpm-fed2", "gan"}
    assert runs["gan"]["federated_rounds"] == 0 and "steps_per_site_round" not in runs["gan"]["training"]
    assert "--federated-rounds 2" in runs["gan-fed2"]["command"] and "--federated-rounds" not in runs["gan"]["command"]


def test_family_bench_refuses_bad_federation_settings_before_loading_data(tmp_path):
    for args, message in ((["--federated-rounds", "-1"], "--federated-rounds -1"),
                          (["--models", "real", "--federated-rounds", "3"], "the real reference trains nothing")):
        proc = subprocess.run([sys.executable, "-m", "bench.generative_family", *args, "--out", str(tmp_path / "f.json")],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert not (tmp_path / "f.json").exists()


def test_federate_gives_every_site_the_global_model_and_takes_the_example_weighted_average():
    import torch
    from torch import nn

    from bench.generative_family import federate

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    seen = []

    def train_site(local, site, seconds, seed_offset):
        seen.append((site["name"], seed_offset, local[0].bias.detach().clone()))
        with torch.no_grad():
            local[0].bias.fill_(site["value"])
        return {"steps": site["steps"], "train_seconds": 0.0, "train_cpu_seconds": 0.0, "examples": 64 * site["steps"]}

    sites = [{"name": "a", "value": 1.0, "steps": 1}, {"name": "b", "value": 4.0, "steps": 3}]
    rec = federate(model, sites, 2, 8.0, train_site)
    assert torch.allclose(model[0].bias, torch.full((2,), (1.0 * 1 + 4.0 * 3) / 4))
    # round 2 started both sites from round 1's average, with seeds of their own
    assert [s[:2] for s in seen] == [("a", 1000), ("b", 1001), ("a", 2000), ("b", 2001)]
    assert torch.allclose(seen[2][2], torch.full((2,), 3.25)) and torch.allclose(seen[3][2], torch.full((2,), 3.25))
    assert rec["steps"] == 8 and rec["seconds_per_site_round"] == 2.0 and rec["steps_per_site_round"] == [[1, 3], [1, 3]]


def test_train_ddpm_keeps_adam_moments_across_calls_when_asked():
    import torch

    from bench.generative_family import EMA, TinyUNet, train_ddpm

    torch.manual_seed(0)
    model = TinyUNet(3, base=8, attention=False)
    ema = EMA(model)
    images, labels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 3
    kept: dict = {}
    first = train_ddpm(model, ema, images, labels, seconds=0.01, batch_size=4, lr=1e-3, label_dropout=0.1, seed=0,
                       optimizer_state=kept)
    assert float(kept["unet"]["0.step"]) == first["steps"] >= 1
    second = train_ddpm(model, ema, images, labels, seconds=0.01, batch_size=4, lr=1e-3, label_dropout=0.1, seed=1,
                        optimizer_state=kept)
    assert float(kept["unet"]["0.step"]) == first["steps"] + second["steps"]  # Adam went on, it did not restart
    fresh = train_ddpm(model, ema, images, labels, seconds=0.01, batch_size=4, lr=1e-3, label_dropout=0.1, seed=2)
    assert fresh["steps"] >= 1 and float(kept["unet"]["0.step"]) == first["steps"] + second["steps"]

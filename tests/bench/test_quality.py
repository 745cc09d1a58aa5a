"""bench/quality.py end to end on a few real HAM10000 images per site: it runs the arms,
scores them on the pooled test, keeps fewer labels when asked, counts the bytes each update
encoding puts on the wire, and appends to its JSON so a long benchmark can run in pieces."""

import argparse
import copy
import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

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
    proc = bench(tmp_path, ham10000_dir, "--arms", "federated,int8,no-ssl@0.5", "--seeds", "0", "--head-diagnostic", "--fedbn",
                 "--ssl-task", "micle,vidir_molemax=simclr")
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
    # MICLe at the sites whose lesions have several images, SimCLR at vidir_molemax (one image per lesion)
    assert fed["ssl_task"] == {"rosendahl": "micle", "vidir_modern": "micle", "vidir_molemax": "simclr", "vienna_dias": "micle"}
    assert "--ssl-task micle,vidir_molemax=simclr" in fed["command"] and "ssl_task" not in runs["no-ssl@0.5"]
    # the classifier-vs-encoder diagnostic: three classifiers on the frozen final encoder, and the flag in the command
    assert {k: 0.0 <= fed["head_diagnostic"][k]["balanced_accuracy"] <= 1.0 for k in ("oracle_probe", "ccvr", "ccvr_diagonal")} == {
        "oracle_probe": True, "ccvr": True, "ccvr_diagonal": True}
    assert "--head-diagnostic" in fed["command"] and "head diagnostic: oracle probe" in proc.stdout
    # FedBN: the encoder's BatchNorm layers (5 entries each) stayed at the hospitals; personalised models scored every round
    assert fed["fedbn"]["batchnorm_keys"] > 0 and fed["fedbn"]["batchnorm_keys"] % 5 == 0
    assert all(0.0 <= c["personalised"]["balanced_accuracy"] <= 1.0 for c in fed["curve"])
    assert 0.0 <= fed["fedbn"]["bn_recomputed"]["balanced_accuracy"] <= 1.0 and "--fedbn" in fed["command"]
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


def test_quality_bench_linear_fine_tuning_sends_only_the_classifier(tmp_path, ham10000_dir):
    """`--finetune-mode linear`: after the SSL round, fine-tuning rounds train and share the
    classifier alone on the frozen encoder (1,280 x 7 weights and 7 biases, a few kB a round),
    and the run records the mode and its learning rate."""
    proc = bench(tmp_path, ham10000_dir, "--arms", "federated@0.5", "--seeds", "0", "--eval", "val", "--arch", "efficientnet_lite0",
                 "--pretrained", "true", "--finetune-mode", "linear", "--probe-lr", "0.02")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads((tmp_path / "quality.json").read_text())["runs"]
    assert run["config"]["finetune-mode"] == "linear" and run["config"]["probe-lr"] == 0.02
    assert "--finetune-mode linear" in run["command"] and "--probe-lr 0.02" in run["command"]
    sent = {(c["phase"], c["round"]): {h["train_sent"] for h in c["hospitals"].values()} for c in run["communication"]}
    assert list(sent) == [("ssl", 1), ("finetune", 1), ("finetune", 2)]
    (ssl,), (ft1,), (ft2,) = sent.values()
    assert ft1 == ft2 and 4 * (1280 * 7 + 7) <= ft1 < 4 * (1280 * 7 + 7) + 4096 < ssl / 100  # float32 weights and a header
    assert [c["round"] for c in run["curve"]] == [1, 2] and 0.0 <= run["test"]["balanced_accuracy"] <= 1.0


def test_quality_bench_refuses_unknown_arms_and_fractions(tmp_path):
    for arms, message in (("federated,fedprox", "unknown arm 'fedprox'"), ("federated@1.5", "label fraction")):
        proc = subprocess.run([sys.executable, "-m", "bench.quality", "--arms", arms, "--out", str(tmp_path / "q.json")],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert message in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--dp-target-epsilon", "3"], "--dp-target-epsilon needs --dp central-fixed or central-adaptive"),
    (["--ssl-task", "micle,vidir_molemax=byol"], "--ssl-task 'micle,vidir_molemax=byol': vidir_molemax=byol: expected one of "
                                                 "simclr, rotation, micle"),
    (["--ssl-task", "micle,simclr"], "'simclr': expected SITE=TASK after the first task"),
    (["--dp", "central-fixed", "--dp-target-epsilon", "3", "--arms", "federated,no-ssl", "--ssl-rounds", "1"],
     "run different numbers of rounds ([5, 6])"),
])
def test_quality_bench_refuses_a_target_epsilon_it_cannot_apply(tmp_path, monkeypatch, args, message):
    """--dp-target-epsilon sets the noise multiplier of a central DP run for the arm's rounds:
    without central DP, or for arms of different lengths, it says why before loading data."""
    from bench import quality

    monkeypatch.setattr(sys, "argv", ["quality", *args, "--out", str(tmp_path / "q.json")])
    with pytest.raises(SystemExit, match=re.escape(message)):
        quality.main()


def _hospital_folders(root, per_class=10):
    """Two hospitals naming their classes their own way; one writes grayscale PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    tree = {"general-a": {"glioma": "RGB", "notumor": "RGB"}, "clinic-b": {"Glioma": "L", "Normal": "L"}}
    for hospital, folders in tree.items():
        for folder, mode in folders.items():
            (root / hospital / folder).mkdir(parents=True)
            for i in range(per_class):
                shape = (24, 24, 3) if mode == "RGB" else (24, 24)
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(
                    root / hospital / folder / f"{i}.{'jpg' if mode == 'RGB' else 'png'}")
    return root


def test_hospital_folders_are_the_hospitals_split_at_random_by_class(tmp_path):
    from bench import quality

    data = _hospital_folders(tmp_path / "mri")
    args = argparse.Namespace(data=data, label_map="clinic-b:Normal=notumor", class_names="", max_images_per_site=0,
                              image_size=16, cache_dir=tmp_path / "cache")
    sites = quality.load_sites(args)
    assert [s.hospital for s in sites] == ["clinic-b", "general-a"]
    assert all(s.class_names == ["glioma", "notumor"] for s in sites)
    assert sites[0].audit["layout"]["label_map"]["Normal"] == {"class": "notumor", "how": "label-map"}
    for site in sites:
        train, val = quality.carve_validation(site, 0.15)
        assert len(train.train_labels) + len(val.test_labels) + len(site.test_labels) == 20
        for split in (train.train_labels, val.test_labels, site.test_labels):  # stratified: both classes everywhere
            assert sorted(split.unique().tolist()) == [0, 1]
        images = [x.numpy().tobytes() for split in (train.train_images, val.test_images, site.test_images) for x in split]
        assert len(set(images)) == 20  # every image in exactly one split
    again = quality.load_sites(args)  # one split, whatever the run's seed
    assert all(torch.equal(a.test_images, b.test_images) for a, b in zip(sites, again))


def test_quality_bench_runs_on_hospital_folders(tmp_path):
    data = _hospital_folders(tmp_path / "mri")
    run = [sys.executable, "-m", "bench.quality", "--data", str(data), "--image-size", "16", "--ssl-rounds", "0",
           "--finetune-rounds", "1", "--local-steps", "1", "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"),
           "--out", str(tmp_path / "q.json"), "--arms", "local,no-ssl", "--seeds", "0"]
    proc = subprocess.run(run, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0  # 'Normal' matches no class: named, with the fix
    assert "clinic-b: folder 'Normal'" in proc.stderr and "--label-map" in proc.stderr

    proc = subprocess.run([*run, "--label-map", "clinic-b:Normal=notumor"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hospital-folders" in proc.stdout
    result = json.loads((tmp_path / "q.json").read_text())
    sites = result["data"]["sites"]
    assert sorted(sites) == ["clinic-b", "general-a"]
    assert result["data"]["class_names"] == ["glioma", "notumor"]
    assert result["data"]["pooled_test"] == sum(s["test"] for s in sites.values())
    assert sites["clinic-b"]["class_counts"]["test"] == {"glioma": 2, "notumor": 2}
    local = next(r for r in result["runs"] if r["arm"] == "local")
    assert sorted(local["sites"]) == ["clinic-b", "general-a"]  # each hospital alone, scored on the pooled test
    assert "--label-map clinic-b:Normal=notumor" in local["command"] and f"--data {data}" in local["command"]



def test_quality_bench_aggregates_by_a_strategy_with_one_hospital_attacking(tmp_path, ham10000_dir):
    """--strategy goes through the product's Aggregation, --attack through the ClientApp's
    `misbehave`: the attacker's update arrives 100 times the size of the others' (one AdamW
    step moves every hospital about equally), and fedmedian's global model moves no further
    than the honest ones."""
    proc = bench(tmp_path, ham10000_dir, "--arms", "no-ssl", "--seeds", "0", "--strategy", "fedmedian",
                 "--attack", "scale:100", "--attacker", "vidir_modern")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads((tmp_path / "quality.json").read_text())["runs"]
    assert run["strategy"] == {"name": "fedmedian"}
    assert run["attack"] == {"spec": "scale:100", "hospital": "vidir_modern"}
    assert "--strategy fedmedian" in run["command"] and "--attack scale:100 --attacker vidir_modern" in run["command"]
    assert "no-ssl [fedmedian, attack scale:100 by vidir_modern]" in proc.stdout  # apart from a clean FedAvg run
    for rnd in run["communication"]:
        norms = rnd["update_norms"]["hospitals"]
        honest = [v for h, v in norms.items() if h != "vidir_modern"]
        assert 90 < norms["vidir_modern"] / max(honest) < 110, norms
        assert rnd["update_norms"]["global"] <= np.sqrt(sum(v * v for v in honest)), rnd["update_norms"]


@pytest.mark.parametrize("args, message", [
    (["--attack", "scale:x", "--attacker", "vidir_modern"], "--attack='scale:x': the factor after 'scale:' must be a finite number"),
    (["--attack", "sign-flip"], "--attack sign-flip needs --attacker HOSPITAL"),
    (["--attacker", "rosendahl"], "--attacker rosendahl needs --attack SPEC"),
    (["--attack", "sign-flip", "--attacker", "nobody"], "--attacker 'nobody' is not one of the hospitals: rosendahl, vidir_modern, "),
    (["--strategy", "fedmedian", "--proximal-mu", "0.1"], "proximal-mu=0.1 acts with strategy=fedprox only, not strategy=fedmedian"),
    (["--moon-mu", "-1"], "--moon-mu must be >= 0 and --moon-temperature > 0 (got -1.0, 0.5)"),
    (["--moon-mu", "1", "--moon-temperature", "0"], "--moon-mu must be >= 0 and --moon-temperature > 0 (got 1.0, 0.0)"),
    (["--joint-ssl-weight", "-1"], "--joint-ssl-weight must be >= 0 and --joint-ssl-batch >= 2 (got -1.0, 32)"),
    (["--joint-ssl-weight", "1", "--joint-ssl-batch", "1"], "--joint-ssl-weight must be >= 0 and --joint-ssl-batch >= 2 (got 1.0, 1)"),
    (["--pseudo-label-weight", "1", "--pseudo-label-threshold", "1.5"],
     "--pseudo-label-weight must be >= 0, --pseudo-label-batch >= 1 and --pseudo-label-threshold in (0, 1] (got 1.0, 32, 1.5)"),
    (["--pseudo-label-weight", "1", "--joint-ssl-weight", "1"],
     "--pseudo-label-weight and --joint-ssl-weight: one term on the unlabelled images at a time"),
])
def test_quality_bench_refuses_bad_attacks_and_strategy_parameters(tmp_path, ham10000_dir, monkeypatch, args, message):
    from bench import quality

    monkeypatch.setattr(sys, "argv", ["bench.quality", "--data", str(ham10000_dir), *SMALL, "--cache-dir", str(tmp_path / "cache"),
                                      "--out", str(tmp_path / "q.json"), "--arms", "no-ssl", "--seeds", "0", *args])
    with pytest.raises(SystemExit) as stop:
        quality.main()
    assert message in str(stop.value)
    assert not (tmp_path / "q.json").exists()


def _two_tiny_sites():
    """Two sites of 12 random 16 px images in 3 classes whose brightness differs (what FedBN is for),
    and a run config that fine-tunes everything for 2 rounds of one step."""
    from fedssl_core import names
    from fedssl_flower.config import RunConfig
    from fedssl_flower.data import HospitalData

    g = torch.Generator().manual_seed(0)

    def site(name, shift):
        images = (torch.rand(12, 3, 16, 16, generator=g) * 120 + shift).to(torch.uint8)
        labels = torch.arange(12) % 3
        return HospitalData(hospital=name, class_names=["a", "b", "c"], train_images=images, train_labels=labels,
                            test_images=images[:6], test_labels=labels[:6], train_groups=[f"{name}{i}" for i in range(12)])

    cfg = RunConfig(arch="efficientnet_lite0", pretrained=False, image_size=16, batch_size=4, local_steps=1, ssl_rounds=0,
                    finetune_rounds=2, local_baseline=False, finetune_mode=names.FINETUNE_FULL)
    return [site("dark", 0), site("bright", 130)], cfg


def _global_states(monkeypatch, quality) -> list[dict]:
    """The global model's state each time bench.quality scores it (after every fine-tuning round)."""
    states, real_scores = [], quality.scores

    def spy(model, *args, **kwargs):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_scores(model, *args, **kwargs)

    monkeypatch.setattr(quality, "scores", spy)
    return states


def test_fixed_head_trains_only_the_encoder(monkeypatch):
    """--fixed-head (FedBABU): the classifier the federation serves is its random start; the encoder learned."""
    from bench import quality
    from fedssl_core import names

    sites, cfg = _two_tiny_sites()
    start = quality.fresh_model(dataclasses.replace(cfg, seed=0), 3).state_dict()
    states = _global_states(monkeypatch, quality)
    pooled = quality.pooled_data(sites)
    out = quality.federate(sites, sites, pooled, pooled, cfg, names.SSL_SIMCLR, fixed_head=True)
    final = states[-1]
    assert [c["round"] for c in out["curve"]] == [1, 2]
    assert torch.allclose(final["classifier.weight"], start["classifier.weight"], atol=1e-6)
    assert torch.allclose(final["classifier.bias"], start["classifier.bias"], atol=1e-6)
    assert not torch.allclose(final["encoder.conv_stem.weight"], start["encoder.conv_stem.weight"])


def test_fedbn_hospitals_keep_their_batchnorm_layers_and_load_everything_else(monkeypatch):
    """--fedbn: from its second round on a hospital starts from the global model except its own
    encoder BatchNorm layers; the aggregator still averages those into the global model."""
    from bench import quality
    from fedssl_core import names
    from fedssl_flower import local, training

    sites, cfg = _two_tiny_sites()
    starts = []  # (round, hospital, its state as training starts)
    real_train_round = local.train_round

    def spy(model, data, task, phase, cfg, seed, rnd=1, *args, **kwargs):
        starts.append((rnd, data.hospital, {k: v.clone() for k, v in model.state_dict().items()}))
        return real_train_round(model, data, task, phase, cfg, seed, rnd, *args, **kwargs)

    monkeypatch.setattr(quality.local, "train_round", spy)
    globals_after = _global_states(monkeypatch, quality)
    pooled = quality.pooled_data(sites)
    out = quality.federate(sites, sites, pooled, pooled, cfg, names.SSL_SIMCLR, fedbn=sites)

    bn = {k for k in starts[0][2] if k.rpartition(".")[0] in training.encoder_batchnorms(quality.fresh_model(cfg, 3))}
    assert bn and out["fedbn"]["batchnorm_keys"] == len(bn)
    round1_global = globals_after[0]
    for rnd, hospital, state in starts:
        if rnd == 1:
            continue
        mine = next(s for r, h, s in reversed(starts) if h == hospital and r == 1)
        others = [k for k in state if k not in bn and state[k].is_floating_point()]
        # everything but BatchNorm is round 1's global model ...
        assert all(torch.equal(state[k], round1_global[k]) for k in others)
        # ... and the BatchNorm layers are the hospital's own (moved by its round-1 training), not the global average
        moved = [k for k in bn if k.endswith("running_mean") and not torch.equal(state[k], round1_global[k])]
        assert len(moved) == len([k for k in bn if k.endswith("running_mean")]), hospital
        assert not all(torch.equal(state[k], mine[k]) for k in bn if k.endswith("running_mean"))  # trained since its start


def test_bn_diagnostic_scores_every_round_with_statistics_recomputed_over_every_sites_images(monkeypatch):
    """--bn-diagnostic: each fine-tuning round is also scored with BatchNorm statistics
    recomputed over the pooled training images, built once for the run."""
    from bench import quality
    from fedssl_core import names

    sites, cfg = _two_tiny_sites()
    pooled = quality.pooled_data(sites)
    built, real_pooled = [], quality.pooled_data
    monkeypatch.setattr(quality, "pooled_data", lambda s, *a: built.append(len(s)) or real_pooled(s, *a))
    out = quality.federate(sites, sites, pooled, pooled, cfg, names.SSL_SIMCLR, bn_diagnostic=True)
    assert [c["round"] for c in out["curve"]] == [1, 2]
    assert all(0.0 <= c["bn_recomputed"]["balanced_accuracy"] <= 1.0 for c in out["curve"])
    assert built == [2]  # the pooled images once, not once a round


def test_moon_contrasts_each_hospital_with_its_own_previous_local_encoder_from_round_two(monkeypatch):
    """--moon-mu: round 1 trains without the term (no previous local model yet); from round 2 on a
    hospital's term holds the round's global encoder and its own encoder as its last round left it."""
    from bench import quality
    from fedssl_core import names
    from fedssl_flower import local

    sites, cfg = _two_tiny_sites()
    cfg = dataclasses.replace(cfg, finetune_rounds=3)
    seen, ended = [], {}  # (round, hospital, contrast or None, its encoder state as training starts); each hospital's last trained encoder
    real_train_round = local.train_round

    def spy(model, data, task, phase, cfg, seed, rnd=1, *args, **kwargs):
        contrast = kwargs.get("contrast")
        seen.append((rnd, data.hospital, contrast, {k: v.clone() for k, v in model.encoder.state_dict().items()},
                     ended.get(data.hospital)))
        out = real_train_round(model, data, task, phase, cfg, seed, rnd, *args, **kwargs)
        ended[data.hospital] = {k: v.clone() for k, v in model.encoder.state_dict().items()}
        return out

    monkeypatch.setattr(quality.local, "train_round", spy)
    pooled = quality.pooled_data(sites)
    out = quality.federate(sites, sites, pooled, pooled, cfg, names.SSL_SIMCLR, moon=(1.0, 0.5))
    assert [c["round"] for c in out["curve"]] == [1, 2, 3]
    assert [(r, c is None) for r, _, c, _, _ in seen] == [(1, True), (1, True), (2, False), (2, False), (3, False), (3, False)]
    for rnd, hospital, contrast, start, last in seen[2:]:
        assert contrast.mu == 1.0 and contrast.temperature == 0.5
        anchor, previous = contrast.global_encoder.state_dict(), contrast.previous_encoder.state_dict()
        assert all(torch.equal(anchor[k], start[k]) for k in start)  # the global encoder this round started from
        assert all(torch.equal(previous[k], last[k]) for k in last)  # the hospital's own, as its last round ended
        assert not all(torch.equal(previous[k], start[k]) for k in start if start[k].is_floating_point())


def test_shuffle_sites_deals_the_same_images_out_at_random_keeping_each_sites_size():
    """--shuffle-sites (the IID diagnostic): every training image and its label land at exactly one
    site, each site keeps its size and its held-out split, and a site that held one class only
    now holds a mix."""
    from bench import quality
    from fedssl_flower.data import HospitalData

    def site(name, n, label):
        images = torch.arange(n * 3 * 2 * 2, dtype=torch.int64).reshape(n, 3, 2, 2) + 1000 * label
        return HospitalData(hospital=name, class_names=["a", "b"], train_images=images, train_labels=torch.full((n,), label),
                            test_images=images[:2], test_labels=torch.full((2,), label), train_groups=[f"{name}{i}" for i in range(n)])

    sites = [site("only-a", 30, 0), site("only-b", 10, 1)]
    shuffled = quality.shuffle_sites(sites)
    assert [s.hospital for s in shuffled] == ["only-a", "only-b"] and [len(s.train_labels) for s in shuffled] == [30, 10]
    assert all(torch.equal(s.test_images, t.test_images) for s, t in zip(shuffled, sites))
    before = sorted((tuple(x.flatten().tolist()), int(y), g) for s in sites for x, y, g in zip(s.train_images, s.train_labels, s.train_groups))
    after = sorted((tuple(x.flatten().tolist()), int(y), g) for s in shuffled for x, y, g in zip(s.train_images, s.train_labels, s.train_groups))
    assert after == before  # the same (image, label, lesion) triples, none lost or doubled
    assert set(shuffled[1].train_labels.tolist()) == {0, 1}  # the one-class site is mixed now
    assert all(torch.equal(a.train_labels, b.train_labels) for a, b in zip(shuffled, quality.shuffle_sites(sites)))  # seeded


def test_joint_ssl_draws_each_hospitals_term_from_all_its_images_while_fine_tuning_sees_its_labelled_ones(monkeypatch):
    """--joint-ssl-weight (S4L): every fine-tuning round of every hospital gets a `training.Joint`
    of its own SSL task (per site) over its whole training pool, while the supervised batches
    come from its labelled images only; without the flag no term is passed."""
    from bench import quality
    from fedssl_core import names
    from fedssl_flower import local

    sites, cfg = _two_tiny_sites()
    labelled = [dataclasses.replace(s, train_images=s.train_images[:6], train_labels=s.train_labels[:6],
                                    train_groups=s.train_groups[:6]) for s in sites]
    seen = []  # (round, hospital, labelled images trained on, the joint term or None)
    real_train_round = local.train_round

    def spy(model, data, task, phase, cfg, seed, rnd=1, *args, **kwargs):
        joint = kwargs.get("joint")
        seen.append((rnd, data.hospital, len(data.train_images), joint))
        return real_train_round(model, data, task, phase, cfg, seed, rnd, *args, **kwargs)

    monkeypatch.setattr(quality.local, "train_round", spy)
    pooled = quality.pooled_data(sites)
    tasks = {"": names.SSL_SIMCLR, "bright": names.SSL_ROTATION}
    out = quality.federate(sites, labelled, pooled, pooled, cfg, tasks, joint=(0.5, 4, names.SSL_BATCHNORM_FROZEN))
    assert [c["round"] for c in out["curve"]] == [1, 2]
    assert [(r, h, n) for r, h, n, _ in seen] == [(1, "dark", 6), (1, "bright", 6), (2, "dark", 6), (2, "bright", 6)]
    for _, hospital, _, joint in seen:
        site = next(s for s in sites if s.hospital == hospital)
        assert (joint.weight, joint.batch_size, joint.batchnorm) == (0.5, 4, "frozen")
        assert torch.equal(joint.images, site.train_images)
        assert joint.method.task == (names.SSL_ROTATION if hospital == "bright" else names.SSL_SIMCLR)
    seen.clear()
    quality.federate(sites, labelled, pooled, pooled, cfg, tasks)
    assert len(seen) == 4 and all(joint is None for *_, joint in seen)


def test_pseudo_labels_draw_from_all_of_each_hospitals_images_and_the_curve_records_the_confident_share(monkeypatch):
    """--pseudo-label-weight (FixMatch): every fine-tuning round of every hospital gets a
    `training.PseudoLabel` over its whole training pool while its supervised batches come from
    its labelled images (the term knows every image's real label), and each round's curve entry
    records, per hospital, what the term counted in that round: the share of drawn images that
    were confident enough, how many of those pseudo-labels were right, and their classes."""
    from bench import quality
    from fedssl_core import names
    from fedssl_flower import local, training

    sites, cfg = _two_tiny_sites()
    labelled = [dataclasses.replace(s, train_images=s.train_images[:6], train_labels=s.train_labels[:6],
                                    train_groups=s.train_groups[:6]) for s in sites]
    seen = []  # (round, hospital, labelled images trained on, the term)
    real_train_round = local.train_round

    def spy(model, data, task, phase, cfg, seed, rnd=1, *args, **kwargs):
        seen.append((rnd, data.hospital, len(data.train_images), kwargs.get("joint")))
        return real_train_round(model, data, task, phase, cfg, seed, rnd, *args, **kwargs)

    monkeypatch.setattr(quality.local, "train_round", spy)
    pooled = quality.pooled_data(sites)
    out = quality.federate(sites, labelled, pooled, pooled, cfg, names.SSL_SIMCLR, pseudo=(0.5, 0.2, 4, names.SSL_BATCHNORM_FROZEN))
    assert [(r, h, n) for r, h, n, _ in seen] == [(1, "dark", 6), (1, "bright", 6), (2, "dark", 6), (2, "bright", 6)]
    for rnd, hospital, _, term in seen:
        site = next(s for s in sites if s.hospital == hospital)
        assert isinstance(term, training.PseudoLabel)
        assert (term.weight, term.threshold, term.batch_size, term.batchnorm) == (0.5, 0.2, 4, "frozen")
        assert torch.equal(term.images, site.train_images) and torch.equal(term.truth, site.train_labels)
        assert term.drawn > 0 and term.drawn % 4 == 0 and term.confident > 0
        record = out["curve"][rnd - 1]["pseudo_labels"][hospital]
        assert record["share"] == term.confident / term.drawn
        assert record["accuracy"] == term.correct / term.confident
        assert record["classes"] == {pooled.class_names[c]: n for c, n in sorted(term.classes.items())}


def _train_round_calls(monkeypatch, quality) -> list[tuple]:
    """(round, hospital, local steps, AdamW step count and optimizer-state dict at entry) of every
    `local.train_round` bench.quality makes, in order."""
    from fedssl_flower import local

    calls, real_train_round = [], local.train_round

    def spy(model, data, task, phase, cfg, seed, rnd=1, optimizer_state=None, *args, **kwargs):
        moments = (optimizer_state or {}).get("adamw", {})
        steps = {int(v) for k, v in moments.items() if k.endswith(".step")}
        calls.append((rnd, data.hospital, cfg.local_steps, steps, optimizer_state))
        return real_train_round(model, data, task, phase, cfg, seed, rnd, optimizer_state, *args, **kwargs)

    monkeypatch.setattr(quality.local, "train_round", spy)
    return calls


def test_relay_moments_hands_one_adamw_from_hospital_to_hospital_in_the_relay(monkeypatch):
    """--relay-moments (cyclic): every hospital continues the AdamW the one before it left, so its
    step count runs on across hospitals and rounds; without it each hospital keeps its own."""
    from bench import quality
    from fedssl_core import names

    sites, cfg = _two_tiny_sites()
    cfg = dataclasses.replace(cfg, strategy=names.STRATEGY_CYCLIC, keep_optimizer_state=True)
    pooled = quality.pooled_data(sites)
    calls = _train_round_calls(monkeypatch, quality)
    quality.federate(sites, sites, pooled, pooled, cfg, names.SSL_SIMCLR, relay_moments=True)
    assert [steps for *_, steps, _ in calls] == [set(), {1}, {2}, {3}]  # one step per visit, one optimizer
    assert len({id(state) for *_, state in calls}) == 1
    calls.clear()
    quality.federate(sites, sites, pooled, pooled, cfg, names.SSL_SIMCLR)
    assert sorted((rnd, steps) for rnd, _, _, steps, _ in calls) == [(1, set()), (1, set()), (2, {1}), (2, {1})]
    assert len({id(state) for *_, state in calls}) == 2
    with pytest.raises(ValueError, match="--relay-moments needs --strategy cyclic"):
        quality.federate(sites, sites, pooled, pooled, dataclasses.replace(cfg, strategy=names.STRATEGY_FEDAVG),
                         names.SSL_SIMCLR, relay_moments=True)


def test_scaffold_in_the_relay_corrects_each_visit_toward_the_mean_of_the_sites_gradients(monkeypatch):
    """--scaffold with strategy cyclic: no correction in the first round (no variates yet); from
    the second on, each hospital's correction is the server's variate (the hospitals' mean)
    minus its own, so with two hospitals the two corrections cancel, and neither is zero."""
    from bench import quality
    from fedssl_core import names
    from fedssl_flower import local

    sites, cfg = _two_tiny_sites()
    cfg = dataclasses.replace(cfg, strategy=names.STRATEGY_CYCLIC, finetune_rounds=3)
    seen, real_train_round = [], local.train_round

    def spy(model, data, task, phase, cfg, seed, rnd, optimizer_state, drift, *args, **kwargs):
        seen.append((rnd, data.hospital, {n: t.clone() for n, t in drift["correction"].items()}))
        return real_train_round(model, data, task, phase, cfg, seed, rnd, optimizer_state, drift, *args, **kwargs)

    monkeypatch.setattr(quality.local, "train_round", spy)
    pooled = quality.pooled_data(sites)
    out = quality.federate(sites, sites, pooled, pooled, cfg, names.SSL_SIMCLR, scaffold=True)
    assert len(out["curve"]) == 3
    assert sorted((rnd, h) for rnd, h, _ in seen) == [(r, h) for r in (1, 2, 3) for h in ("bright", "dark")]
    assert all(not c for rnd, _, c in seen if rnd == 1)
    for rnd in (2, 3):
        first, second = (c for r, _, c in seen if r == rnd)
        assert first.keys() == second.keys() and "classifier.weight" in first
        assert all(torch.allclose(first[n], -second[n], atol=1e-6 * max(1.0, float(first[n].abs().max()))) for n in first)
        assert any(float(first[n].abs().max()) > 0 for n in first)


def test_steps_by_examples_shares_the_rounds_steps_out_by_training_images(monkeypatch):
    """--steps-by-examples: local-steps x hospitals steps a round, each hospital's share in
    proportion to its training images, at least one."""
    from bench import quality
    from fedssl_core import names

    dark, bright = _two_tiny_sites()[0]
    big = dataclasses.replace(bright, train_images=bright.train_images.repeat(3, 1, 1, 1),
                              train_labels=bright.train_labels.repeat(3), train_groups=bright.train_groups * 3)
    _, cfg = _two_tiny_sites()
    cfg = dataclasses.replace(cfg, local_steps=2)
    assert quality.site_steps([dark, big], 2) == [1, 3]  # 4 steps, 12 : 36 images
    assert quality.site_steps([dark, dataclasses.replace(big, train_images=big.train_images.repeat(20, 1, 1, 1))], 1) == [1, 2]
    pooled = quality.pooled_data([dark, big])
    calls = _train_round_calls(monkeypatch, quality)
    quality.federate([dark, big], [dark, big], pooled, pooled, cfg, names.SSL_SIMCLR, steps_by_examples=True)
    assert [(rnd, h, steps) for rnd, h, steps, *_ in calls] == [(1, "dark", 1), (1, "bright", 3), (2, "dark", 1), (2, "bright", 3)]


def test_site_batches_takes_pooled_trainings_steps_one_site_at_a_time_with_one_optimizer(monkeypatch):
    """arm site-batches: as many one-step visits as pooled training has steps, each to a site
    drawn by its share of the images, one AdamW throughout, scored once per pooled round."""
    from bench import quality
    from fedssl_core import names

    sites, cfg = _two_tiny_sites()
    cfg = dataclasses.replace(cfg, local_steps=3, keep_optimizer_state=True)  # a pooled round: 3 x 2 sites = 6 steps
    pooled = quality.pooled_data(sites)
    calls = _train_round_calls(monkeypatch, quality)
    out = quality.site_batches(sites, pooled, pooled, cfg, names.SSL_SIMCLR)
    assert [c["round"] for c in out["curve"]] == [1, 2]
    assert [rnd for rnd, *_ in calls] == list(range(1, 13)) and {steps for _, _, steps, *_ in calls} == {1}
    assert [adam for *_, adam, _ in calls] == [set()] + [{n} for n in range(1, 12)]
    assert out["steps_by_site"] == {h: sum(1 for _, site, *_ in calls if site == h) for h in ("dark", "bright")}
    assert sum(out["steps_by_site"].values()) == 12 and min(out["steps_by_site"].values()) > 0


@pytest.mark.parametrize("weights, federation_prior, batchnorm",
                         [("uniform", False, "site"), ("examples", True, "site"), ("examples", True, "joint")])
def test_site_mixed_steps_on_the_mean_of_every_sites_sub_batch_loss_with_one_optimizer(monkeypatch, weights, federation_prior,
                                                                                       batchnorm):
    """arm site-mixed (FedSGD's step): every step takes batch-size / sites images from each site
    and moves along the mean of the sites' gradients, equally weighted or by training images,
    each with its own prior in the balanced softmax or the federation's, each sub-batch
    normalised by its own BatchNorm statistics or all of them in one forward pass (joint); one
    optimizer throughout, scored once per pooled round."""
    import torch.nn.functional as F
    from bench import quality
    from fedssl_flower import training

    sites, cfg = _two_tiny_sites()
    cfg = dataclasses.replace(cfg, finetune_loss="balanced-softmax", local_steps=1, finetune_rounds=2, batch_size=8,
                              weight_decay=0.0)
    sites[1] = dataclasses.replace(sites[1], train_labels=torch.tensor([0] * 8 + [1] * 4))  # a prior of its own
    big = sites[1].train_images.repeat(2, 1, 1, 1)
    sites[1] = dataclasses.replace(sites[1], train_images=big, train_labels=sites[1].train_labels.repeat(2),
                                  train_groups=sites[1].train_groups * 2)  # 24 images against 12: weights 1/3, 2/3
    pooled = quality.pooled_data(sites)
    views, start, after_step, real_view, real_fresh = [], [], [], training.supervised_view, quality.fresh_model

    def spy_view(batch, *args, **kwargs):
        out = real_view(batch, *args, **kwargs)
        views.append((batch, out.clone()))
        return out

    class Recording(torch.optim.SGD):  # plain SGD at lr 1: a step is minus the gradient it followed
        def step(self, closure=None):
            out = super().step(closure)
            after_step.append([p.detach().clone() for group in self.param_groups for p in group["params"]])
            return out

    def keep_start(*args, **kwargs):
        model = real_fresh(*args, **kwargs)
        start.append(copy.deepcopy(model))
        return model

    monkeypatch.setattr(training, "supervised_view", spy_view)
    monkeypatch.setattr(training, "_optimizer", lambda params, plan, weight_decay: Recording(params, lr=1.0))
    monkeypatch.setattr(training.Schedule, "lr_at", lambda self, step: 1.0)
    monkeypatch.setattr(quality, "fresh_model", keep_start)
    out = quality.site_mixed(sites, pooled, pooled, cfg, federation_prior=federation_prior, weights=weights, batchnorm=batchnorm)
    share = [0.5, 0.5] if weights == "uniform" else [1 / 3, 2 / 3]
    assert out["site_weights"] == pytest.approx(dict(zip(("dark", "bright"), share)))
    # a pooled round = local-steps x sites = 2 steps, 2 rounds; each step a sub-batch of 4 from each site in turn
    assert [c["round"] for c in out["curve"]] == [1, 2] and out["images_per_site_per_step"] == 4
    assert len(after_step) == 4 and len(views) == 8 and {len(b) for b, _ in views} == {4}
    owner = [next(i for i, s in enumerate(sites) if any(torch.equal(b[0], t) for t in s.train_images)) for b, _ in views]
    assert owner == [0, 1] * 4

    # the first step by hand: the mean over both sites of their balanced-softmax losses' gradients
    model = start[0]
    params = training._prepare(model, training.trainable_groups("finetune", None, mode=cfg.finetune_mode))
    training._channels_last(model, True)  # as the arm computes: a random 16 px network amplifies layout rounding
    loss = 0
    first_views = [view.contiguous(memory_format=torch.channels_last) for _, view in views[:2]]
    if batchnorm == "joint":  # one forward pass over both sub-batches: BatchNorm sees them together
        logits_by_site = model.classifier(model.encoder(torch.cat(first_views))).split([4, 4])
    else:
        logits_by_site = [model.classifier(model.encoder(view)) for view in first_views]
    for (batch, _), logits, site, w in zip(views[:2], logits_by_site, sites, share):
        idx = [next(j for j, t in enumerate(site.train_images) if torch.equal(t, img)) for img in batch]
        labels = torch.cat([s.train_labels for s in sites]) if federation_prior else site.train_labels
        counts = torch.bincount(labels, minlength=3).float()
        loss = loss + F.cross_entropy(logits + torch.log(counts.clamp(min=0.5) / counts.sum()), site.train_labels[idx]) * w
    loss.backward()
    expected = [(p.detach() - p.grad) if p.grad is not None else p.detach() for p in params]
    assert len(expected) == len(after_step[0])
    assert all(torch.allclose(got, want, rtol=1e-4, atol=1e-5) for got, want in zip(after_step[0], expected))
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in params)


def test_site_mixed_with_frozen_batchnorm_keeps_the_running_statistics_it_came_with():
    """--finetune-batchnorm frozen reaches arm site-mixed: its steps normalise with the running
    statistics the model came with, which stay as they are, while the weights learn."""
    from bench import quality
    from fedssl_flower import training

    sites, cfg = _two_tiny_sites()
    cfg = dataclasses.replace(cfg, finetune_loss="balanced-softmax", batch_size=8, finetune_rounds=1)
    pooled = quality.pooled_data(sites)
    trained = {}
    real_scores = quality.scores

    def keep(model, *args, **kwargs):
        trained.setdefault("state", {k: v.clone() for k, v in model.state_dict().items()})
        return real_scores(model, *args, **kwargs)

    start = quality.fresh_model(cfg, 3).state_dict()
    stats = list(training.encoder_batchnorms(quality.fresh_model(cfg, 3)))
    for mode, moved in (("frozen", False), ("adapt", True)):
        trained.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(quality, "scores", keep)
            quality.site_mixed(sites, pooled, pooled, cfg, finetune_batchnorm=mode)
        state = trained["state"]
        assert any(not torch.equal(state[f"{n}.running_mean"], start[f"{n}.running_mean"]) for n in stats) == moved
        assert any(not torch.equal(state[k], start[k]) for k in start if k.endswith(".weight"))


def test_site_prior_scores_put_each_sites_label_mix_back_for_a_caller_whose_site_is_known():
    """--site-prior: a model whose softmax says nothing (all logits equal) scores at chance on the
    pooled split, but with each image's probabilities times its own site's prior over the
    federation's it gets every image right when each site saw one class; sites are matched to
    their own held-out split, in order."""
    from bench import quality

    sites, cfg = _two_tiny_sites()
    sites = [dataclasses.replace(site, train_labels=torch.full((12,), i), test_labels=torch.full((6,), i))
             for i, site in enumerate(sites)]  # dark saw only class a, bright only class b
    model = quality.fresh_model(cfg, 3)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
    out = quality.site_prior_scores(model, sites, sites)
    assert out["test"]["balanced_accuracy"] == pytest.approx(1.0) and out["tta_test"]["balanced_accuracy"] == pytest.approx(1.0)
    plain = quality.scores(model, quality.pooled_data(sites))
    assert plain["balanced_accuracy"] == pytest.approx(0.5)  # every image called class a
    with pytest.raises(ValueError, match="same order"):
        quality.site_prior_scores(model, sites[::-1], sites)


def test_site_batchnorm_scores_normalise_each_sites_images_by_its_own_statistics():
    """--site-batchnorm: every site's held-out images go through a copy of the model whose encoder
    BatchNorm statistics are recomputed over that site's training images (SiloBN's inference);
    the model itself keeps its statistics, and the site's prior applies on top as --site-prior's."""
    from bench import quality
    from fedssl_flower import training
    from fedssl_flower.metrics import classification_metrics

    sites, cfg = _two_tiny_sites()
    model = quality.fresh_model(cfg, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = quality.site_prior_scores(model, sites, sites, site_batchnorm=True, batch_size=4)["site_batchnorm"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(out) == {"test", "tta_test", "prior_test", "prior_tta_test", "routed_prior_test", "routed_prior_tta_test",
                        "route_accuracy", "route_confusion"}
    # a dark and a bright site: each held-out image's first-layer statistics are nearest its own site's
    assert out["route_accuracy"] == 1.0 and out["route_confusion"] == [[6, 0], [0, 6]]
    assert out["routed_prior_test"] == out["prior_test"]  # routed right, so served as its own site

    probas = []
    for site in sites:  # by hand: each site's own statistics, as its batches of 4 computed them in training
        local = quality.fresh_model(cfg, 3)
        local.load_state_dict(before)
        stats = training.recompute_batchnorm(local, site.train_images, batch_size=4)
        assert any(not torch.equal(mean, before[f"{n}.running_mean"]) for n, (mean, _) in stats.items())
        probas.append(training.view_log_proba(training.predict_view_logits(local, site.test_images)).exp().numpy())
    labels = np.concatenate([s.test_labels.numpy() for s in sites])
    want = classification_metrics(labels, np.concatenate(probas), sites[0].class_names)
    assert out["test"]["balanced_accuracy"] == pytest.approx(want["balanced_accuracy"])
    assert out["test"]["macro_auc"] == pytest.approx(want["macro_auc"])
    shared = quality.scores(model, quality.pooled_data(sites))  # the one set of statistics: other probabilities
    assert shared["macro_auc"] != pytest.approx(want["macro_auc"])

    # a softmax that says nothing: the site's own prior alone gets every image right when each site saw one class
    sites = [dataclasses.replace(site, train_labels=torch.full((12,), i), test_labels=torch.full((6,), i))
             for i, site in enumerate(sites)]
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
    out = quality.site_prior_scores(model, sites, sites, site_batchnorm=True, batch_size=4)["site_batchnorm"]
    assert out["test"]["balanced_accuracy"] == pytest.approx(0.5)
    assert out["prior_test"]["balanced_accuracy"] == pytest.approx(1.0) and out["prior_tta_test"]["balanced_accuracy"] == pytest.approx(1.0)
    assert out["routed_prior_test"]["balanced_accuracy"] == pytest.approx(1.0)  # no site named, each routed to its own


def test_site_mixed_refuses_what_it_cannot_train():
    from bench import quality

    sites, cfg = _two_tiny_sites()
    pooled = quality.pooled_data(sites)
    with pytest.raises(ValueError, match="balanced-softmax"):
        quality.site_mixed(sites, pooled, pooled, dataclasses.replace(cfg, finetune_loss="weighted-ce"))
    with pytest.raises(ValueError, match="at least 2 images per site"):
        quality.site_mixed(sites, pooled, pooled, dataclasses.replace(cfg, finetune_loss="balanced-softmax", batch_size=3))
    with pytest.raises(ValueError, match="uniform or examples"):
        quality.site_mixed(sites, pooled, pooled, dataclasses.replace(cfg, finetune_loss="balanced-softmax"), weights="size")
    with pytest.raises(ValueError, match="site or joint"):
        quality.site_mixed(sites, pooled, pooled, dataclasses.replace(cfg, finetune_loss="balanced-softmax"), batchnorm="pooled")


def test_balanced_prior_federation_gives_every_hospital_the_label_counts_of_all_of_them(monkeypatch):
    """--balanced-prior federation: each hospital's balanced softmax adjusts by every hospital's
    labelled images counted together (site-batches' steps too); by default by its own."""
    from bench import quality
    from fedssl_core import names
    from fedssl_flower import local

    sites, cfg = _two_tiny_sites()
    sites[1] = dataclasses.replace(sites[1], train_labels=torch.zeros(12, dtype=torch.long))  # all class a
    seen, real_train_round = [], local.train_round

    def spy(*args, class_counts=None, **kwargs):
        seen.append(None if class_counts is None else class_counts.tolist())
        return real_train_round(*args, class_counts=class_counts, **kwargs)

    monkeypatch.setattr(quality.local, "train_round", spy)
    pooled = quality.pooled_data(sites)
    quality.federate(sites, sites, pooled, pooled, cfg, names.SSL_SIMCLR, federation_prior=True)
    assert seen == [[16, 4, 4]] * 4
    seen.clear()
    quality.site_batches(sites, pooled, pooled, dataclasses.replace(cfg, finetune_rounds=1), names.SSL_SIMCLR, federation_prior=True)
    assert seen == [[16, 4, 4]] * 2
    seen.clear()
    quality.federate(sites, sites, pooled, pooled, cfg, names.SSL_SIMCLR)
    assert seen == [None] * 4


def test_finetune_batchnorm_reaches_every_fine_tuning_step_of_federated_pooled_and_site_batch_training(monkeypatch):
    """--finetune-batchnorm frozen: every fine-tuning round of the federated, pooled and
    site-batches arms trains with the encoder's BatchNorm statistics frozen; the default adapts."""
    from bench import quality
    from fedssl_core import names
    from fedssl_flower import local

    sites, cfg = _two_tiny_sites()
    seen, real_train_round = [], local.train_round

    def spy(*args, batchnorm=names.SSL_BATCHNORM_ADAPT, **kwargs):
        seen.append(batchnorm)
        return real_train_round(*args, batchnorm=batchnorm, **kwargs)

    monkeypatch.setattr(quality.local, "train_round", spy)
    pooled = quality.pooled_data(sites)
    quality.federate(sites, sites, pooled, pooled, cfg, names.SSL_SIMCLR, finetune_batchnorm="frozen")
    quality.centralised(pooled, pooled, pooled, pooled, cfg, names.SSL_SIMCLR, 1, finetune_batchnorm="frozen")
    quality.site_batches(sites, pooled, pooled, dataclasses.replace(cfg, finetune_rounds=1), names.SSL_SIMCLR, finetune_batchnorm="frozen")
    assert seen == ["frozen"] * (4 + 2 + 2)
    seen.clear()
    quality.federate(sites, sites, pooled, pooled, cfg, names.SSL_SIMCLR)
    assert seen == ["adapt"] * 4


def _noise_hooks(model) -> int:
    from bench import quality
    return sum(isinstance(h, quality.FeatureStatisticsNoise) for m in model.encoder.modules() for h in m._forward_hooks.values())


def test_feature_noise_redraws_feature_statistics_in_training_only_and_checkpointing_replays_the_same_draws():
    """--feature-noise (DSU): hooks after the stem and every stage but the last change a training
    forward pass, leave eval untouched, and the backward pass under activation checkpointing
    recomputes with the same draws (the gradients of a checkpointed step are the plain step's)."""
    from bench import quality
    from fedssl_core.models import set_activation_checkpointing

    _, cfg = _two_tiny_sites()
    cfg = dataclasses.replace(cfg, image_size=64)
    plain, noisy = quality.fresh_model(cfg, 3), quality.fresh_model(cfg, 3, feature_noise=1.0)
    assert (_noise_hooks(plain), _noise_hooks(noisy)) == (0, len(quality.FeatureStatisticsNoise.points(noisy))) and _noise_hooks(noisy) == 7
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    plain.eval(), noisy.eval()
    with torch.no_grad():
        assert torch.equal(plain.encoder(x), noisy.encoder(x))
    twin = copy.deepcopy(noisy)
    plain.train(), noisy.train(), twin.train()
    with torch.no_grad():
        assert not torch.allclose(plain.encoder(x), noisy.encoder(x), atol=1e-3)
    grads = []
    for model, checkpointed in ((noisy, True), (twin, False)):
        set_activation_checkpointing(model.encoder, checkpointed)
        torch.manual_seed(7)
        model.zero_grad()
        model.encoder(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.encoder.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(*grads))


def test_feature_noise_reaches_the_models_of_federated_pooled_site_batch_and_local_training(monkeypatch):
    """feature_noise > 0: every model a hospital, pooled, site-batches or site-alone (arm local)
    training trains carries the hooks; by default none does."""
    from bench import quality
    from fedssl_core import names
    from fedssl_flower import local

    sites, cfg = _two_tiny_sites()
    seen, real_train_round = [], local.train_round

    def spy(model, *args, **kwargs):
        seen.append(_noise_hooks(model))
        return real_train_round(model, *args, **kwargs)

    monkeypatch.setattr(quality.local, "train_round", spy)
    pooled = quality.pooled_data(sites)
    quality.federate(sites, sites, pooled, pooled, cfg, names.SSL_SIMCLR, feature_noise=0.5)
    quality.centralised(pooled, pooled, pooled, pooled, cfg, names.SSL_SIMCLR, 1, feature_noise=0.5)
    quality.site_batches(sites, pooled, pooled, dataclasses.replace(cfg, finetune_rounds=1), names.SSL_SIMCLR, feature_noise=0.5)
    assert seen == [7] * (4 + 2 + 2)
    seen.clear()
    quality.run_arm("local", 0, sites, sites, pooled, cfg, feature_noise=0.5)
    assert seen == [7] * (2 + 2)
    seen.clear()
    quality.federate(sites, sites, pooled, pooled, cfg, names.SSL_SIMCLR)
    assert seen == [0] * 4


def test_federation_batchnorm_normalises_training_batches_by_the_running_statistics_and_records_their_moments():
    """--batch-renorm: in a training step every encoder BatchNorm layer's output is what eval mode
    gives with the running statistics (Batch Renormalization, r and d unclipped here), the gradient
    still reaches the stem, the running statistics stay as they are, and the step's moments are
    each channel's batch mean and mean square at the layer's input; outside the context the layer
    is the class's own again."""
    from bench import quality
    from fedssl_flower import training

    sites, cfg = _two_tiny_sites()
    model = quality.fresh_model(dataclasses.replace(cfg, pretrained=True), 3)
    layers = training.encoder_batchnorms(model)
    name = "encoder.blocks.1.0.bn2"
    layer = layers[name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda m, i: seen.__setitem__("x", i[0].detach())),
             layer.register_forward_hook(lambda m, i, o: seen.__setitem__("y", o.detach()))]
    model.train()
    with quality.FederationBatchNorm(model, 1e9, 1e9) as renorm:
        model.encoder(training.normalize(sites[1].train_images, model.mean, model.std)).square().mean().backward()
        moments = renorm.moments()
    for h in hooks:
        h.remove()
    assert "forward" not in vars(layer)
    x = seen["x"]
    model.eval()
    with torch.no_grad():  # the layer as eval mode runs it: the running statistics, then its activation
        want = layer(x)
    assert torch.allclose(seen["y"], want, atol=1e-4)
    assert model.encoder.conv_stem.weight.grad.abs().sum() > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # statistics untouched
    assert set(moments) == set(layers)
    mean, square = moments[name]
    assert torch.allclose(mean, x.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(square, x.square().mean((0, 2, 3)), atol=1e-4)


def test_federation_batchnorm_combines_the_hospitals_moments_into_the_pooled_mean_and_variance():
    """The federation's statistics from each hospital's moments and images are the pooled data's
    mean and (biased) variance: the sites' own spread plus the spread of their means; a
    hospital's calibration moments are those of its clean images at each layer's input in eval mode."""
    from bench import quality

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 4, generator=g) * 2 + 5, torch.randn(10, 4, generator=g) - 3
    moments = [({"encoder.x": (s.mean(0), s.square().mean(0))}, len(s)) for s in (a, b)]
    stats = quality.FederationBatchNorm.combine(moments)
    pooled = torch.cat([a, b])
    assert np.allclose(stats["encoder.x.running_mean"], pooled.mean(0).numpy(), atol=1e-5)
    assert np.allclose(stats["encoder.x.running_var"], pooled.var(0, correction=0).numpy(), atol=1e-4)
    assert (stats["encoder.x.running_var"] > torch.stack([a.var(0, correction=0), b.var(0, correction=0)]).mean(0).numpy()).all()

    sites, cfg = _two_tiny_sites()
    model = quality.fresh_model(cfg, 3)
    calibrated = quality.FederationBatchNorm.calibrate(model, sites[0].train_images, batch_size=5)
    stem = {}
    h = model.encoder.bn1.register_forward_pre_hook(lambda m, i: stem.__setitem__("x", i[0]))
    model.eval()
    with torch.no_grad():
        from fedssl_flower import training
        model.encoder(training.normalize(sites[0].train_images, model.mean, model.std))
    h.remove()
    assert torch.allclose(calibrated["encoder.bn1"][0], stem["x"].mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(calibrated["encoder.bn1"][1], stem["x"].square().mean((0, 2, 3)), atol=1e-4)


def test_batch_renorm_in_the_relay_hands_each_visit_the_federations_statistics(monkeypatch):
    """federate with batch_renorm: every fine-tuning visit trains under FederationBatchNorm and
    starts from the statistics the calibration and the visits before it set (step 1: the
    combination of every hospital's latest moments), which the scored model carries too."""
    from bench import quality
    from fedssl_core import names
    from fedssl_flower import local, training

    sites, cfg = _two_tiny_sites()
    cfg = dataclasses.replace(cfg, strategy=names.STRATEGY_CYCLIC)
    visits, real_train_round = [], local.train_round

    def spy(model, *args, **kwargs):
        layer = model.encoder.bn1
        visits.append(("forward" in vars(layer), layer.running_mean.clone()))
        out = real_train_round(model, *args, **kwargs)
        assert torch.equal(layer.running_mean, visits[-1][1])  # training steps leave them alone
        return out

    monkeypatch.setattr(quality.local, "train_round", spy)
    states = _global_states(monkeypatch, quality)
    pooled = quality.pooled_data(sites)
    quality.federate(sites, sites, pooled, pooled, cfg, names.SSL_SIMCLR, batch_renorm=(3.0, 5.0, 1.0))
    assert len(visits) == 4 and all(patched for patched, _ in visits)
    start = quality.fresh_model(cfg, 3)
    assert not torch.equal(visits[0][1], start.encoder.bn1.running_mean)  # calibrated before the first visit
    # the stem's input does not depend on any statistics: after calibration its mean is the pooled images'
    stem = {}
    h = start.encoder.bn1.register_forward_pre_hook(lambda m, i: stem.__setitem__("x", i[0]))
    with torch.no_grad():
        start.eval()
        start.encoder(training.normalize(pooled.train_images, start.mean, start.std))
    h.remove()
    assert torch.allclose(visits[0][1], stem["x"].mean((0, 2, 3)), atol=1e-4)
    assert all(not torch.equal(visits[i][1], visits[i + 1][1]) for i in range(3))  # each visit's moments move them
    assert not torch.equal(states[-1]["encoder.bn1.running_mean"], visits[-1][1])  # the last visit's moved them once more


def test_shades_of_gray_divides_out_each_images_illuminant():
    from bench.quality import shades_of_gray

    g = torch.Generator().manual_seed(0)
    grey = torch.rand(4, 1, 24, 24, generator=g) * 150 + 50
    lights = torch.tensor([[1.25, 1.0, 0.75], [0.8, 1.0, 1.2], [1.0, 1.0, 1.0], [1.0, 0.7, 0.9]])
    lit = (grey * lights[:, :, None, None]).round().to(torch.uint8)
    out = shades_of_gray(lit, 6)
    assert out.dtype == torch.uint8 and out.shape == lit.shape
    means = out.float().mean(dim=(2, 3))  # every image grey again, whatever its light
    assert (means.max(dim=1).values - means.min(dim=1).values).max() < 1.5
    assert (lit[[0, 1, 3]].float().mean(dim=(2, 3)).std(dim=1) > 15).all()  # ... where the tinted ones were not
    # An image under a grey light keeps its pixels; a black one stays black, with no NaN.
    assert (out[2].int() - lit[2].int()).abs().max() <= 1
    assert shades_of_gray(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 6).eq(0).all()
    # Per image: one image's light does not change another's correction (chunks included).
    assert torch.equal(shades_of_gray(lit[:1], 6), out[:1]) and torch.equal(shades_of_gray(lit, 6, chunk=3), out)

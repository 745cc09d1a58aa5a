"""Model quality on real data: federated SSL + federated fine-tuning next to pooled training,
fine-tuning without SSL, a random start, and fewer labels, at the same compute budget.

Data (`--data`), either
- HAM10000: 4 hospitals = the 4 acquisition sites of `HAM10000_metadata_dataverse.csv`
  (`partition-by = site`). Each site is split into train/test by lesion, stratified by class
  (test fraction 0.2); a validation split (`--val-fraction`, by lesion) is carved from each
  site's training split; or
- one folder per hospital, one folder per class inside it (e.g. the brain MRI hospitals): the
  hospitals are the folders, their class folders reconciled into one class list by
  `fedssl_flower.data.layout.plan`, as `deploy-local.sh up --data PATH` does (`--label-map`,
  `--class-names`). Such folders carry no patient ids, so every image is its own group: each
  hospital's images are split train/test (0.2) and then train/val (`--val-fraction`) at
  random, stratified by class, by the product's `split_train_test`. Slices of one patient
  can therefore land on both sides of a split.
In both cases the splits are drawn once (seed 0), the same for every `--seeds` value. Every
arm trains on the rest of the training splits, picks nothing on the test split, and is scored
on the pooled test set (the union of the sites' test splits, as FLamby's Fed-ISIC2019 does).
`--eval val` scores on the pooled validation split instead: that is what hyper-parameters are
chosen on.

Arms (`--arms`, default `federated,pooled,no-ssl,random,probes`); a `@F` suffix keeps only a
fraction F of the training labels (by lesion, stratified; SSL still sees every image):
  federated   SSL rounds (SimCLR unless --ssl-task) from the start weights, then federated full fine-tuning
  pooled      one model on the union of the sites' training images, same steps
  no-ssl      federated fine-tuning from the start weights, no SSL rounds
  random      federated fine-tuning from random weights, no SSL rounds
  random-ssl  SSL rounds from random weights, then federated fine-tuning
  local       each site alone, same pipeline and steps (scored on the pooled test; mean reported)
  probes      linear probe and kNN of frozen encoders: random, start weights (no training)
  ssl-probe   the federated SSL rounds only, then a linear probe and kNN of the encoder
  fp16, int8  `federated` with compressed updates, both directions (bytes on the wire counted)
  site-batches  pooled fine-tuning's steps, each batch from one site drawn by its size (`site_batches`; a diagnostic)
  site-mixed  pooled fine-tuning's steps, each batch an equal sub-batch from every site: FedSGD's step (`site_mixed`; a diagnostic)
SSL rounds run SimCLR at every site unless `--ssl-task` says otherwise (`micle`, or
`micle,vidir_molemax=simclr` for a site of its own: MICLe needs lesions with several images,
which vidir_molemax lacks), and take the run config's SSL options: `--lr`,
`--ssl-colour-jitter`, `--ssl-batchnorm` (adapt | frozen) and `--share` (encoder |
encoder-and-heads | projection-head).

Budget: the same number of optimizer steps of `--batch-size` images per arm. Federated arms
take `--local-steps` batches per site per round (so `sites x local-steps` per round); pooled takes
the same per round on one model. A SimCLR step forwards two views, about twice a fine-tuning
step, so arms without SSL fine-tune for `finetune-rounds + 2 x ssl-rounds` rounds. Each arm's
wall time is reported. The federation runs in this process with the code the hospitals and
the aggregator run (`fedssl_flower.local`, `strategy.weighted_average`); Flower's transport is
not in the loop (bench/flower_overhead.py measures it). With `--dp central-fixed` (and
`--dp-noise-multiplier`, `--dp-clipping-norm`, `--dp-delta`, `--dp-max-epsilon`; `--dp
central-adaptive` with `--dp-target-quantile`, `--dp-clip-norm-lr`, `--dp-clipped-count-stddev`)
the federated arms aggregate as the aggregator does under run config dp
(`aggregation.Aggregation`: Flower's clipping wrapper and RDP accountant, equal weights,
BatchNorm statistics kept) and stop before a round past the budget; each run records its
`privacy` spent (use `--label` to keep epsilon arms apart from the plain ones).
`--dp-target-epsilon E` sets the noise multiplier to the smallest whose epsilon at `--dp-delta`
after the arm's rounds is at most E (`config.noise_multiplier_for_epsilon`, Flower's accountant).
With `--strategy NAME` (any run-config strategy, with
`--trim-beta`, `--num-malicious-nodes`, `--num-nodes-to-select`, `--proximal-mu`, `--server-eta`)
they aggregate through the same `aggregation.Aggregation` (Flower's strategy classes); fedavg
stays `weighted_average` and the server step. `--attack SPEC --attacker HOSPITAL` makes that
hospital misbehave every round as a SuperNode with node config `attack=SPEC` does (`scale:100`,
`sign-flip`; `attack.misbehave`, fault injection for this benchmark only). Every round records
the L2 norm of each hospital's update of the trained parameters as trained (`update_norms`, what a
clipping norm is chosen from, on `--eval val`) and as it reached the aggregator, after any local
DP release or attack, with the global model's change (`communication[].update_norms`). Runs are keyed
by strategy and attack as well (a `--label` still names them in tables).

    .venv/bin/python -m bench.quality [--arms federated,no-ssl@0.1] [--seeds 0,1,2] [--eval val]
    .venv/bin/python -m bench.quality --data ../shared/data/brain-mri --label-map 'tata-memorial-mumbai:Normal=notumor'

Prints a table and appends to JSON (default bench/results/quality.json, keyed by arm, seed and
eval split: a rerun replaces its own entry); `bench/report.py` makes the plots.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import shlex
import statistics
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fedssl_core import label_shift, names
from fedssl_core.models import FedSSLModel, set_torch_threads
from fedssl_flower import aggregation, local, local_dp, records, training
from fedssl_flower import ssl as ssl_methods
from fedssl_flower.config import RunConfig, noise_multiplier_for_epsilon
from fedssl_flower.data import HospitalData, layout, load_hospital_data
from fedssl_flower.data.partition import split_train_test
from fedssl_flower.errors import FedSSLError
from fedssl_flower.aggregation import Aggregation, PrivacyBudgetExhausted, update_norm
from fedssl_flower.attack import EXPECTED as ATTACK_SPECS
from fedssl_flower.attack import Attack, misbehave, parse_attack
from fedssl_flower.strategy import ServerOptimizer, relay_order, weighted_average

REPO = Path(__file__).resolve().parents[1]
ARMS = ("federated", "pooled", "no-ssl", "random", "random-ssl", "local", "probes", "ssl-probe", "fp16", "int8", "site-batches",
        "site-mixed")
DEFAULT_ARMS = "federated,pooled,no-ssl,random,probes"
SEEDED_ARMS = ("federated",)  # run for every seed; the others for the first seed only
FEDERATED_ARMS = ("federated", "no-ssl", "random", "random-ssl", "fp16", "int8")  # scored after federated fine-tuning
HEADLINE = (names.M_BALANCED_ACCURACY, names.M_MACRO_AUC, names.M_ACCURACY)
# FLamby Fed-ISIC2019 (6 centres incl. the 4 HAM10000 sites, ImageNet-pretrained EfficientNet-b0,
# balanced accuracy on the pooled test), for orientation only: different model, data and budget.
FLAMBY_FED_ISIC2019 = {"pooled": 0.745, "FedAvg": 0.595, "Scaffold": 0.626}
SITES_METADATA = "HAM10000_metadata_dataverse.csv"  # HAM10000's acquisition sites: the 4 hospitals


# ---------------------------------------------------------------------------- data
def load_sites(args) -> list[HospitalData]:
    """The hospitals of `args.data`: HAM10000's sites, else its hospital folders (see `main`)."""
    if not (args.data / SITES_METADATA).is_file():
        return load_hospital_folders(args)
    sites = []
    for i in range(4):
        cfg = {"hospital": f"site-{i}", "data-path": str(args.data), "partition-by": "site", "num-partitions": 4,
               "partition-id": i, "max-images": args.max_images_per_site, "cache-dir": str(args.cache_dir)}
        data = load_hospital_data(cfg, args.image_size, seed=0)  # one split for every seed
        data.hospital = data.audit["partition"]["sites"][0]
        sites.append(data)
    return sites


def load_hospital_folders(args) -> list[HospitalData]:
    """One hospital per folder with the node config `deploy-local.sh` would give its SuperNode
    (class folders reconciled by `layout.plan`); the layout is kept on each site's audit."""
    plan = layout.plan(args.data, label_map=args.label_map or None, class_names=args.class_names or None,
                       max_images=args.max_images_per_site)
    print(plan.describe(), flush=True)
    sites = []
    for h in plan.hospitals:
        cfg = {**h.node_config, "hospital": h.name, "max-images": args.max_images_per_site, "cache-dir": str(args.cache_dir)}
        data = load_hospital_data(cfg, args.image_size, seed=0)  # one split for every seed
        data.audit["layout"] = {"kind": plan.kind, "folder": h.folder, "label_map": plan.label_map.get(h.name, {})}
        sites.append(data)
    return sites


def _subset(data: HospitalData, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    t = torch.tensor(idx, dtype=torch.long)
    return data.train_images[t], data.train_labels[t], [data.train_groups[i] for i in idx]


def carve_validation(site: HospitalData, fraction: float) -> tuple[HospitalData, HospitalData]:
    """(training data without the validation lesions, validation split as `test_*`)."""
    train_idx, val_idx = split_train_test(list(range(len(site.train_labels))), site.train_groups,
                                          site.train_labels.tolist(), fraction, seed=1)
    ti, tl, tg = _subset(site, train_idx)
    vi, vl, _ = _subset(site, val_idx)
    train = dataclasses.replace(site, train_images=ti, train_labels=tl, train_groups=tg)
    val = dataclasses.replace(site, test_images=vi, test_labels=vl)
    return train, val


def shuffle_sites(sites: list[HospitalData], seed: int = 0) -> list[HospitalData]:
    """The same hospitals with the same numbers of training images, the images dealt out among
    them at random (an IID federation of the same data; a lesion's images may then sit at two
    hospitals, which the training split allows): is the gap to pooled training the sites'
    heterogeneity, or federated averaging itself?"""
    pooled = pooled_data(sites)
    perm = torch.randperm(len(pooled.train_labels), generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for site in sites:
        idx = perm[start:start + len(site.train_labels)]
        start += len(idx)
        out.append(dataclasses.replace(site, train_images=pooled.train_images[idx], train_labels=pooled.train_labels[idx],
                                       train_groups=[pooled.train_groups[i] for i in idx.tolist()]))
    return out


def keep_labels(site: HospitalData, fraction: float, seed: int) -> HospitalData:
    """Only `fraction` of the training lesions keep their label (stratified, at least one
    lesion of each class present with two or more)."""
    if fraction >= 1.0:
        return site
    _, kept = split_train_test(list(range(len(site.train_labels))), site.train_groups, site.train_labels.tolist(),
                               fraction, seed=100 + seed)
    ki, kl, kg = _subset(site, kept)
    return dataclasses.replace(site, train_images=ki, train_labels=kl, train_groups=kg)


def pooled_data(parts: list[HospitalData], name: str = "pooled") -> HospitalData:
    return HospitalData(
        hospital=name, class_names=parts[0].class_names,
        train_images=torch.cat([p.train_images for p in parts]), train_labels=torch.cat([p.train_labels for p in parts]),
        test_images=torch.cat([p.test_images for p in parts]), test_labels=torch.cat([p.test_labels for p in parts]),
        train_groups=[g for p in parts for g in p.train_groups],
    )


# ---------------------------------------------------------------------------- scores
def shades_of_gray(images: torch.Tensor, power: float, chunk: int = 512) -> torch.Tensor:
    """Shades of Gray colour constancy (Finlayson & Trezzi 2004; for dermoscopy Barata et al.
    2015, power 6 in ISIC 2019's winning entry, Gessert et al. 2020) of uint8 (N, 3, S, S)
    images: each image's illuminant is estimated as the Minkowski `power`-mean of each channel
    and divided out (gains normalised so a grey illuminant leaves the image as it is), so every
    site's dermoscope light looks alike. Returns uint8, rounded and clipped to [0, 255]."""
    out = torch.empty_like(images)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].float()
        illuminant = x.pow(power).mean(dim=(2, 3)).pow(1.0 / power).clamp_min(1e-3)  # (n, 3)
        gain = illuminant.norm(dim=1, keepdim=True) / (illuminant * 3 ** 0.5)
        out[i:i + chunk] = (x * gain[:, :, None, None]).clamp(0, 255).round().to(torch.uint8)
    return out


def fit_temperature(view_logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising validation NLL on a log grid (what hospitals can report as an
    NLL-per-temperature curve for the aggregator to sum); `view_logits` (V, N, K) as
    `training.predict_view_logits` gives them, each view's logits divided by the temperature."""
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 61))
    nll = [float(F.nll_loss(training.view_log_proba(view_logits, t), labels)) for t in grid]
    return float(grid[int(np.argmin(nll))])


def scores(model: FedSSLModel, test: HospitalData, val: HospitalData | None = None, tta: str = names.TTA_NONE) -> dict:
    """Headline metrics, F1 and confusion matrix, ECE, and with `val` the temperature fitted on
    it and the ECE after it; scored with test-time augmentation `tta` as the product serves."""
    from fedssl_flower.metrics import classification_metrics

    views = training.predict_view_logits(model, test.test_images, tta)
    proba = training.view_log_proba(views).exp().numpy()
    out = classification_metrics(test.test_labels.numpy(), proba, test.class_names)
    keep = {k: out[k] for k in (*HEADLINE, names.M_F1, names.M_CONFUSION_MATRIX)}
    keep["ece"] = training.expected_calibration_error(proba, test.test_labels.numpy())
    if val is not None:
        t = fit_temperature(training.predict_view_logits(model, val.test_images, tta), val.test_labels)
        keep["temperature"] = t
        keep["ece_temperature_scaled"] = training.expected_calibration_error(training.view_log_proba(views, t).exp().numpy(),
                                                                             test.test_labels.numpy())
    return keep


def tta_scores(model: FedSSLModel, test: HospitalData) -> dict:
    """Headline metrics of the softmax averaged over the 8 flips and 90-degree turns of each
    image (run config test-time-augmentation = dihedral), printed."""
    out = headline(scores(model, test, tta=names.TTA_DIHEDRAL))
    print(f"    with test-time augmentation: balanced accuracy {out[names.M_BALANCED_ACCURACY]:.3f}", flush=True)
    return out


def headline(m: dict) -> dict:
    return {k: m[k] for k in HEADLINE}


def _balanced_accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    return float(np.mean([(pred[true == c] == c).float().mean() for c in true.unique()]))


def _fit_linear(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, cfg: RunConfig, g: torch.Generator,
                batch_size: int, weight: torch.Tensor | None = None) -> torch.nn.Linear:
    """`probe-epochs` of AdamW at `probe-lr` on features `x` with labels `y` (batches drawn with
    `g`; `weight`: class weights of the cross-entropy)."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.probe_lr, weight_decay=0.0)
    for _ in range(cfg.probe_epochs):
        for idx in training._batches(len(x), batch_size, g):
            loss = F.cross_entropy(head(x[idx]), y[idx], weight=weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head


def probe(model: FedSSLModel, train: HospitalData, test: HospitalData, cfg: RunConfig) -> dict:
    """Linear probe and kNN of the frozen encoder: how much diagnosis its features carry.
    Features are computed once; the linear classifier is trained on them as the product's
    SSL-round probe is (`probe-epochs` at `probe-lr`, class-weighted), the kNN is cosine with
    k = 20 and similarity-weighted votes."""
    return probe_features(model, training.embed(model, train.train_images), train.train_labels,
                          training.embed(model, test.test_images), test, cfg)


def probe_features(model: FedSSLModel, f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor,
                   test: HospitalData, cfg: RunConfig) -> dict:
    """`probe` on features already computed by the frozen encoder of `model`."""
    from fedssl_flower.metrics import classification_metrics

    head = copy.deepcopy(model.classifier)
    torch.manual_seed(cfg.seed)
    head.reset_parameters()
    _fit_linear(head, f_train, y_train, cfg, torch.Generator().manual_seed(cfg.seed), cfg.batch_size,
                weight=training._class_weights(y_train, model.num_classes))
    with torch.no_grad():
        proba = torch.softmax(head(f_test), 1).numpy()
    out = headline(classification_metrics(test.test_labels.numpy(), proba, test.class_names))
    a, b = F.normalize(f_train, dim=1), F.normalize(f_test, dim=1)
    sims, idx = (b @ a.T).topk(20, dim=1)
    votes = torch.zeros(len(b), len(test.class_names)).scatter_add_(1, y_train[idx], torch.exp(sims / 0.07))
    out["knn_balanced_accuracy"] = _balanced_accuracy(votes.argmax(1), test.test_labels)
    return out


def _cholesky_with_jitter(cov: torch.Tensor, tries: int = 8) -> torch.Tensor:
    """The Cholesky factor of covariance `cov` plus the smallest ridge (1e-8 of its mean variance,
    then ten times more each try) that makes it positive definite: a class's few features, or
    features that never vary, leave the empirical covariance singular."""
    scale = max(float(cov.diagonal().mean()), 1e-12)
    eye = torch.eye(len(cov), dtype=cov.dtype)
    for i in range(tries):
        root, info = torch.linalg.cholesky_ex(cov + eye * scale * 1e-8 * 10 ** i)
        if int(info) == 0:
            return root
    raise RuntimeError(f"a class covariance stays singular with a ridge of {scale * 1e-8 * 10 ** (tries - 1):.3g}")


def head_diagnostic(model: FedSSLModel, sites: list[HospitalData], test: HospitalData, cfg: RunConfig,
                    virtual_per_class: int = 2000) -> dict:
    """Is the federated model's gap to pooled training in its classifier or in its encoder? With
    the final federated encoder frozen, two new classifiers are scored beside the model's own:
    - `oracle`: a linear probe on the pooled training features (`probe`; it needs every
      hospital's features in one place, so it is a bound on what any classifier-only fix can
      reach, not a method a deployment has);
    - `ccvr`: the model's own classifier fine-tuned on virtual features drawn from one Gaussian
      per class whose mean and covariance are merged from each hospital's class counts, feature
      sums and second moments (what one extra statistics round would share; classifier
      calibration with virtual representations, Luo et al., NeurIPS 2021), `virtual_per_class`
      features of every class, `probe-epochs` at `probe-lr` in batches of 256;
    - `ccvr_diagonal`: the same with only each class's per-feature variances (a far smaller
      and less revealing share than full second moments)."""
    from fedssl_flower.metrics import classification_metrics

    k, dim = model.num_classes, model.feature_dim
    n, s1, s2 = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dim, dtype=torch.float64), torch.zeros(k, dim, dim, dtype=torch.float64)
    feats = [training.embed(model, site.train_images) for site in sites]
    for site, f in zip(sites, feats):  # each hospital's statistics of its own features; only these leave it
        f = f.double()
        for c in range(k):
            fc = f[site.train_labels == c]
            n[c] += len(fc)
            s1[c] += fc.sum(0)
            s2[c] += fc.T @ fc

    def recalibrated(diagonal: bool) -> dict:
        g = torch.Generator().manual_seed(cfg.seed)
        xs, ys = [], []
        for c in range(k):
            if n[c] < 2:
                continue
            mean = s1[c] / n[c]
            cov = s2[c] / n[c] - torch.outer(mean, mean)
            if diagonal:
                cov = torch.diag(cov.diagonal())
            root = _cholesky_with_jitter((cov + cov.T) / 2)  # sampled as mean + z L^T
            xs.append((mean + torch.randn(virtual_per_class, dim, generator=g, dtype=torch.float64) @ root.T).float())
            ys.append(torch.full((virtual_per_class,), c, dtype=torch.long))
        x, y = torch.cat(xs), torch.cat(ys)
        head = _fit_linear(copy.deepcopy(model.classifier), x, y, cfg, g, 256)
        with torch.no_grad():
            proba = torch.softmax(head(f_test), 1).numpy()
        return headline(classification_metrics(test.test_labels.numpy(), proba, test.class_names))

    f_test = training.embed(model, test.test_images)
    ccvr, ccvr_diagonal = recalibrated(False), recalibrated(True)
    oracle = probe_features(model, torch.cat(feats), torch.cat([site.train_labels for site in sites]), f_test, test, cfg)
    print(f"    head diagnostic: oracle probe {oracle[names.M_BALANCED_ACCURACY]:.3f}, "
          f"CCVR {ccvr[names.M_BALANCED_ACCURACY]:.3f} (diagonal covariances {ccvr_diagonal[names.M_BALANCED_ACCURACY]:.3f})", flush=True)
    return {"oracle_probe": oracle, "ccvr": ccvr, "ccvr_diagonal": ccvr_diagonal, "virtual_per_class": virtual_per_class,
            "note": "the final federated encoder frozen; no test-time augmentation (compare with test, not tta_test)"}


# ---------------------------------------------------------------------------- training
def fresh_model(cfg: RunConfig, num_classes: int, feature_noise: float = 0.0) -> FedSSLModel:
    """The model every arm starts from. `feature_noise` > 0: `FeatureStatisticsNoise` in its
    encoder (copies of the model, the hospitals', keep it)."""
    torch.manual_seed(cfg.seed)  # what the aggregator starts from
    model = FedSSLModel(cfg.arch, num_classes=num_classes, pretrained=cfg.pretrained)
    if feature_noise:
        FeatureStatisticsNoise.attach(model, feature_noise)
    return model


class FeatureStatisticsNoise:
    """DSU (Li et al., ICLR 2022, "Uncertainty modeling for out-of-distribution generalization"),
    a forward hook at the end of an encoder stage (`points`): in a training step, with probability `p`, each image's
    per-channel feature mean and standard deviation are redrawn from a Gaussian around them whose
    spread is the batch's spread of those statistics, and the features renormalised to the drawn
    ones. A one-site batch then trains on features whose style varies more than its site's do,
    the variation a pooled batch's other sites would bring. Eval mode is untouched. The draws
    come from torch's global generator, which activation checkpointing restores for its
    recomputation, so the backward pass sees the forward pass's noise."""

    def __init__(self, p: float) -> None:
        self.p = p

    @staticmethod
    def points(model: FedSSLModel) -> list[str]:
        """Where it acts: after the stem and after every encoder stage but the last (DSU's
        placement in a ResNet; the last stage feeds the pooled features). In timm's EfficientNet
        on a stage's last block: its activation checkpointing calls the blocks, not the stages."""
        enc = model.encoder
        if hasattr(enc, "blocks"):  # timm EfficientNet
            return ["bn1", *(f"blocks.{i}.{len(enc.blocks[i]) - 1}" for i in range(len(enc.blocks) - 1))]
        return ["maxpool", "layer1", "layer2", "layer3"]  # torchvision ResNet

    @classmethod
    def attach(cls, model: FedSSLModel, p: float) -> None:
        modules = dict(model.encoder.named_modules())
        for name in cls.points(model):
            modules[name].register_forward_hook(cls(p))

    def __call__(self, module: torch.nn.Module, inputs: tuple, x: torch.Tensor) -> torch.Tensor | None:
        if not module.training or x.shape[2] * x.shape[3] == 1 or float(torch.rand(())) >= self.p:
            return None  # a 1 x 1 map has no spatial statistics to redraw
        mu = x.mean((2, 3), keepdim=True)
        sigma = (x.var((2, 3), keepdim=True, correction=0) + 1e-6).sqrt()
        beta = mu + torch.randn_like(mu) * (mu.var(0, keepdim=True, correction=0) + 1e-6).sqrt()
        gamma = sigma + torch.randn_like(sigma) * (sigma.var(0, keepdim=True, correction=0) + 1e-6).sqrt()
        return (x - mu) / sigma * gamma + beta


CALIBRATION_IMAGES, CALIBRATION_PASSES = 256, 8  # --batch-renorm: the federation's first statistics


class FederationBatchNorm:
    """Batch Renormalization (Ioffe 2017) against the federation's BatchNorm statistics.

    Per-site batch statistics are what separates a federation's training from pooled
    training (the FedSGD rows of docs/benchmarks.md: the same sub-batches normalised jointly
    close the gap). Here every training batch of a hospital is normalised, in the forward
    pass, by the statistics of all hospitals' images together, held in the encoder's running
    statistics: `y = gamma * ((x - mu_B) / sigma_B * r + d) + beta` with `r = sigma_B / sigma`
    and `d = (mu_B - mu) / sigma` treated as constants (clipped to `[1/rmax, rmax]` and
    `[-dmax, dmax]`), so the output is `(x - mu) / sigma` while the gradient still flows
    through the batch's own statistics, as in BatchNorm. Running statistics are not updated
    by training steps; instead each training batch's per-channel mean and mean square at
    every encoder BatchNorm layer are averaged over the visit (`moments`), what a hospital
    would send beside its model, and `combine` turns every hospital's latest moments into the
    federation's mean and variance (the law of total variance: the sites' own spread plus the
    spread of their means), which the next visits and the served model use. Eval mode is
    untouched: the served model normalises with the same statistics it trained against."""

    def __init__(self, model: FedSSLModel, rmax: float, dmax: float) -> None:
        self.layers = training.encoder_batchnorms(model)
        self.rmax, self.dmax = rmax, dmax
        self.sums: dict[str, list] = {}

    def __enter__(self) -> "FederationBatchNorm":
        self.sums = {}
        for name, layer in self.layers.items():
            layer.forward = types.MethodType(self._forward(name), layer)
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers.values():
            del layer.forward  # back to the class's

    def _forward(self, name: str):
        outer = self

        def forward(layer: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
            if not layer.training:
                return type(layer).forward(layer, x)
            with torch.no_grad():
                var, mu = torch.var_mean(x, dim=(0, 2, 3), correction=0)
                sigma = (var + layer.eps).sqrt()
                ref = (layer.running_var + layer.eps).sqrt()
                r = (sigma / ref).clamp(1 / outer.rmax, outer.rmax)
                d = ((mu - layer.running_mean) / ref).clamp(-outer.dmax, outer.dmax)
                acc = outer.sums.setdefault(name, [torch.zeros_like(mu), torch.zeros_like(mu), 0])
                acc[0] += mu
                acc[1] += var + mu * mu
                acc[2] += 1
            y = F.batch_norm(x, None, None, layer.weight * r, layer.bias + layer.weight * d, True, 0.0, layer.eps)
            if hasattr(layer, "act"):  # timm's BatchNormAct2d: BatchNorm, dropout, activation
                y = layer.act(layer.drop(y))
            return y
        return forward

    def moments(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (state-dict prefix): the visit's mean over batches of each channel's mean
        and mean square."""
        return {k: (s[0] / s[2], s[1] / s[2]) for k, s in self.sums.items() if s[2]}

    @staticmethod
    @torch.no_grad()
    def calibrate(model: FedSSLModel, images: torch.Tensor, batch_size: int = 64) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """A hospital's moments of its clean `images` at every encoder BatchNorm layer's input
        with the model in eval mode (every layer normalising by the running statistics): what
        it sends before the first round so that the federation's statistics exist."""
        layers = training.encoder_batchnorms(model)
        sums: dict[str, list] = {}
        hooks = []
        for name, layer in layers.items():
            def hook(module, inputs, name=name):
                x = inputs[0]
                var, mu = torch.var_mean(x, dim=(0, 2, 3), correction=0)
                acc = sums.setdefault(name, [torch.zeros_like(mu), torch.zeros_like(mu), 0])
                acc[0] += mu * len(x)
                acc[1] += (var + mu * mu) * len(x)
                acc[2] += len(x)
            hooks.append(layer.register_forward_pre_hook(hook))
        was = model.training
        model.eval()
        try:
            for i in range(0, len(images), batch_size):
                model.encoder(training.normalize(images[i:i + batch_size], model.mean, model.std))
        finally:
            for h in hooks:
                h.remove()
            model.train(was)
        return {k: (s[0] / s[2], s[1] / s[2]) for k, s in sums.items()}

    @staticmethod
    def combine(moments: list[tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]]) -> dict[str, np.ndarray]:
        """The federation's running statistics (state-dict keys) from every hospital's latest
        `(moments, images)`: image-weighted mean and mean square, variance = mean square - mean^2."""
        total = sum(n for _, n in moments)
        out = {}
        for name in moments[0][0]:
            mean = sum(m[name][0] * n for m, n in moments) / total
            square = sum(m[name][1] * n for m, n in moments) / total
            out[f"{name}.running_mean"] = mean.numpy().astype(np.float32)
            out[f"{name}.running_var"] = (square - mean * mean).clamp_min(0).numpy().astype(np.float32)
        return out


def schedule(cfg: RunConfig) -> list[tuple[str, int]]:
    return ([(names.PHASE_SSL, r) for r in range(1, cfg.ssl_rounds + 1)]
            + [(names.PHASE_FINETUNE, r) for r in range(1, cfg.finetune_rounds + 1)])


def wire(arrays: dict[str, np.ndarray], encoding: str) -> tuple[dict[str, np.ndarray], int]:
    """What a receiver gets from `arrays` sent with `encoding`, and the bytes it took."""
    record = records.to_array_record(arrays, encoding)
    return records.from_array_record(record, encoding), record.count_bytes()


def federate(ssl_sites: list[HospitalData], ft_sites: list[HospitalData], test: HospitalData, val: HospitalData,
             cfg: RunConfig, task: str | dict[str, str], bn_diagnostic: bool = False, scaffold: bool = False, fedprox_mu: float = 0.0,
             tail_average: int = 0, attack: Attack = Attack(), attacker: str = "", uniform_weights: bool = False,
             tta: bool = False, head_check: bool = False, fedbn: list[HospitalData] | None = None,
             fixed_head: bool = False, moon: tuple[float, float] = (0.0, 0.5),
             joint: tuple = (0.0, 32, names.SSL_BATCHNORM_ADAPT),
             pseudo: tuple = (0.0, 0.95, 32, names.SSL_BATCHNORM_FROZEN), relay_moments: bool = False,
             steps_by_examples: bool = False, federation_prior: bool = False,
             finetune_batchnorm: str = names.SSL_BATCHNORM_ADAPT, feature_noise: float = 0.0,
             site_prior: list[HospitalData] | None = None, site_batchnorm: bool = False,
             batch_renorm: tuple[float, float, float] | None = None) -> dict:
    """The aggregator's round loop with every hospital in this process: hospitals start each
    round from the global shared groups (through the wire encoding) and keep their private heads.
    `bn_diagnostic`: also score each round's model with its BatchNorm statistics recomputed
    over every site's training images (what a statistics-only round would give).
    `scaffold`: fine-tuning corrects each hospital's gradients by SCAFFOLD control variates
    (server minus hospital; a hospital's variate is its mean gradient of its last round; the
    server's is their mean). With strategy=cyclic too: each visit's one-site gradients are
    corrected toward the mean over the sites, the variates travelling with the relay.
    `fedprox_mu` > 0: fine-tuning adds FedProx's proximal term mu/2 ||w - w_global||^2.
    `tail_average` K > 1: the final model is the uniform average of the last K fine-tuning
    rounds' global models (`average_states`: BatchNorm running statistics averaged too) instead
    of the last one; the curve also scores each round's running tail average, and the result
    keeps the last round's model's scores and the average's with BatchNorm recomputed.
    `attack` on hospital `attacker`: its update is changed every round by `attack.misbehave`,
    what a SuperNode with node config `attack` sends (fault injection, benchmark only).
    Aggregation: `cfg.strategy` and `cfg.dp` as the aggregator computes them
    (`aggregation.Aggregation`, hospital i as node i + 1); plain FedAvg with the server step
    (`weighted_average`, `ServerOptimizer`) for strategy=fedavg without DP, as before. Each
    round records every hospital's update norm and the global model's (`update_norm`).
    `uniform_weights`: plain FedAvg weighs every hospital equally instead of by its images.
    `tta`: the final model is also scored with test-time augmentation (`tta_scores`).
    `head_check`: also run `head_diagnostic` on the final model.
    `fedbn` (each site's own held-out split, in site order): FedBN (Li et al. 2021): after its first
    round a hospital keeps its own encoder BatchNorm layers (affine weights and running statistics)
    instead of loading the global ones; the aggregator still averages them, so the global model
    is what FedAvg would serve. Each fine-tuning round also scores the personalised models (every
    site's own model on its own split, the union scored together), and at the end the global model
    with its BatchNorm statistics recomputed over the pooled training images.
    `fixed_head`: FedBABU (Oh et al. 2022): the classifier stays at its seeded random start in every
    fine-tuning round (its gradients are zeroed, so AdamW never moves it; weight decay aside, which
    at 1e-4 x lr is negligible), only the encoder learns and is averaged; the global model serves
    with that fixed classifier.
    `moon` (mu, temperature), mu > 0: MOON (Li, He & Song 2021): from its second fine-tuning round
    on, a hospital adds the model-contrastive term `training.Contrast` (its features pulled toward
    the round's global encoder's, pushed from its own previous local encoder's) to its loss.
    `joint` (weight, batch, batchnorm), weight > 0: S4L: every fine-tuning step also adds `weight` times the
    hospital's SSL task's loss on `batch` of its training images, labelled or not
    (`training.Joint`: `ssl_sites`' images, every image, while `ft_sites` may keep a fraction of the labels).
    `pseudo` (weight, threshold, batch, batchnorm), weight > 0: FixMatch: every fine-tuning step also adds
    `weight` times the pseudo-label term on `batch` of the hospital's training images, labelled or not
    (`training.PseudoLabel`, same images as `joint`); each round's curve entry records, per hospital,
    the share of drawn images confident enough to train on, how many of those pseudo-labels were
    right (the bench knows every image's label) and their classes.
    strategy=cyclic (cyclic weight transfer, Chang et al. 2018): in each round the hospitals train
    one after another, in the aggregator's order (`strategy.relay_order`), each from the model the
    one before it returned; the round's model is `strategy.relay_model` of their replies in that
    order (the aggregator's `Aggregation`). Same steps per hospital and round as FedAvg; in a
    deployment the hospitals wait for each other, so a round takes as long as all their local
    training together.
    `relay_moments` (strategy=cyclic, keep-optimizer-state): the AdamW moments travel with the
    model, so each hospital continues the previous one's optimizer as pooled training would
    (one optimizer across all steps) instead of its own moments from its last visit.
    `steps_by_examples`: the round's local steps of all hospitals together (local-steps x
    hospitals) are shared out in proportion to their training images (at least one each), so
    every image is drawn about as often as in pooled training, instead of local-steps each.
    `federation_prior`: fine-tuning's balanced softmax uses the label prior of all hospitals'
    labelled images together (`federation_counts`) instead of each hospital's own.
    `finetune_batchnorm` frozen: fine-tuning steps normalise with the encoder's running
    BatchNorm statistics as the hospital received them, not each batch's own
    (`training.train_supervised`).
    `feature_noise` > 0: `FeatureStatisticsNoise` in every hospital's training steps (the
    server's model only scores, in eval mode, where it does nothing).
    `batch_renorm` (rmax, dmax, step): fine-tuning normalises every hospital's batches by the
    federation's statistics (`FederationBatchNorm`): before the first fine-tuning round the
    hospitals send the moments of `CALIBRATION_IMAGES` clean images under the current
    statistics, `CALIBRATION_PASSES` times (each pass fixes the statistics one layer deeper);
    after every visit (cyclic: before the next hospital gets the model) and every round the
    model's running statistics move `step` of the way to the combination of every hospital's
    latest moments (1: all the way; a fixed-point iteration through 49 layers that diverges
    undamped, as measured)."""
    cyclic = cfg.strategy == names.STRATEGY_CYCLIC
    if relay_moments and not (cyclic and cfg.keep_optimizer_state):
        raise ValueError("--relay-moments needs --strategy cyclic and --keep-optimizer-state true")
    if cyclic and fedbn:
        raise ValueError("strategy cyclic relays one model from hospital to hospital: no FedBN")
    num_classes = len(test.class_names)
    server = fresh_model(cfg, num_classes, feature_noise)  # the hospitals' copies keep its hooks
    state = copy.deepcopy(server.state_dict())
    hospitals = [copy.deepcopy(server) for _ in ssl_sites]
    if fixed_head:  # --fixed-head: no gradient ever reaches a hospital's classifier
        for model in hospitals:
            for p in model.classifier.parameters():
                p.register_hook(torch.zeros_like)
    moments = [{} if cfg.keep_optimizer_state else None for _ in ssl_sites]  # each hospital's AdamW, kept
    curve, comm, ssl_probe, update_norms = [], [], None, []
    optimizer = ServerOptimizer(cfg.server_lr, cfg.server_momentum)
    control, controls = {}, [{} for _ in ssl_sites]  # SCAFFOLD: the server's and each hospital's variates
    # --dp or --strategy: the aggregator's own aggregation (Flower's strategy classes, DP wrapper
    # and accountant), hospital i as node i + 1.
    private = Aggregation(cfg) if cfg.dp != names.DP_OFF or cfg.strategy != names.STRATEGY_FEDAVG else None
    if private is not None:
        private.population = len(ssl_sites)
        from flwr.supercore.task_identity import TaskIdentity  # Flower's Messages need what a ServerApp process sets
        for key in ("run_id", "node_id", "task_id"):
            if getattr(TaskIdentity, f"_{key}") is None:
                setattr(TaskIdentity, key, 0)
    stopped = None
    tail: list[dict[str, torch.Tensor]] = []  # the last `tail_average` global fine-tuning states
    bn_keys = {k for k in state if k.rpartition(".")[0] in training.encoder_batchnorms(server)} if fedbn else set()
    started: set[int] = set()  # --fedbn: hospitals that have trained once (and keep their BatchNorm layers from then on)
    bn_images = None  # --bn-diagnostic: the pooled training images, built at the first fine-tuning round
    trained_in: set[tuple[str, int]] = set()  # (phase, hospital): --moon-mu needs a previous local model of the phase
    prior_counts = federation_counts(ft_sites) if federation_prior else None  # --balanced-prior federation
    fed_moments: dict[int, tuple[dict, int]] = {}  # --batch-renorm: each hospital's latest moments and its images
    fed_stats: dict[str, np.ndarray] = {}  # --batch-renorm: the federation's statistics, as the next visit gets them

    def renorm_step() -> None:  # the federation's statistics a step toward what the latest moments say
        step = batch_renorm[2]
        for k, v in FederationBatchNorm.combine(list(fed_moments.values())).items():
            fed_stats[k] = v if k not in fed_stats else (1 - step) * fed_stats[k] + step * v
    for phase, rnd in schedule(cfg):
        if batch_renorm and phase == names.PHASE_FINETUNE and not fed_moments:
            for _ in range(CALIBRATION_PASSES):
                server.load_state_dict(state)
                for i, site in enumerate(ft_sites):
                    fed_moments[i] = (FederationBatchNorm.calibrate(server, site.train_images[:CALIBRATION_IMAGES]),
                                      len(site.train_images))
                if not fed_stats:  # the model's own statistics are where the steps start
                    fed_stats.update({k: state[k].numpy().copy() for k in FederationBatchNorm.combine(list(fed_moments.values()))})
                renorm_step()
                for k, v in fed_stats.items():
                    state[k] = torch.from_numpy(np.asarray(v, dtype=np.float32)).to(state[k].dtype)
        shared = training.shared_groups(phase, cfg.share, cfg.finetune_mode)
        sites = ssl_sites if phase == names.PHASE_SSL else ft_sites
        current = records.state_arrays(state, shared)  # the round's global model, as every hospital gets it
        mu = fedprox_mu if phase == names.PHASE_FINETUNE else 0.0
        if private is not None:
            try:
                extra = private.configure(phase, rnd, current, list(range(1, len(sites) + 1)))
                mu = float(extra.get(records.PROXIMAL_MU, mu))  # strategy=fedprox: Flower's train config says mu
            except PrivacyBudgetExhausted as exc:  # as the aggregator: stop before the round, keep the last model
                stopped = f"{phase} round {rnd}: {exc}"
                print(f"    privacy budget reached, stopped before {stopped}", flush=True)
                break
        updates, traffic, deltas, norms, arrived, confident = [], {}, [], {}, {}, {}
        order = list(range(len(sites)))
        if cyclic:  # as the aggregator relays: a fresh order every round, so no hospital is always the last
            order = relay_order(order, cfg.seed, phase, rnd)
        baton = current  # cyclic: the model the previous hospital returned
        steps = site_steps(sites, cfg.local_steps) if steps_by_examples else [cfg.local_steps] * len(sites)
        for i in order:
            site, model, kept = sites[i], hospitals[i], moments[0 if relay_moments else i]
            down, sent = wire(baton if cyclic else current, cfg.update_encoding)
            previous = copy.deepcopy(model.encoder) if moon[0] and phase == names.PHASE_FINETUNE and (phase, i) in trained_in else None
            records.load_arrays(model, {k: v for k, v in down.items() if k not in bn_keys} if i in started else down)
            started.add(i)
            trained_in.add((phase, i))
            contrast = (training.Contrast(copy.deepcopy(model.encoder), previous, mu=moon[0], temperature=moon[1])
                        if previous is not None else None)
            drift = None
            if scaffold and phase == names.PHASE_FINETUNE:
                mine = controls[i]
                drift = {"correction": {n: c - mine.get(n, 0) for n, c in control.items()}}
            site_task = task.get(site.hospital, task[""]) if isinstance(task, dict) else task
            mixed = None
            if joint[0] and phase == names.PHASE_FINETUNE:
                everything = ssl_sites[i]
                mixed = training.Joint(ssl_methods.build(site_task, model, colour_jitter=cfg.ssl_colour_jitter,
                                                         groups=everything.train_groups),
                                       everything.train_images, weight=joint[0], batch_size=joint[1],
                                       batchnorm=joint[2])
            elif pseudo[0] and phase == names.PHASE_FINETUNE:
                mixed = training.PseudoLabel(ssl_sites[i].train_images, weight=pseudo[0], threshold=pseudo[1],
                                             batch_size=pseudo[2], batchnorm=pseudo[3], truth=ssl_sites[i].train_labels)
            renorm = (FederationBatchNorm(model, batch_renorm[0], batch_renorm[1]) if batch_renorm and phase == names.PHASE_FINETUNE
                      else contextlib.nullcontext())
            with renorm:
                m = local.train_round(model, site, site_task, phase, dataclasses.replace(cfg, local_steps=steps[i]),
                                      local.round_seed(cfg.seed, phase, rnd), rnd, kept, drift, mu,
                                      contrast=contrast, joint=mixed, class_counts=prior_counts,
                                      batchnorm=finetune_batchnorm if phase == names.PHASE_FINETUNE else names.SSL_BATCHNORM_ADAPT)
            if isinstance(renorm, FederationBatchNorm):
                fed_moments[i] = (renorm.moments(), len(site.train_images))
            if isinstance(mixed, training.PseudoLabel):
                confident[site.hospital] = {"share": mixed.confident / max(mixed.drawn, 1),
                                            "accuracy": mixed.correct / mixed.confident if mixed.confident else None,
                                            "classes": {test.class_names[c]: n for c, n in sorted(mixed.classes.items())}}
            if drift is not None and "gradients" in drift:
                deltas.append({n: g - controls[i].get(n, 0) for n, g in drift["gradients"].items()})
                controls[i] = drift["gradients"]
            trained = records.state_arrays(model.state_dict(), shared)
            norms[site.hospital] = update_norm(trained, down)
            reply = trained
            if cfg.dp == names.DP_LOCAL:  # --dp local: clipped and noised at the hospital, as client_app does
                reply = local_dp.release(reply, down, cfg)
            if attack.active and site.hospital == attacker:
                reply = misbehave(attack, reply, down)
            up, received = wire(reply, cfg.update_encoding)
            if isinstance(renorm, FederationBatchNorm):  # the federation's statistics with this hospital's new moments
                renorm_step()
                up = {**up, **{k: v.astype(np.float32) for k, v in fed_stats.items() if k in up}}
            if cyclic:
                baton = up
            arrived[site.hospital] = update_norm(up, down)
            updates.append((up, 1 if uniform_weights else m[names.M_EXAMPLES]))
            traffic[site.hospital] = {"train_sent": sent, "train_received": received}
        for n in {n for d in deltas for n in d}:  # every hospital takes part: c += mean of their changes
            control[n] = control.get(n, 0) + sum(d[n] for d in deltas) / len(deltas)
        if private is not None:
            new = private.aggregate(phase, rnd, current,
                                    [(i + 1, up, n) for i, (up, n) in enumerate(updates)])
            if private.dp:
                print(f"    privacy: epsilon {private.privacy_spent()['epsilon']:.3f} at delta {cfg.dp_delta:g}", flush=True)
        else:
            average = weighted_average(updates)
            new = optimizer.step({k: state[k].numpy() for k in average}, average, phase)
        if batch_renorm and phase == names.PHASE_FINETUNE:
            new = {**new, **{k: v.astype(np.float32) for k, v in fed_stats.items() if k in new}}
        arrived = {"hospitals": arrived, "global": update_norm(new, current)}
        facts = private.facts if private is not None else {}
        if facts:  # strategy=median-cosine: each hospital's cosine with the others' median update, who was left out
            arrived["cosines"] = {sites[node - 1].hospital: c for node, c in facts["cosines"].items()}
            arrived["left_out"] = [sites[node - 1].hospital for node in facts["left_out"]]
            print(f"    {phase} round {rnd}: cosine to the others' median update "
                  + ", ".join(f"{h} {c:+.3f}" for h, c in arrived["cosines"].items())
                  + (f"; left out: {', '.join(arrived['left_out'])}" if arrived["left_out"] else ""), flush=True)
        for key, value in new.items():
            state[key] = torch.from_numpy(np.asarray(value)).to(state[key].dtype).reshape(state[key].shape)
        comm.append({"phase": phase, "round": rnd, "hospitals": traffic, "update_norms": arrived})
        update_norms.append({"phase": phase, "round": rnd, "hospitals": norms})
        server.load_state_dict(state)
        if phase == names.PHASE_SSL and rnd == cfg.ssl_rounds:
            ssl_probe = probe(server, pooled_data(ft_sites), val, cfg)
        if phase == names.PHASE_FINETUNE:
            curve.append({"round": rnd, **headline(scores(server, test, tta=cfg.test_time_augmentation))})
            if confident:
                curve[-1]["pseudo_labels"] = confident
                print("    pseudo-labels: confident share (their accuracy) " + ", ".join(
                    f"{h} {c['share']:.2f} ({'-' if c['accuracy'] is None else format(c['accuracy'], '.2f')})"
                    for h, c in confident.items()), flush=True)
            if tail_average > 1:
                tail = (tail + [copy.deepcopy(state)])[-tail_average:]
                if len(tail) > 1:
                    curve[-1]["tail_average"] = {"rounds": len(tail), **headline(scores(averaged_model(server, tail), test, tta=cfg.test_time_augmentation))}
            if bn_diagnostic:  # the same model with BatchNorm statistics recomputed over every site's images
                if bn_images is None:  # every site's training images, concatenated once for the whole run
                    bn_images = pooled_data(ssl_sites).train_images
                curve[-1]["bn_recomputed"] = bn_recomputed_scores(server, bn_images, test, cfg)
            if fedbn:
                curve[-1]["personalised"] = personalised_scores(hospitals, fedbn, cfg)
                print(f"    fedbn: personalised models {curve[-1]['personalised'][names.M_BALANCED_ACCURACY]:.3f}", flush=True)
        print(f"    {phase} round {rnd}: " + (f"balanced accuracy {curve[-1][names.M_BALANCED_ACCURACY]:.3f}"
                                              + (f" (BN recomputed {curve[-1]['bn_recomputed'][names.M_BALANCED_ACCURACY]:.3f})" if bn_diagnostic else "")
                                              if phase == names.PHASE_FINETUNE else "done"), flush=True)
    extra = {"update_norms": update_norms}
    if tta and cfg.finetune_rounds:
        extra["tta_test"] = tta_scores(server, test)
    if head_check and cfg.finetune_rounds:
        extra["head_diagnostic"] = head_diagnostic(server, ft_sites, test, cfg)
    if site_prior and cfg.finetune_rounds:
        extra["site_prior"] = site_prior_scores(server, site_prior, ft_sites, site_batchnorm, cfg.batch_size)
    if fedbn and cfg.finetune_rounds:
        extra["fedbn"] = {"batchnorm_keys": len(bn_keys), "personalised": curve[-1]["personalised"],
                          "bn_recomputed": bn_recomputed_scores(server, pooled_data(ft_sites).train_images, test, cfg),
                          "note": "test: the global model (BatchNorm layers averaged); personalised: each site's own model "
                                  "on its own split; bn_recomputed: the global model's statistics over the pooled training images"}
        print(f"    fedbn: global {extra['fedbn']['bn_recomputed'][names.M_BALANCED_ACCURACY]:.3f} with BatchNorm recomputed", flush=True)
    if private is not None and cfg.dp != names.DP_OFF:
        extra |= {"privacy": private.privacy_spent(), "stopped_by_privacy_budget": stopped}
    if not cfg.finetune_rounds:  # SSL only: the encoder is scored by probes
        return {"ssl_probe_val": ssl_probe, "ssl_probe_test": probe(server, pooled_data(ft_sites), test, cfg), "communication": comm,
                **extra}
    if tail_average > 1:
        final = averaged_model(server, tail)
        return {"test": scores(final, test, val, cfg.test_time_augmentation), "ssl_probe_val": ssl_probe, "curve": curve, "communication": comm,
                "tail_average": {"k": tail_average, "rounds": [c["round"] for c in curve][-len(tail):],
                                 "weights": "uniform", "batchnorm": "running statistics averaged",
                                 "last_round_test": headline(scores(server, test, tta=cfg.test_time_augmentation)),
                                 "bn_recomputed_test": bn_recomputed_scores(final, pooled_data(ft_sites).train_images, test, cfg)},
                **extra}
    return {"test": scores(server, test, val, cfg.test_time_augmentation), "ssl_probe_val": ssl_probe, "curve": curve, "communication": comm, **extra}


def site_prior_scores(model: FedSSLModel, splits: list[HospitalData], train_sites: list[HospitalData],
                      site_batchnorm: bool = False, batch_size: int = 64) -> dict:
    """The pooled held-out split scored with each image's probabilities adjusted to its own
    site's label mix (`--site-prior`, a diagnostic): the softmax (averaged over the views with
    test-time augmentation) times the site's training label prior over the federation's,
    renormalised (the prior correction for label shift of Saerens et al. 2002). Balanced softmax
    with each hospital's own prior trains logits whose softmax is the site's posterior divided
    by the site's prior, so the site's label mix is left out; this puts it back for a caller
    whose site is known, scored by the federation's prior as balanced accuracy asks. Pooled
    training's model reads the site from the images' look instead. `splits[i]` is the held-out
    split of `train_sites[i]`'s hospital; priors come from the labelled training images. The
    adjustment is the served one (`fedssl_core.label_shift`, `:predict?hospital=`)."""
    from fedssl_flower.metrics import classification_metrics

    if [s.hospital for s in splits] != [s.hospital for s in train_sites]:
        raise ValueError("site-prior scoring needs each training site's own held-out split, in the same order")
    ratios = label_shift.ratios({s.hospital: torch.bincount(s.train_labels, minlength=model.num_classes).tolist()
                                 for s in train_sites}, model.num_classes)  # what `:predict?hospital=` serves with
    out = {}
    for tta in (names.TTA_NONE, names.TTA_DIHEDRAL):
        probas, labels = [], []
        for split, site in zip(splits, train_sites):
            p = training.view_log_proba(training.predict_view_logits(model, split.test_images, tta)).exp().numpy()
            probas.append(label_shift.adjust(p, ratios[site.hospital]))
            labels.append(split.test_labels.numpy())
        m = classification_metrics(np.concatenate(labels), np.concatenate(probas), train_sites[0].class_names)
        out["tta_test" if tta == names.TTA_DIHEDRAL else "test"] = headline(m)
    print(f"    site prior: balanced accuracy {out['test'][names.M_BALANCED_ACCURACY]:.3f}, "
          f"with test-time augmentation {out['tta_test'][names.M_BALANCED_ACCURACY]:.3f}", flush=True)
    if site_batchnorm:
        out["site_batchnorm"] = site_batchnorm_scores(model, splits, train_sites, ratios, batch_size)
    return out


def site_batchnorm_scores(model: FedSSLModel, splits: list[HospitalData], train_sites: list[HospitalData],
                          ratios: dict[str, np.ndarray], batch_size: int) -> dict:
    """`--site-batchnorm` (with `--site-prior`, a diagnostic): each held-out image scored by a copy
    of `model` whose encoder BatchNorm statistics are recomputed over its own site's training
    images in batches of `batch_size` (SiloBN's inference, Andreux et al. 2020: a hospital's
    images normalised at serving as its own batches normalised them in training), as trained
    and with the site's label prior (`ratios`), with and without test-time augmentation."""
    from fedssl_flower.metrics import classification_metrics

    views: dict[str, list[np.ndarray]] = {names.TTA_NONE: [], names.TTA_DIHEDRAL: []}
    locals_ = []
    for split, site in zip(splits, train_sites):
        local = copy.deepcopy(model)
        training.recompute_batchnorm(local, site.train_images, batch_size=batch_size)
        locals_.append(local)
        for tta in views:
            views[tta].append(training.view_log_proba(training.predict_view_logits(local, split.test_images, tta)).exp().numpy())
    labels = np.concatenate([s.test_labels.numpy() for s in splits])
    out = {}
    for tta, probas in views.items():
        key = "tta_test" if tta == names.TTA_DIHEDRAL else "test"
        out[key] = headline(classification_metrics(labels, np.concatenate(probas), train_sites[0].class_names))
        adjusted = [label_shift.adjust(p, ratios[s.hospital]) for p, s in zip(probas, train_sites)]
        out["prior_" + key] = headline(classification_metrics(labels, np.concatenate(adjusted), train_sites[0].class_names))
    # A caller that names no hospital, routed to the hospital whose statistics its image fits best:
    # the KL divergence from the image's own per-channel mean and variance at the encoder's first
    # BatchNorm layer (its input comes before any BatchNorm, so it is the same whatever the
    # statistics) to each hospital's statistics of that layer; then served as that hospital.
    images = torch.cat([s.test_images for s in splits])
    truth = np.concatenate([np.full(len(s.test_images), i) for i, s in enumerate(splits)])
    route = stem_route(model, images, [next(iter(training.encoder_batchnorms(m).values())) for m in locals_])
    out["route_accuracy"] = float((route == truth).mean())
    out["route_confusion"] = [[int(((truth == i) & (route == j)).sum()) for j in range(len(splits))] for i in range(len(splits))]
    for tta in views:
        key = "tta_test" if tta == names.TTA_DIHEDRAL else "test"
        proba = np.zeros((len(images), len(train_sites[0].class_names)), dtype=np.float32)
        for i, (local, site) in enumerate(zip(locals_, train_sites)):
            chosen = np.flatnonzero(route == i)
            if len(chosen):
                p = training.view_log_proba(training.predict_view_logits(local, images[chosen], tta)).exp().numpy()
                proba[chosen] = label_shift.adjust(p, ratios[site.hospital])
        out["routed_prior_" + key] = headline(classification_metrics(labels, proba, train_sites[0].class_names))
    print("    site BatchNorm statistics: balanced accuracy " + ", ".join(
        f"{k} {v[names.M_BALANCED_ACCURACY]:.3f}" for k, v in out.items() if isinstance(v, dict))
        + f"; routed to the right site: {out['route_accuracy']:.3f}", flush=True)
    return out


@torch.no_grad()
def stem_route(model: FedSSLModel, images: torch.Tensor, layers: list[torch.nn.Module], batch_size: int = 256) -> np.ndarray:
    """Each image's index into `layers` (each hospital's copy of the encoder's first BatchNorm
    layer): the one whose running statistics are nearest the image's own per-channel mean and
    variance at that layer's input, by the KL divergence between the two diagonal Gaussians."""
    first = next(iter(training.encoder_batchnorms(model).values()))
    captured = []
    hook = first.register_forward_pre_hook(lambda _m, inp: captured.append(inp[0]))
    model.eval()
    try:
        choice = []
        for i in range(0, len(images), batch_size):
            captured.clear()
            model.encoder(training.normalize(images[i : i + batch_size], model.mean, model.std))
            x = captured[0]
            mu, var = x.mean((2, 3)), x.var((2, 3))
            # both variances with the layer's eps, as BatchNorm divides by them: a channel that is
            # nearly constant everywhere then says nothing instead of everything
            kl = torch.stack([0.5 * (torch.log((m.running_var + m.eps) / (var + m.eps))
                                     + (var + m.eps + (mu - m.running_mean) ** 2) / (m.running_var + m.eps) - 1).sum(1)
                              for m in layers], 1)
            choice.append(kl.argmin(1))
    finally:
        hook.remove()
    return torch.cat(choice).numpy()


def federation_counts(sites: list[HospitalData]) -> torch.Tensor:
    """Every site's labelled training images counted by class: `--balanced-prior federation`."""
    return sum(torch.bincount(s.train_labels, minlength=len(s.class_names)) for s in sites)


def site_steps(sites: list[HospitalData], local_steps: int) -> list[int]:
    """`local_steps` x len(sites) steps shared out in proportion to each site's training images
    (at least one each): `--steps-by-examples`."""
    sizes = [len(s.train_images) for s in sites]
    return [max(1, round(local_steps * len(sites) * n / sum(sizes))) for n in sizes]


def bn_recomputed_scores(model: FedSSLModel, images: torch.Tensor, test: HospitalData, cfg: RunConfig) -> dict:
    """Headline metrics of a copy of `model` with its BatchNorm statistics recomputed over `images`
    (what a statistics-only round would give); `model` itself is left as it is."""
    recal = copy.deepcopy(model)
    training.recompute_batchnorm(recal, images)
    return headline(scores(recal, test, tta=cfg.test_time_augmentation))


def personalised_scores(models: list[FedSSLModel], splits: list[HospitalData], cfg: RunConfig) -> dict:
    """Headline metrics of every site's own model on its own held-out split, the predictions of all
    sites scored together (what personalised federated learning reports)."""
    from fedssl_flower.metrics import classification_metrics

    proba = torch.cat([training.view_log_proba(training.predict_view_logits(m, s.test_images, cfg.test_time_augmentation)).exp()
                       for m, s in zip(models, splits)]).numpy()
    labels = torch.cat([s.test_labels for s in splits]).numpy()
    return headline(classification_metrics(labels, proba, splits[0].class_names))


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform average of state dicts (Polyak/SWA-style tail averaging of global models):
    floating tensors, BatchNorm running means and variances included, are averaged; integer
    ones (BatchNorm's num_batches_tracked) are taken from the last state."""
    return {k: (torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone())
            for k, v in states[-1].items()}


def averaged_model(server: FedSSLModel, states: list[dict[str, torch.Tensor]]) -> FedSSLModel:
    model = copy.deepcopy(server)
    model.load_state_dict(average_states(states))
    return model


def centralised(ssl_data: HospitalData, ft_data: HospitalData, test: HospitalData, val: HospitalData,
                cfg: RunConfig, task: str, steps_per_round: int, tta: bool = False,
                finetune_batchnorm: str = names.SSL_BATCHNORM_ADAPT, feature_noise: float = 0.0) -> dict:
    """One model on one data set: the federation's rounds with `steps_per_round` steps each.
    `tta`: the final model is also scored with test-time augmentation (`tta_scores`).
    `finetune_batchnorm`: fine-tuning's BatchNorm mode (`training.train_supervised`).
    `feature_noise`: `FeatureStatisticsNoise` in its training steps."""
    cfg = dataclasses.replace(cfg, local_steps=steps_per_round)
    model = fresh_model(cfg, len(test.class_names), feature_noise)
    curve, ssl_probe = [], None
    moments = {} if cfg.keep_optimizer_state else None
    for phase, rnd in schedule(cfg):
        data = ssl_data if phase == names.PHASE_SSL else ft_data
        local.train_round(model, data, task, phase, cfg, local.round_seed(cfg.seed, phase, rnd), rnd, moments,
                          batchnorm=finetune_batchnorm if phase == names.PHASE_FINETUNE else names.SSL_BATCHNORM_ADAPT)
        if phase == names.PHASE_SSL and rnd == cfg.ssl_rounds:
            ssl_probe = probe(model, ft_data, val, cfg)
        if phase == names.PHASE_FINETUNE:
            curve.append({"round": rnd, **headline(scores(model, test, tta=cfg.test_time_augmentation))})
            print(f"    {phase} round {rnd}: balanced accuracy {curve[-1][names.M_BALANCED_ACCURACY]:.3f}", flush=True)
    out = {"test": scores(model, test, val, cfg.test_time_augmentation), "ssl_probe_val": ssl_probe, "curve": curve}
    if tta and cfg.finetune_rounds:
        out["tta_test"] = tta_scores(model, test)
    return out


def site_batches(sites: list[HospitalData], test: HospitalData, val: HospitalData, cfg: RunConfig, task: str,
                 tta: bool = False, federation_prior: bool = False, finetune_batchnorm: str = names.SSL_BATCHNORM_ADAPT,
                 feature_noise: float = 0.0) -> dict:
    """Fine-tuning only, as pooled training with the same steps and one AdamW, except that every
    batch comes from one site: each step draws a site with probability proportional to its
    training images and takes one step on its images, its own class prior in the balanced
    softmax (what a hospital's step computes). The limit of cyclic weight transfer with one-step
    visits and the optimizer travelling with the model, so it splits the gap between cyclic and
    pooled training into what site-pure batches cost and what runs of steps at one site cost.
    Scored once per `local_steps` x sites steps (a pooled round). `federation_prior`: the balanced
    softmax uses every site's labels' prior (`federation_counts`), as pooled training does.
    `finetune_batchnorm`: the steps' BatchNorm mode (`training.train_supervised`).
    `feature_noise`: `FeatureStatisticsNoise` in its steps."""
    per_round = cfg.local_steps * len(sites)
    total = per_round * cfg.finetune_rounds
    step_cfg = dataclasses.replace(cfg, local_steps=1, ssl_rounds=0, finetune_rounds=total)
    model = fresh_model(cfg, len(test.class_names), feature_noise)
    moments = {} if cfg.keep_optimizer_state else None
    g = torch.Generator().manual_seed(cfg.seed)
    sizes = torch.tensor([float(len(s.train_images)) for s in sites])
    curve, drawn = [], [0] * len(sites)
    prior_counts = federation_counts(sites) if federation_prior else None
    for step in range(1, total + 1):
        i = int(torch.multinomial(sizes, 1, generator=g))
        drawn[i] += 1
        local.train_round(model, sites[i], task, names.PHASE_FINETUNE, step_cfg, local.round_seed(cfg.seed, names.PHASE_FINETUNE, step),
                          step, moments, class_counts=prior_counts,
                          batchnorm=finetune_batchnorm)
        if step % per_round == 0:
            curve.append({"round": step // per_round, **headline(scores(model, test, tta=cfg.test_time_augmentation))})
            print(f"    site batches, {step} steps: balanced accuracy {curve[-1][names.M_BALANCED_ACCURACY]:.3f}", flush=True)
    out = {"test": scores(model, test, val, cfg.test_time_augmentation), "curve": curve,
           "steps_by_site": {s.hospital: n for s, n in zip(sites, drawn)}}
    if tta:
        out["tta_test"] = tta_scores(model, test)
    return out


def site_mixed(sites: list[HospitalData], test: HospitalData, val: HospitalData, cfg: RunConfig,
               tta: bool = False, feature_noise: float = 0.0, federation_prior: bool = False,
               weights: str = "uniform", batchnorm: str = "site",
               finetune_batchnorm: str = names.SSL_BATCHNORM_ADAPT) -> dict:
    """Fine-tuning only, as pooled training with the same steps of `--batch-size` images and one
    AdamW, except that every batch is one equal sub-batch from each site (`batch-size` / sites
    images), each normalised by its own BatchNorm statistics and scored with its own site's
    prior in the balanced softmax, and the step follows the mean of the sites' losses. That is
    the computation of FedSGD (McMahan et al. 2017) with an AdamW step at the aggregator: every
    round each hospital computes one gradient on its own images from the same model and the
    aggregator applies their mean. So it says what a federation that mixes the sites within
    every step reaches, against pooled training (mixed batches) and `site_batches` (one site a
    step); its price in a deployment would be one exchange per step. The encoder's BatchNorm
    running statistics follow the sub-batches in turn (momentum 0.1 each), where FedSGD would
    average the hospitals'. Scored once per `local_steps` x sites steps (a pooled round).
    `weights`: the sites' losses count equally (`uniform`) or by their training images
    (`examples`, FedSGD's weighting: the step's gradient is then pooled training's expected
    gradient). `federation_prior`: every sub-batch's balanced softmax uses the prior of all
    sites' labels (`federation_counts`), as pooled training's does. `batchnorm`: each site's
    sub-batch normalised by its own statistics (`site`, what a federation computes) or the
    sub-batches concatenated into one forward pass normalised by their joint statistics
    (`joint`: pooled training with the batch stratified by site; no federation computes it,
    so it isolates what per-site normalisation costs). `finetune_batchnorm` frozen: the
    encoder's BatchNorm layers run in eval mode instead (`training.train_supervised`), every
    sub-batch normalised by the running statistics the model came with: FedSGD with every
    site's images normalised alike, which a federation can compute."""
    if weights not in ("uniform", "examples"):
        raise ValueError(f"site-mixed weights must be uniform or examples, got {weights!r}")
    if batchnorm not in ("site", "joint"):
        raise ValueError(f"site-mixed batchnorm must be site or joint, got {batchnorm!r}")
    if cfg.finetune_loss != names.LOSS_BALANCED_SOFTMAX or cfg.finetune_mode != names.FINETUNE_FULL:
        raise ValueError(f"arm site-mixed trains with --finetune-loss {names.LOSS_BALANCED_SOFTMAX} and --finetune-mode "
                         f"{names.FINETUNE_FULL} only (got {cfg.finetune_loss}, {cfg.finetune_mode})")
    sub = cfg.batch_size // len(sites)
    if sub < 2:
        raise ValueError(f"arm site-mixed needs --batch-size of at least 2 images per site ({len(sites)} sites), "
                         f"got {cfg.batch_size}: a sub-batch of one cannot be normalised by its own statistics")
    per_round = cfg.local_steps * len(sites)
    total = per_round * cfg.finetune_rounds
    model = fresh_model(cfg, len(test.class_names), feature_noise)
    plan = training.Schedule(lr=cfg.finetune_lr or cfg.lr, steps=total, kind=cfg.lr_schedule, total=total)
    params = training._prepare(model, training.trainable_groups(names.PHASE_FINETUNE, None, mode=cfg.finetune_mode))
    optimizer = training._optimizer(params, plan, cfg.weight_decay)
    g = torch.Generator().manual_seed(local.round_seed(cfg.seed, names.PHASE_FINETUNE, 1))
    draws = [plan.batches(len(s.train_images), sub, g, min_size=2) for s in sites]
    counts = [federation_counts(sites) if federation_prior else torch.bincount(s.train_labels, minlength=model.num_classes)
              for s in sites]
    adjust = [training.balanced_log_prior(c) for c in counts]
    sizes = [float(len(s.train_images)) for s in sites]
    share = [1 / len(sites)] * len(sites) if weights == "uniform" else [n / sum(sizes) for n in sizes]
    curve, step = [], 0
    for rnd in range(1, cfg.finetune_rounds + 1):
        training._prepare(model, training.trainable_groups(names.PHASE_FINETUNE, None, mode=cfg.finetune_mode))
        training._hold_batchnorm_statistics(model, finetune_batchnorm)
        training._channels_last(model, True)
        with training._Checkpointing(model, cfg.activation_checkpointing) as steps:
            for _ in range(per_round):
                training._set_lr(optimizer, plan.lr_at(step))
                optimizer.zero_grad(set_to_none=True)
                picked, xs = [], []
                for site, draw in zip(sites, draws):  # each site's draw, then its view: one generator, in turn
                    picked.append(next(draw))
                    xs.append(training.supervised_view(site.train_images[picked[-1]], cfg.augment, g, model.mean, model.std))
                if batchnorm == "joint":
                    joint = model.classifier(model.encoder(torch.cat(xs).contiguous(memory_format=torch.channels_last)))
                    steps.backward(sum(F.cross_entropy(logits + adj, site.train_labels[idx]) * w for logits, site, idx, adj, w
                                       in zip(joint.split([len(idx) for idx in picked]), sites, picked, adjust, share)))
                else:
                    for site, idx, x, adj, w in zip(sites, picked, xs, adjust, share):
                        logits = model.classifier(model.encoder(x.contiguous(memory_format=torch.channels_last)))
                        steps.backward(F.cross_entropy(logits + adj, site.train_labels[idx]) * w)
                optimizer.step()
                step += 1
        training._channels_last(model, False)
        curve.append({"round": rnd, **headline(scores(model, test, tta=cfg.test_time_augmentation))})
        print(f"    site-mixed, {step} steps: balanced accuracy {curve[-1][names.M_BALANCED_ACCURACY]:.3f}", flush=True)
    out = {"test": scores(model, test, val, cfg.test_time_augmentation), "curve": curve,
           "images_per_site_per_step": sub, "site_weights": {s.hospital: w for s, w in zip(sites, share)}}
    if tta:
        out["tta_test"] = tta_scores(model, test)
    return out


def ssl_task_spec(text: str) -> dict[str, str]:
    """`--ssl-task`: "TASK[,SITE=TASK...]" as {"": TASK, SITE: TASK}."""
    first, *rest = [part.strip() for part in text.split(",")]
    out = {"": first}
    for part in rest:
        site, eq, task = part.partition("=")
        if not eq or not site:
            raise ValueError(f"{part!r}: expected SITE=TASK after the first task")
        out[site] = task
    for site, task in out.items():
        if task not in names.SSL_TASKS:
            raise ValueError(f"{(site + '=') if site else ''}{task}: expected one of {', '.join(names.SSL_TASKS)}")
    return out


def run_arm(spec: str, seed: int, sites: list[HospitalData], vals: list[HospitalData], test: HospitalData,
            base: RunConfig, bn_diagnostic: bool = False, scaffold: bool = False, fedprox_mu: float = 0.0,
            tail_average: int = 0, attack: Attack = Attack(), attacker: str = "", uniform_weights: bool = False,
            tta: bool = False, head_check: bool = False, fedbn: list[HospitalData] | None = None,
            fixed_head: bool = False, moon: tuple[float, float] = (0.0, 0.5),
            ssl_task: dict[str, str] | None = None, joint: tuple = (0.0, 32, names.SSL_BATCHNORM_ADAPT),
            pseudo: tuple = (0.0, 0.95, 32, names.SSL_BATCHNORM_FROZEN), relay_moments: bool = False,
            steps_by_examples: bool = False, federation_prior: bool = False,
            finetune_batchnorm: str = names.SSL_BATCHNORM_ADAPT, feature_noise: float = 0.0,
            site_mixed_batchnorm: str = "site", site_prior: list[HospitalData] | None = None,
            site_batchnorm: bool = False, batch_renorm: tuple[float, float, float] | None = None) -> dict:
    arm, _, frac = spec.partition("@")
    fraction = float(frac) if frac else 1.0
    ssl_task = ssl_task or {"": names.SSL_SIMCLR}  # "" = every site without a task of its own
    site_tasks = {s.hospital: ssl_task.get(s.hospital, ssl_task[""]) for s in sites}
    cfg = dataclasses.replace(base, seed=seed)
    val = pooled_data(vals, "pooled-val")
    labelled = [keep_labels(s, fraction, seed) for s in sites]
    no_ssl = {"ssl_rounds": 0, "finetune_rounds": base.finetune_rounds + 2 * base.ssl_rounds}
    variant = {"no-ssl": no_ssl, "random": {**no_ssl, "pretrained": False}, "random-ssl": {"pretrained": False},
               "fp16": {"update_encoding": "fp16"}, "int8": {"update_encoding": "int8"}}.get(arm, {})
    cfg = dataclasses.replace(cfg, **variant)
    t0 = time.perf_counter()
    if arm == "ssl-probe":
        out = federate(sites, labelled, test, val, dataclasses.replace(cfg, finetune_rounds=0), ssl_task,
                       attack=attack, attacker=attacker)
        out["test"] = out.pop("ssl_probe_test")
    elif arm == "probes":
        pooled = pooled_data(labelled)
        out = {"test": {}}
        for name, pretrained in (("random", False), ("start", True)):
            model = fresh_model(dataclasses.replace(cfg, pretrained=pretrained), len(test.class_names))
            out[f"probe_{name}"] = {"val": probe(model, pooled, val, cfg), "test": probe(model, pooled, test, cfg)}
        out["test"] = out["probe_start"]["test"]
    elif arm == "pooled":
        out = centralised(pooled_data(sites), pooled_data(labelled), test, val, cfg, ssl_task[""], cfg.local_steps * len(sites), tta,
                          finetune_batchnorm, feature_noise)
    elif arm == "site-batches":
        if cfg.ssl_rounds:
            raise ValueError("arm site-batches fine-tunes only: it needs --ssl-rounds 0")
        out = site_batches(labelled, test, val, cfg, ssl_task[""], tta, federation_prior, finetune_batchnorm, feature_noise)
        if federation_prior:
            out["balanced_prior"] = "federation"
    elif arm == "site-mixed":
        if cfg.ssl_rounds:
            raise ValueError("arm site-mixed fine-tunes only: it needs --ssl-rounds 0")
        out = site_mixed(labelled, test, val, cfg, tta, feature_noise, federation_prior,
                         "uniform" if not steps_by_examples else "examples", site_mixed_batchnorm, finetune_batchnorm)
        out["site_mixed_batchnorm"] = site_mixed_batchnorm
        if federation_prior:
            out["balanced_prior"] = "federation"
    elif arm == "local":
        per_site = {s.hospital: centralised(s, ls, test, val, cfg, site_tasks[s.hospital], cfg.local_steps * len(sites),
                                            feature_noise=feature_noise)
                    for s, ls in zip(sites, labelled)}
        out = {"sites": per_site,
               "test": {k: statistics.mean(r["test"][k] for r in per_site.values()) for k in (*HEADLINE, "ece")},
               "note": "test = mean over sites of each site-alone model on the pooled test"}
    else:
        out = federate(sites, labelled, test, val, cfg, ssl_task, bn_diagnostic, scaffold, fedprox_mu, tail_average,
                       attack, attacker, uniform_weights, tta, head_check, fedbn, fixed_head, moon, joint, pseudo,
                       relay_moments=relay_moments, steps_by_examples=steps_by_examples, federation_prior=federation_prior,
                       finetune_batchnorm=finetune_batchnorm, feature_noise=feature_noise, site_prior=site_prior,
                       site_batchnorm=site_batchnorm, batch_renorm=batch_renorm)
        if batch_renorm:
            out["batch_renorm"] = {"method": "Batch Renormalization against the federation's statistics (FederationBatchNorm)",
                                   "rmax": batch_renorm[0], "dmax": batch_renorm[1], "step": batch_renorm[2],
                                   "calibration": {"images_per_site": CALIBRATION_IMAGES, "passes": CALIBRATION_PASSES}}
        if relay_moments:
            out["relay_moments"] = True
        if scaffold:
            out["scaffold"] = True
        if federation_prior:
            out["balanced_prior"] = "federation"
        if steps_by_examples:
            out["local_steps_by_site"] = dict(zip((s.hospital for s in sites), site_steps(labelled, cfg.local_steps)))
        if moon[0]:
            out["moon"] = {"mu": moon[0], "temperature": moon[1]}
        if joint[0]:
            out["joint_ssl"] = {"weight": joint[0], "batch": joint[1], "batchnorm": joint[2],
                                "task": site_tasks}
        if pseudo[0]:
            out["pseudo_label"] = {"method": "FixMatch", "weight": pseudo[0], "threshold": pseudo[1], "batch": pseudo[2],
                                   "batchnorm": pseudo[3]}
        if fixed_head:
            out["fixed_head"] = True
        if uniform_weights:
            out["aggregation_weights"] = "uniform"
    if finetune_batchnorm != names.SSL_BATCHNORM_ADAPT and arm in (*FEDERATED_ARMS, "pooled", "site-batches", "site-mixed"):
        out["finetune_batchnorm"] = finetune_batchnorm
    if fedprox_mu and arm in FEDERATED_ARMS:
        out["fedprox_mu"] = fedprox_mu
    if cfg.ssl_rounds and arm not in ("probes",):
        out["ssl_task"] = ssl_task[""] if arm == "pooled" else site_tasks
    if arm in FEDERATED_ARMS + ("ssl-probe",):
        out["strategy"] = {"name": cfg.strategy, **aggregation.parameters(cfg)}
        if attack.active:
            out["attack"] = {"spec": str(attack), "hospital": attacker}
    out.update({"arm": spec, "label_fraction": fraction, "labelled_train_images": sum(len(s.train_labels) for s in labelled),
                "seed": seed, "seconds": time.perf_counter() - t0,
                "config": {k: v for k, v in cfg.as_dict().items() if k not in ("registry-url", "runs-dir", "data-warning")}})
    return out


# ---------------------------------------------------------------------------- output
def class_counts(train: HospitalData, val: HospitalData, full: HospitalData) -> dict[str, dict[str, int]]:
    """Images per class in a site's train, validation and test splits."""
    def count(labels: torch.Tensor) -> dict[str, int]:
        return {c: int((labels == i).sum()) for i, c in enumerate(full.class_names)}
    return {"train": count(train.train_labels), "val": count(val.test_labels), "test": count(full.test_labels)}


def _layout(site: HospitalData) -> dict:
    """Hospital folders: the folder and its folder -> class map (`load_hospital_folders`)."""
    return {"layout": site.audit["layout"]} if "layout" in site.audit else {}


def arm_rounds(spec: str, ssl_rounds: int, finetune_rounds: int) -> int:
    """The federated rounds an arm runs (each one private release under --dp), as `run_arm` sets them."""
    arm = spec.partition("@")[0]
    return finetune_rounds + 2 * ssl_rounds if arm in ("no-ssl", "random") else ssl_rounds + finetune_rounds


def key(run: dict) -> tuple:
    """What a rerun replaces: the same arm, seed, evaluation split, label, strategy and attack."""
    return (run["arm"], run["seed"], run.get("eval", "test"), run.get("label", ""),
            run.get("strategy", {}).get("name", names.STRATEGY_FEDAVG), run.get("attack", {}).get("spec", names.ATTACK_NONE))


def arm_name(run: dict) -> str:
    """The arm with its label; without one, with its strategy and attack when not the defaults."""
    if run.get("label"):
        return f"{run['arm']} [{run['label']}]"
    strategy, attack = run.get("strategy", {}).get("name", names.STRATEGY_FEDAVG), run.get("attack")
    variant = ([strategy] if strategy != names.STRATEGY_FEDAVG else []) + ([f"attack {attack['spec']} by {attack['hospital']}"] if attack else [])
    return run["arm"] + (f" [{', '.join(variant)}]" if variant else "")


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds, per arm (and label)."""
    out = {}
    for arm in dict.fromkeys(arm_name(r) for r in runs):
        vals = [r for r in runs if arm_name(r) == arm]
        out[arm] = {"seeds": [r["seed"] for r in vals], "minutes": statistics.mean(r["seconds"] for r in vals) / 60}
        for k in (*HEADLINE, "ece", "ece_temperature_scaled"):
            xs = [float(r["test"][k]) for r in vals if r["test"].get(k) is not None]
            if xs:
                out[arm][k] = {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
        tta = [r["tta_test"] for r in vals if r.get("tta_test")]
        if tta:  # --tta: the same models scored with dihedral test-time augmentation
            out[arm]["with_test_time_augmentation"] = {
                k: {"mean": statistics.mean(t[k] for t in tta), "std": statistics.stdev(t[k] for t in tta) if len(tta) > 1 else 0.0}
                for k in HEADLINE}
        comm = vals[0].get("communication")
        if comm:  # mean bytes per hospital per round (down + up), by phase
            out[arm]["bytes_per_hospital_per_round"] = {
                phase: statistics.mean(sum(h["train_sent"] + h["train_received"] for h in r["hospitals"].values()) / len(r["hospitals"])
                                       for r in rounds)
                for phase in names.PHASES if (rounds := [r for r in comm if r["phase"] == phase])
            }
        probes = [r["ssl_probe_val"] for r in vals if r.get("ssl_probe_val")]
        if probes:
            out[arm]["ssl_probe_val_balanced_accuracy"] = statistics.mean(p[names.M_BALANCED_ACCURACY] for p in probes)
            out[arm]["ssl_knn_val_balanced_accuracy"] = statistics.mean(p["knn_balanced_accuracy"] for p in probes)
    return out


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2` as integers; a clear exit for anything else or for none."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {text!r}: expected comma-separated integers") from None
    if not seeds:
        raise SystemExit("--seeds: give at least one seed")
    return seeds


# Arguments a run's command line leaves out (the command names its own arm and seed), and those it
# shows only when they differ from their defaults (variants and diagnostics; every other value is
# written out, so a command keeps its recipe when a default changes). Flags appear when set.
NOT_IN_COMMAND = ("data", "cache_dir", "out", "arms", "seeds")
ONLY_WHEN_SET = ("label", "label_map", "class_names", "fedprox_mu", "moon_mu", "moon_temperature", "tail_average",
                 "attack", "attacker", "exclude_site", "aggregation_weights", "joint_ssl_weight", "joint_ssl_batch",
                 "joint_ssl_batchnorm", "pseudo_label_weight", "pseudo_label_threshold", "pseudo_label_batch",
                 "pseudo_label_batchnorm", "feature_noise", "batch_renorm")


def rerun_command(ap: argparse.ArgumentParser, args: argparse.Namespace, spec: str, seed: int, folders: bool) -> str:
    """The command line that reruns one arm and seed of this invocation."""
    words = ["python -m bench.quality"]
    for k, v in vars(args).items():
        flag = "--" + k.replace("_", "-")
        if k in NOT_IN_COMMAND or (k in ONLY_WHEN_SET and v == ap.get_default(k)):
            continue
        if isinstance(v, bool):
            words += [flag] if v else []
        else:
            words.append(f"{flag} {shlex.quote(str(v))}")
    words.append(f"--arms {spec} --seeds {seed}")
    if folders:
        words.append(f"--data {shlex.quote(str(args.data))}")
    return " ".join(words)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ham10000")
    ap.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma list of {', '.join(ARMS)}, each optionally @FRACTION of labels")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the federated arm; the first one for the others")
    ap.add_argument("--eval", default="test", choices=("test", "val"), help="score on the pooled test or validation split")
    ap.add_argument("--val-fraction", type=float, default=0.15, help="validation lesions carved from each site's training split")
    ap.add_argument("--colour-constancy", type=float, default=0.0, metavar="POWER",
                    help="Shades of Gray colour constancy of every image (train, validation and test, every site) with "
                         "this Minkowski power (6 as in ISIC 2019's winners; 0 = off): the sites' illuminants divided out")
    ap.add_argument("--arch", default=names.ARCH_EFFICIENTNET_LITE0, choices=names.ARCHITECTURES)
    ap.add_argument("--pretrained", default="true", choices=("true", "false"), help="start from ImageNet weights")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--ssl-rounds", type=int, default=2)
    ap.add_argument("--finetune-rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=25, help="batches per site per round (the budget)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="SSL learning rate")
    ap.add_argument("--ssl-task", default=names.SSL_SIMCLR,
                    help="the hospitals' SSL task (node config ssl-task: simclr, rotation or micle, which pairs two images "
                         "of one lesion), then SITE=TASK for a site of its own: micle,vidir_molemax=simclr (that site "
                         "has one image per lesion); pooled training takes the first")
    ap.add_argument("--ssl-colour-jitter", type=float, default=RunConfig.ssl_colour_jitter,
                    help="SimCLR views' brightness/contrast/saturation jitter strength (run config ssl-colour-jitter; 0 = none)")
    ap.add_argument("--ssl-batchnorm", default=names.SSL_BATCHNORM_ADAPT, choices=names.SSL_BATCHNORM,
                    help="SSL rounds: the encoder's BatchNorm statistics adapt to the views or stay frozen (run config ssl-batchnorm)")
    ap.add_argument("--share", default=names.SHARE_ENCODER, choices=names.SHARE_MODES,
                    help="what SSL rounds share (run config share): encoder, encoder-and-heads, projection-head")
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--lr-schedule", default=names.SCHEDULE_COSINE, choices=names.LR_SCHEDULES)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--keep-optimizer-state", default="true", choices=("true", "false"),
                    help="hospitals (and pooled training) keep their fine-tuning AdamW moments across rounds")
    ap.add_argument("--server-lr", type=float, default=1.0, help="the aggregator's step on the averaged update (1 = FedAvg)")
    ap.add_argument("--server-momentum", type=float, default=0.0, help="server heavy-ball momentum (FedAvgM)")
    ap.add_argument("--finetune-loss", default=names.LOSS_BALANCED_SOFTMAX, choices=names.FINETUNE_LOSSES)
    ap.add_argument("--finetune-mode", default=names.FINETUNE_FULL, choices=names.FINETUNE_MODES,
                    help="fine-tuning rounds train encoder + classifier (full) or the classifier alone on the frozen encoder (linear, at --probe-lr)")
    ap.add_argument("--probe-lr", type=float, default=RunConfig.probe_lr,
                    help="learning rate of linear fine-tuning rounds and of the SSL-round probe")
    ap.add_argument("--augment", default=names.AUGMENT_FLIPS, choices=names.AUGMENTS,
                    help="fine-tuning augmentation (run config augment)")
    ap.add_argument("--head-warmup-epochs", type=int, default=0,
                    help="fine-tune round 1: each hospital first fits the classifier on frozen features (run config head-warmup-epochs)")
    ap.add_argument("--aggregation-weights", default="examples", choices=("examples", "uniform"),
                    help="federated arms, strategy=fedavg: weigh each hospital's model by its training images (FedAvg) "
                         "or equally (every hospital trains the same local-steps; bench only)")
    ap.add_argument("--test-time-augmentation", default=names.TTA_NONE, choices=names.TTA_MODES,
                    help="score as the product serves with run config test-time-augmentation (dihedral: the softmax "
                         "averaged over the 8 flips and 90-degree turns)")
    ap.add_argument("--tta", action="store_true",
                    help="also score the final model with test-time augmentation: softmax averaged over the 8 flips "
                         "and 90-degree turns (bench only)")
    ap.add_argument("--label-map", default="", help="hospital folders: folder=class / hospital:folder=class entries, JSON or "
                    "a file, as for deploy-local.sh (e.g. 'tata-memorial-mumbai:Normal=notumor')")
    ap.add_argument("--class-names", default="", help="hospital folders: the class list, in order (comma list)")
    ap.add_argument("--max-images-per-site", type=int, default=0, help="cap per site before the split (0 = all; for smoke runs)")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("FEDSSL_HOME", ".fedssl")) / "cache")
    ap.add_argument("--label", default="", help="names a variant (e.g. a lever under test): runs are keyed by arm, seed, eval and label")
    ap.add_argument("--scaffold", action="store_true", help="federated arms: SCAFFOLD drift correction in fine-tuning (bench only)")
    ap.add_argument("--fedprox-mu", type=float, default=0.0,
                    help="federated arms: FedProx proximal term mu/2 ||w - w_global||^2 in fine-tuning (training.proximal_term, "
                         "what strategy=fedprox proximal-mu adds at the hospitals; 0 = off)")
    ap.add_argument("--moon-mu", type=float, default=0.0,
                    help="federated arms: MOON's model-contrastive term in fine-tuning, this weight (training.Contrast; "
                         "bench only; 0 = off)")
    ap.add_argument("--moon-temperature", type=float, default=0.5, help="--moon-mu: the contrastive temperature")
    ap.add_argument("--joint-ssl-weight", type=float, default=0.0,
                    help="federated arms: S4L, every fine-tuning step also adds this weight times the --ssl-task loss on "
                         "--joint-ssl-batch of the hospital's training images, labelled or not (training.Joint)")
    ap.add_argument("--joint-ssl-batch", type=int, default=32, help="--joint-ssl-weight: images drawn per step")
    ap.add_argument("--joint-ssl-batchnorm", default=names.SSL_BATCHNORM_ADAPT, choices=names.SSL_BATCHNORM,
                    help="--joint-ssl-weight: whether the term's views move the encoder's BatchNorm running statistics "
                         "(adapt) or leave them to the labelled batches (frozen: momentum 0 during the term)")
    ap.add_argument("--pseudo-label-weight", type=float, default=0.0,
                    help="federated arms: FixMatch, every fine-tuning step also adds this weight times the cross-entropy "
                         "of strongly augmented views of --pseudo-label-batch of the hospital's training images, labelled "
                         "or not, toward the model's own confident predictions on weak views (training.PseudoLabel)")
    ap.add_argument("--pseudo-label-threshold", type=float, default=0.95,
                    help="--pseudo-label-weight: the probability a prediction needs to become a pseudo-label")
    ap.add_argument("--pseudo-label-batch", type=int, default=32, help="--pseudo-label-weight: images drawn per step")
    ap.add_argument("--pseudo-label-batchnorm", default=names.SSL_BATCHNORM_FROZEN, choices=names.SSL_BATCHNORM,
                    help="--pseudo-label-weight: whether the strong views move the encoder's BatchNorm running statistics")
    ap.add_argument("--tail-average", type=int, default=0, metavar="K",
                    help="federated arms: score the uniform average of the last K fine-tuning rounds' global models "
                         "(BatchNorm running statistics averaged) instead of the last one (bench only; 0 or 1 = off)")
    ap.add_argument("--bn-diagnostic", action="store_true", help="federated arms: also score every round with BatchNorm statistics recomputed")
    ap.add_argument("--dp", default=names.DP_OFF, choices=names.DP_MODES,
                    help="federated arms: client-level DP by Flower's fixed-clipping wrapper and RDP accountant (run config dp)")
    ap.add_argument("--dp-noise-multiplier", type=float, default=1.0)
    ap.add_argument("--dp-clipping-norm", type=float, default=1.0)
    ap.add_argument("--dp-delta", type=float, default=1e-5)
    ap.add_argument("--dp-max-epsilon", type=float, default=0.0, help="stop before the round that would pass it (0 = no cap)")
    ap.add_argument("--dp-target-quantile", type=float, default=0.5, help="--dp central-adaptive: the update-norm quantile tracked")
    ap.add_argument("--dp-clip-norm-lr", type=float, default=0.2, help="--dp central-adaptive: the norm's geometric learning rate")
    ap.add_argument("--dp-clipped-count-stddev", type=float, default=0.0,
                    help="--dp central-adaptive: noise on the clipped count (0 = Flower's default, hospitals / 20)")
    ap.add_argument("--dp-local-epsilon", type=float, default=0.5, help="--dp local: each hospital's epsilon per round, in (0, 1)")
    ap.add_argument("--dp-target-epsilon", type=float, default=0.0,
                    help="set --dp-noise-multiplier to the smallest one whose epsilon at --dp-delta after all the arm's "
                         "rounds is at most this (Flower's accountant, bisection; 0 = use --dp-noise-multiplier)")
    ap.add_argument("--strategy", default=names.STRATEGY_FEDAVG, choices=names.STRATEGIES,
                    help="federated arms: run config strategy, aggregated by the product's aggregation.Aggregation "
                         "(Flower's strategy class of that name); fedavg = weighted_average and the server step")
    ap.add_argument("--trim-beta", type=float, default=RunConfig.trim_beta, help="fedtrimmedavg: fraction cut from each end")
    ap.add_argument("--num-malicious-nodes", type=int, default=RunConfig.num_malicious_nodes, help="krum, multikrum: f")
    ap.add_argument("--num-nodes-to-select", type=int, default=RunConfig.num_nodes_to_select, help="multikrum")
    ap.add_argument("--min-cosine", type=float, default=RunConfig.min_cosine, help="median-cosine: cosine to the median update")
    ap.add_argument("--proximal-mu", type=float, default=RunConfig.proximal_mu, help="fedprox: Flower's FedProx mu")
    ap.add_argument("--server-eta", type=float, default=RunConfig.server_eta, help="fedadam, fedyogi, fedadagrad: eta")
    ap.add_argument("--attack", default=names.ATTACK_NONE, metavar="SPEC",
                    help=f"federated arms, with --attacker: that hospital changes its update every round as a SuperNode "
                         f"with node config attack=SPEC does ({ATTACK_SPECS}; fault injection, benchmark only)")
    ap.add_argument("--attacker", default="", metavar="HOSPITAL", help="the hospital (site name) that misbehaves with --attack")
    ap.add_argument("--exclude-site", default="", metavar="HOSPITAL",
                    help="train without this site (still scored on the pooled test of every site): what a defence that "
                         "leaves an attacker out every round can at best reach")
    ap.add_argument("--shuffle-sites", action="store_true",
                    help="diagnostic: deal the training images out among the hospitals at random, each keeping its number "
                         "of images (an IID federation of the same data; validation and test splits unchanged)")
    ap.add_argument("--head-diagnostic", action="store_true",
                    help="federated arms: with the final encoder frozen, also score a linear probe on the pooled training "
                         "features (a bound) and the classifier recalibrated on virtual features from merged per-class "
                         "feature statistics (CCVR): is the gap to pooled training in the classifier or the encoder?")
    ap.add_argument("--fedbn", action="store_true",
                    help="federated arms: FedBN, every hospital keeps its own encoder BatchNorm layers after its first round; "
                         "the global model (BatchNorm averaged) is scored as usual, next to the personalised models")
    ap.add_argument("--fixed-head", action="store_true",
                    help="federated arms: FedBABU, the classifier stays at its random start; only the encoder is trained")
    ap.add_argument("--relay-moments", action="store_true",
                    help="federated arms with --strategy cyclic: the AdamW moments travel with the model from hospital to "
                         "hospital (one optimizer, as in pooled training) instead of each hospital keeping its own")
    ap.add_argument("--steps-by-examples", action="store_true",
                    help="federated arms: the round's local steps of all hospitals together are shared out in proportion "
                         "to their training images (at least one each), as pooled training draws them, instead of "
                         "--local-steps each; arm site-mixed: each site's loss weighs by its training images (FedSGD's "
                         "weighting) instead of equally")
    ap.add_argument("--site-mixed-batchnorm", default="site", choices=("site", "joint"),
                    help="arm site-mixed: each site's sub-batch normalised by its own BatchNorm statistics (site, as a "
                         "federation computes) or all sub-batches in one forward pass by their joint ones (joint: a "
                         "diagnostic no federation computes)")
    ap.add_argument("--site-prior", action="store_true",
                    help="federated arms: also score the final model with each held-out image's probabilities adjusted to "
                         "its own site's training label prior over the federation's (a caller whose hospital is known; "
                         "`site_prior_scores`)")
    ap.add_argument("--site-batchnorm", action="store_true",
                    help="with --site-prior: also score each held-out image by the final model with its encoder BatchNorm "
                         "statistics recomputed over its own site's training images (SiloBN's inference; "
                         "`site_batchnorm_scores`)")
    ap.add_argument("--balanced-prior", default="site", choices=("site", "federation"),
                    help="federated, site-batches and site-mixed arms, --finetune-loss balanced-softmax: the label prior each step "
                         "adjusts by: the hospital's own labels' (as the product trains) or every hospital's together")
    ap.add_argument("--finetune-batchnorm", default=names.SSL_BATCHNORM_ADAPT, choices=names.SSL_BATCHNORM,
                    help="federated, pooled, site-batches and site-mixed arms: fine-tuning's BatchNorm layers normalise each batch by its "
                         "own statistics (adapt, as the product trains) or by the running statistics the model came with, "
                         "which stay as they are (frozen: every site's batches normalised alike)")
    ap.add_argument("--feature-noise", type=float, default=0.0, metavar="P",
                    help="every arm that trains an encoder (all but probes): DSU feature-statistics noise after the encoder's "
                         "stem and stages with probability P per stage and training step, SSL steps too (FeatureStatisticsNoise; 0 = off)")
    ap.add_argument("--batch-renorm", default="", metavar="RMAX,DMAX[,STEP]",
                    help="federated arms: fine-tuning normalises every hospital's batches by the federation's BatchNorm "
                         "statistics (Batch Renormalization with r clipped to [1/RMAX, RMAX] and d to [-DMAX, DMAX]; "
                         "FederationBatchNorm), which the hospitals' per-visit moments move STEP of the way (default 1) "
                         "toward what they measure; empty = off")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    args = ap.parse_args()
    try:
        ssl_tasks = ssl_task_spec(args.ssl_task)
    except ValueError as e:
        raise SystemExit(f"--ssl-task {args.ssl_task!r}: {e}") from None
    specs = [a.strip() for a in args.arms.split(",") if a.strip()]
    for spec in specs:
        arm, _, frac = spec.partition("@")
        if arm not in ARMS:
            raise SystemExit(f"unknown arm {arm!r}; expected one of {', '.join(ARMS)}")
        try:
            ok = not frac or 0 < float(frac) <= 1
        except ValueError:
            ok = False
        if not ok:
            raise SystemExit(f"arm {spec!r}: the label fraction after @ must be a number in (0, 1]")
    seeds = parse_seeds(args.seeds)
    if args.tail_average < 0:
        raise SystemExit("--tail-average must be >= 0")
    if args.fedprox_mu < 0:
        raise SystemExit("--fedprox-mu must be >= 0")
    if args.site_batchnorm and not args.site_prior:
        raise SystemExit("--site-batchnorm scores beside --site-prior's adjustment: give --site-prior too")
    batch_renorm = None
    if args.batch_renorm:
        try:
            batch_renorm = tuple(float(v) for v in args.batch_renorm.split(","))
            batch_renorm = batch_renorm + (1.0,) * (len(batch_renorm) == 2)
            ok = len(batch_renorm) == 3 and batch_renorm[0] >= 1 and batch_renorm[1] >= 0 and 0 < batch_renorm[2] <= 1
        except ValueError:
            ok = False
        if not ok:
            raise SystemExit(f"--batch-renorm expects RMAX,DMAX[,STEP] with RMAX >= 1, DMAX >= 0 and STEP in (0, 1] "
                             f"(e.g. 3,5,0.3), got {args.batch_renorm!r}")
    if not 0 <= args.feature_noise <= 1:
        raise SystemExit(f"--feature-noise is a probability per stage and step: expected 0 to 1, got {args.feature_noise}")
    if args.joint_ssl_weight < 0 or args.joint_ssl_batch < 2:
        raise SystemExit(f"--joint-ssl-weight must be >= 0 and --joint-ssl-batch >= 2 (got {args.joint_ssl_weight}, "
                         f"{args.joint_ssl_batch})")
    if args.pseudo_label_weight < 0 or args.pseudo_label_batch < 1 or not 0 < args.pseudo_label_threshold <= 1:
        raise SystemExit(f"--pseudo-label-weight must be >= 0, --pseudo-label-batch >= 1 and --pseudo-label-threshold in "
                         f"(0, 1] (got {args.pseudo_label_weight}, {args.pseudo_label_batch}, {args.pseudo_label_threshold})")
    if args.pseudo_label_weight and args.joint_ssl_weight:
        raise SystemExit("--pseudo-label-weight and --joint-ssl-weight: one term on the unlabelled images at a time")
    if args.moon_mu < 0 or args.moon_temperature <= 0:
        raise SystemExit(f"--moon-mu must be >= 0 and --moon-temperature > 0 (got {args.moon_mu}, {args.moon_temperature})")
    try:
        attack = parse_attack(args.attack, "--attack")
    except FedSSLError as exc:
        raise SystemExit(f"error: {exc}") from None
    if attack.kind == names.ATTACK_DROP:
        raise SystemExit(f"--attack {args.attack}: a drop is a secure-aggregation fault of a real federation "
                         "(tests/flower/test_secure_aggregation.py); this benchmark aggregates in process, without one")
    if attack.active != bool(args.attacker):
        raise SystemExit(f"--attack {args.attack} needs --attacker HOSPITAL" if attack.active
                         else f"--attacker {args.attacker} needs --attack SPEC (one of {ATTACK_SPECS})")
    if args.finetune_rounds < 1 or args.local_steps < 1:
        raise SystemExit("--finetune-rounds and --local-steps must be >= 1: the arms are scored by their fine-tuned classifier")
    folders = not (args.data / SITES_METADATA).is_file()
    if folders:  # not HAM10000 with sites: hospital folders, or an error saying what the folder holds
        try:
            kind = layout.detect(args.data)
        except FedSSLError as exc:
            raise SystemExit(f"error: {exc}") from None
        if kind != layout.LAYOUT_HOSPITAL_FOLDERS:
            raise SystemExit(f"--data {args.data} holds {layout.LAYOUTS[kind]}; the benchmark needs HAM10000 with its "
                             f"{SITES_METADATA} (4 sites) or one folder per hospital (PATH/<hospital>/<class>/<image>)")
    elif args.label_map or args.class_names:
        raise SystemExit(f"--label-map/--class-names apply to hospital folders (PATH/<hospital>/<class>/<image>), not to "
                         f"HAM10000 at {args.data}")

    if args.dp_target_epsilon:
        if args.dp not in names.DP_CENTRAL:
            raise SystemExit("--dp-target-epsilon needs --dp central-fixed or central-adaptive (it sets the noise multiplier)")
        rounds = {arm_rounds(spec, args.ssl_rounds, args.finetune_rounds) for spec in specs}
        if len(rounds) > 1:
            raise SystemExit(f"--dp-target-epsilon: the arms {args.arms} run different numbers of rounds ({sorted(rounds)}); "
                             "run them one at a time")
        try:
            args.dp_noise_multiplier = noise_multiplier_for_epsilon(args.dp_target_epsilon, rounds.pop(), args.dp_delta)
        except FedSSLError as exc:
            raise SystemExit(f"--dp-target-epsilon: {exc}") from None
        print(f"noise multiplier {args.dp_noise_multiplier} for epsilon <= {args.dp_target_epsilon} at delta {args.dp_delta:g}",
              flush=True)
    threads = set_torch_threads()
    base = RunConfig(ssl_rounds=args.ssl_rounds, finetune_rounds=args.finetune_rounds, arch=args.arch,
                     pretrained=args.pretrained == "true", image_size=args.image_size, batch_size=args.batch_size,
                     local_steps=args.local_steps, lr=args.lr, finetune_lr=args.finetune_lr, lr_schedule=args.lr_schedule,
                     ssl_colour_jitter=args.ssl_colour_jitter, ssl_batchnorm=args.ssl_batchnorm, share=args.share,
                     weight_decay=args.weight_decay, finetune_loss=args.finetune_loss, augment=args.augment,
                     head_warmup_epochs=args.head_warmup_epochs, test_time_augmentation=args.test_time_augmentation,
                     keep_optimizer_state=args.keep_optimizer_state == "true", server_lr=args.server_lr, server_momentum=args.server_momentum,
                     finetune_mode=args.finetune_mode, probe_lr=args.probe_lr,
                     local_baseline=False, dp=args.dp, dp_noise_multiplier=args.dp_noise_multiplier,
                     dp_clipping_norm=args.dp_clipping_norm, dp_delta=args.dp_delta, dp_max_epsilon=args.dp_max_epsilon,
                     dp_target_quantile=args.dp_target_quantile, dp_clip_norm_lr=args.dp_clip_norm_lr,
                     dp_clipped_count_stddev=args.dp_clipped_count_stddev, dp_local_epsilon=args.dp_local_epsilon,
                     strategy=args.strategy, trim_beta=args.trim_beta, num_malicious_nodes=args.num_malicious_nodes,
                     num_nodes_to_select=args.num_nodes_to_select, proximal_mu=args.proximal_mu, server_eta=args.server_eta,
                     min_cosine=args.min_cosine,
                     # the same steps bit for bit (tests/flower/test_training.py); plain steps take 25-35 % less time
                     activation_checkpointing=False)
    try:
        base.validate()
    except FedSSLError as exc:
        raise SystemExit(f"error: {exc}") from None
    t0 = time.perf_counter()
    try:
        full = load_sites(args)
    except FedSSLError as exc:  # a label mismatch or an empty folder: the message says what to change
        raise SystemExit(f"error: {exc}") from None
    if args.colour_constancy:
        if args.colour_constancy < 1:
            raise SystemExit(f"--colour-constancy must be 0 (off) or a Minkowski power >= 1, got {args.colour_constancy}")
        for site in full:
            site.train_images = shades_of_gray(site.train_images, args.colour_constancy)
            site.test_images = shades_of_gray(site.test_images, args.colour_constancy)
        print(f"Shades of Gray colour constancy, power {args.colour_constancy:g}, on every image", flush=True)
    if attack.active and args.attacker not in [s.hospital for s in full]:
        raise SystemExit(f"--attacker {args.attacker!r} is not one of the hospitals: {', '.join(s.hospital for s in full)}")
    carved = [carve_validation(s, args.val_fraction) for s in full]
    sites, vals = [c[0] for c in carved], [c[1] for c in carved]
    test = pooled_data(full, "pooled-test") if args.eval == "test" else pooled_data(vals, "pooled-val")
    unknown = [site for site in ssl_tasks if site and site not in [s.hospital for s in full]]
    if unknown:
        raise SystemExit(f"--ssl-task: {', '.join(unknown)} is not one of the hospitals: {', '.join(s.hospital for s in full)}")
    if args.exclude_site:
        if args.exclude_site not in [s.hospital for s in full]:
            raise SystemExit(f"--exclude-site {args.exclude_site!r} is not one of the hospitals: {', '.join(s.hospital for s in full)}")
        kept = [i for i, s in enumerate(sites) if s.hospital != args.exclude_site]
        sites, vals, full = [sites[i] for i in kept], [vals[i] for i in kept], [full[i] for i in kept]
        print(f"training without {args.exclude_site} (scored on every site's pooled {args.eval} split)", flush=True)
    if args.shuffle_sites:
        sites = shuffle_sites(sites)
        print("training images dealt out among the sites at random (--shuffle-sites): an IID federation", flush=True)
    site_splits = full if args.eval == "test" else vals  # each site's own held-out split (--fedbn's personalised scores)
    print(f"{len(sites)} sites loaded in {time.perf_counter() - t0:.0f}s: " + ", ".join(
        f"{s.hospital} {len(s.train_images)}/{len(v.test_images)}/{len(f.test_images)}" for s, v, f in zip(sites, vals, full))
        + " train/val/test images", flush=True)

    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    runs = [r for r in previous.get("runs", [])]
    for spec in specs:
        for seed in (seeds if spec.partition("@")[0] in SEEDED_ARMS else seeds[:1]):
            print(f"{spec} (seed {seed}, eval {args.eval}) ...", flush=True)
            r = run_arm(spec, seed, sites, vals, test, base, args.bn_diagnostic, args.scaffold, args.fedprox_mu, args.tail_average,
                        attack, args.attacker, args.aggregation_weights == "uniform", args.tta, args.head_diagnostic,
                        site_splits if args.fedbn else None, args.fixed_head, (args.moon_mu, args.moon_temperature),
                        ssl_tasks, (args.joint_ssl_weight, args.joint_ssl_batch, args.joint_ssl_batchnorm),
                        (args.pseudo_label_weight, args.pseudo_label_threshold, args.pseudo_label_batch,
                         args.pseudo_label_batchnorm), relay_moments=args.relay_moments,
                        steps_by_examples=args.steps_by_examples, federation_prior=args.balanced_prior == "federation",
                        finetune_batchnorm=args.finetune_batchnorm, feature_noise=args.feature_noise,
                        site_mixed_batchnorm=args.site_mixed_batchnorm, site_prior=site_splits if args.site_prior else None,
                        site_batchnorm=args.site_batchnorm, batch_renorm=batch_renorm)
            r["eval"], r["label"] = args.eval, args.label
            if args.feature_noise:
                r["feature_noise"] = {"method": "DSU", "p": args.feature_noise}
            if args.colour_constancy:
                r["colour_constancy"] = {"method": "shades-of-gray", "power": args.colour_constancy}
            if args.exclude_site:
                r["excluded_site"] = args.exclude_site
            if args.shuffle_sites:
                r["shuffled_sites"] = True
            r["command"] = rerun_command(ap, args, spec, seed, folders)
            runs = [x for x in runs if key(x) != key(r)] + [r]
            t = r["test"]
            print(f"  balanced accuracy {t[names.M_BALANCED_ACCURACY]:.3f}, macro AUC {t[names.M_MACRO_AUC]:.3f}, "
                  f"accuracy {t[names.M_ACCURACY]:.3f}, ECE {t.get('ece', float('nan')):.3f} ({r['seconds'] / 60:.1f} min)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            result = {
                "machine": {"cpus": os.cpu_count(), "torch_threads": threads, "python": platform.python_version(), "torch": torch.__version__},
                "data": {"path": str(args.data), "image_size": args.image_size, "class_names": test.class_names,
                         "val_fraction": args.val_fraction,
                         "sites": {s.hospital: {"train": len(s.train_images), "val": len(v.test_images), "test": len(f.test_images),
                                                "class_counts": class_counts(s, v, f), **_layout(f)}
                                   for s, v, f in zip(sites, vals, full)},
                         "pooled_test": sum(len(f.test_images) for f in full)},
                "reference_flamby_fed_isic2019_balanced_accuracy": FLAMBY_FED_ISIC2019,
                "summary": {split: summarise([x for x in runs if x.get("eval", "test") == split]) for split in ("test", "val")},
                "runs": runs,
            }
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every arm: a long run loses nothing

    print()
    print(f"{'arm':<18} {'seeds':>5} {'balanced acc':>16} {'macro AUC':>16} {'accuracy':>16}  ({args.eval})")
    for arm, s in result["summary"][args.eval].items():
        cells = " ".join(f"{s[k]['mean']:>8.3f} ± {s[k]['std']:.3f}" for k in HEADLINE)
        print(f"{arm:<18} {len(s['seeds']):>5} {cells}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

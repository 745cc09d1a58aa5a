"""Federated synthetic images: the class-conditional GAN trained by the 4 HAM10000 sites together,
next to each site alone and one GAN on the pooled images, at the same budget in generator steps.

Data as in `bench/quality.py` (whose loaders this reuses): 4 hospitals = HAM10000's acquisition
sites, each split train/test by lesion (0.2), a validation split carved by lesion from each
site's training split (`--val-fraction`). Nothing trains on a validation or test image. Every
generator is scored on the pooled test split (the union of the sites'), or with `--eval val` on
the pooled validation split: hyper-parameters (the learning rate) are chosen there, never on test.

Arms (`--arms`), all from the same seeded `ConditionalGAN` (`local.new_model`, as the aggregator
and every hospital build it), each round trained by the product's `local.train_round` (→
`generative.train_gan`) with the product's round seeds (`local.round_seed`):
  federated  the 4 sites, `--rounds` R rounds of `--steps` K steps each per site; after each
             round the aggregator averages both networks' whole state (BatchNorm statistics and
             spectral-norm vectors included) weighted by examples (`strategy.weighted_average`,
             what strategy=fedavg with server-lr 1 does). Every site trains K batches, so the
             weights are equal unless a site holds fewer images than a batch. Flower's
             transport is not in the loop (lossless with update-encoding none).
  local      each site alone: R rounds of K steps on its own training images (what a site's
             compute buys it without the federation; the ClientApp's local baseline); each site
             is scored, and the mean over sites is the arm's score.
  pooled     one GAN on the union of the sites' training images: R rounds of 4K steps (the
             federation's total compute; a fresh optimizer each round, as every arm).

Scores of each generator, against the real held-out split (features: ImageNet EfficientNet-Lite0,
`generative_metrics.FeatureExtractor`, so FIDs compare within fedssl only):
- FID, precision, recall with N generated = N real = min(len(split), `--eval-samples`), the
  generated labels in the split's class mix (`class_balanced_labels`), as `score_generator`
  computes them (precision, recall and memorisation on unit-length features).
- memorisation against the arm's own training images (all of them): each generated image's
  nearest-training distance next to real held-out images' of the same distribution (the pooled
  split; a local site's own split); `too_close_fraction`, the median distance ratio, and the
  flagged indices (into the FID set, reproducible from the seed). A figure of the 8 generated
  images nearest a training image above those training images goes to `--private-figures`
  (it shows patient images: never into the repository); its path is recorded.
- TSTR (train on synthetic, test on real): a logistic regression on frozen Lite0 features fitted
  only on `--tstr-per-class` generated images of every class, its balanced accuracy on the real
  held-out split, next to the same classifier fitted on the arm's real training images (the
  pooled ones for federated and pooled, the site's for local).
- federated only: augmentation. For every site, the classifier on its real training images next
  to the same images plus generated images of its rare classes (under `--rare-fraction` of its
  training set, topped up to that level), scored on the pooled held-out split.
- federated and pooled: FID, precision and recall every `--score-every` rounds on
  `--curve-samples` images (fixed latents; FID on fewer samples reads higher: compare curves with
  curves), with the round's mean losses.
A grid of 8 generated images per class (one row per class) per generator goes to `--figures`
(default bench/results/generative/, generated images only); the grid of real training images
next to it goes to `--private-figures`.

    .venv/bin/python -m bench.generative [--arms federated,local,pooled] [--rounds 16 --steps 50] [--eval val]

Prints a table and appends to JSON (default bench/results/generative.json, keyed by arm, seed,
eval split and label: a rerun replaces its own entry), with the command, the machine, torch
threads, the budget and each arm's wall seconds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from fedssl_core import generative as gan_models
from fedssl_core import names
from fedssl_core.models import set_torch_threads
from fedssl_flower import local, records, training
from fedssl_flower.config import RunConfig
from fedssl_flower.data import HospitalData
from fedssl_flower.errors import FedSSLError
from fedssl_flower.generative_metrics import (FeatureExtractor, class_balanced_labels, frechet_distance, memorisation,
                                              precision_recall)
from fedssl_flower.strategy import weighted_average

from bench.quality import REPO, SITES_METADATA, carve_validation, class_counts, load_sites, parse_seeds, pooled_data

ARMS = ("federated", "local", "pooled")
DEFAULTS = RunConfig()  # the product's generative settings (pyproject [tool.flwr.app.config] mirrors them)
PHASE = names.PHASE_GENERATE
SHARED = training.shared_groups(PHASE)  # generator and discriminator: what a generative round averages
LINEAR_C = 1.0  # inverse L2 strength of the TSTR logistic regression (on standardised features), fixed, not tuned
GRID_PER_CLASS = 8
CLOSEST_SHOWN = 8
HEADLINE = ("fid", "precision", "recall", "too_close_fraction", "tstr_synthetic", "tstr_real")


# ---------------------------------------------------------------------------- training
def gan_config(args, seed: int) -> RunConfig:
    """The run config of a generative run with these settings (validated as the product does)."""
    cfg = RunConfig(task=names.RUN_GENERATE, seed=seed, image_size=args.image_size, batch_size=args.batch_size,
                    generate_rounds=args.rounds, gan_steps=args.steps, gan_lr=args.lr, gan_lr_discriminator=args.lr_discriminator,
                    gan_z_dim=args.z_dim, gan_width=args.width, gan_diffaugment=args.diffaugment == "true",
                    gan_eval_samples=args.curve_samples, local_baseline=False,
                    keep_optimizer_state=args.keep_optimizer_state == "true")
    cfg.validate()
    return cfg


def _round_losses(metrics: list[dict]) -> dict:
    keys = ("discriminator_loss", "generator_loss", "discriminator_real_score", "discriminator_fake_score")
    return {k: statistics.mean(m[k] for m in metrics) for k in keys}


def federate(sites: list[HospitalData], cfg: RunConfig, num_classes: int, after_round) -> gan_models.ConditionalGAN:
    """The aggregator's generative round loop with every hospital in this process: each round
    every hospital loads the global GAN, trains `gan-steps` steps, and the aggregator takes the
    example-weighted average of both networks' state (`weighted_average`)."""
    server = local.new_model(cfg, num_classes)
    hospitals = [copy.deepcopy(server) for _ in sites]
    moments = [{} if cfg.keep_optimizer_state else None for _ in sites]  # --keep-optimizer-state: each hospital's Adam, kept
    for rnd in range(1, cfg.generate_rounds + 1):
        current = records.state_arrays(server.state_dict(), SHARED)
        updates, metrics = [], []
        for site, model, kept in zip(sites, hospitals, moments):
            records.load_arrays(model, current)
            m = local.train_round(model, site, "", PHASE, cfg, local.round_seed(cfg.seed, PHASE, rnd), rnd, kept)
            updates.append((records.state_arrays(model.state_dict(), SHARED), m[names.M_EXAMPLES]))
            metrics.append(m)
        records.load_arrays(server, weighted_average(updates))
        after_round(rnd, server, _round_losses(metrics))
    return server.eval()


def train_alone(data: HospitalData, cfg: RunConfig, num_classes: int, steps: int, after_round=None) -> gan_models.ConditionalGAN:
    """One GAN on one data set: the federation's rounds (a fresh optimizer unless --keep-optimizer-state, the same round seeds)
    with `steps` steps each."""
    cfg = dataclasses.replace(cfg, gan_steps=steps)
    gan = local.new_model(cfg, num_classes)
    kept = {} if cfg.keep_optimizer_state else None
    for rnd in range(1, cfg.generate_rounds + 1):
        m = local.train_round(gan, data, "", PHASE, cfg, local.round_seed(cfg.seed, PHASE, rnd), rnd, kept)
        if after_round is not None:
            after_round(rnd, gan, _round_losses([m]))
    return gan.eval()


# ---------------------------------------------------------------------------- scoring
def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, as `score_generator` scales them for the k-NN measures."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def linear_classifier_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                             class_names: list[str]) -> dict | None:
    """Balanced accuracy (and recall per class) on the test features of a class-weighted
    logistic regression on standardised training features; None with fewer than 2 classes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, recall_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:
        return None
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=LINEAR_C, max_iter=2000, class_weight="balanced"))
    clf.fit(train_x, train_y)
    pred = clf.predict(test_x)
    present = sorted(int(c) for c in np.unique(test_y))
    recalls = recall_score(test_y, pred, labels=present, average=None, zero_division=0)
    return {"balanced_accuracy": float(balanced_accuracy_score(test_y, pred)), "training_examples": int(len(train_y)),
            "recall_per_class": {class_names[c]: float(r) for c, r in zip(present, recalls)}}


@dataclasses.dataclass
class Split:
    """Real held-out images a generator is scored against, with their Lite0 features."""
    images: torch.Tensor
    labels: torch.Tensor
    features: np.ndarray


class Scorer:
    """Scores generators against one real held-out split, computing each real image's features once."""

    def __init__(self, extractor: FeatureExtractor, split: HospitalData, class_names: list[str], seed: int) -> None:
        self.extractor, self.class_names, self.seed = extractor, class_names, seed
        self.split = Split(split.test_images, split.test_labels, extractor(split.test_images))
        self._train: dict[str, np.ndarray] = {}

    def train_features(self, name: str, images: torch.Tensor) -> np.ndarray:
        if name not in self._train:
            self._train[name] = self.extractor(images)
        return self._train[name]

    def pooled_train_features(self, sites: list[HospitalData]) -> np.ndarray:
        """The features of `pooled_data(sites)`'s training images, from each site's."""
        if "pooled" not in self._train:
            self._train["pooled"] = np.concatenate([self.train_features(s.hospital, s.train_images) for s in sites])
        return self._train["pooled"]

    def fidelity(self, gan: gan_models.ConditionalGAN, max_samples: int) -> tuple[dict, torch.Tensor, np.ndarray, np.ndarray]:
        """FID (raw features), precision and recall (unit length) of min(len(split), max_samples)
        generated images in the split's class mix against as many real ones, as `score_generator`
        draws them; returns the scores, the generated images, their features and the real rows."""
        count = min(max_samples, len(self.split.labels))
        rng = np.random.default_rng(self.seed)
        rows = rng.permutation(len(self.split.labels))[:count]
        wanted = class_balanced_labels(self.split.labels, count, self.seed)
        fake_images = gan_models.sample(gan.generator, wanted, self.seed)
        fake = self.extractor(fake_images)
        real = self.split.features[rows]
        precision, recall = precision_recall(_unit(real), _unit(fake))
        return ({"fid": frechet_distance(real, fake), "precision": precision, "recall": recall,
                 "generated_examples": count, "real_examples": count}, fake_images, fake, rows)

    def tstr(self, gan: gan_models.ConditionalGAN, per_class: int, real_x: np.ndarray, real_y: np.ndarray) -> dict:
        """Train on synthetic (`per_class` of every class), test on the real split; the same
        classifier on the real training features next to it."""
        k = len(self.class_names)
        labels = torch.arange(k).repeat_interleave(per_class)
        synth_x = self.extractor(gan_models.sample(gan.generator, labels, self.seed + 1000))
        test_x, test_y = self.split.features, self.split.labels.numpy()
        return {"per_class": per_class, "linear_c": LINEAR_C,
                "synthetic": linear_classifier_scores(synth_x, labels.numpy(), test_x, test_y, self.class_names),
                "real": linear_classifier_scores(real_x, real_y, test_x, test_y, self.class_names)}

    def augmentation(self, gan: gan_models.ConditionalGAN, site: HospitalData, site_x: np.ndarray, rare_fraction: float) -> dict:
        """A site's real training images alone, and with generated images of its rare classes
        (fewer than `rare_fraction` of its images, topped up to that), scored on the split."""
        y = site.train_labels.numpy()
        level = math.ceil(rare_fraction * len(y))
        counts = np.bincount(y, minlength=len(self.class_names))
        added = {c: int(level - n) for c, n in enumerate(counts) if n < level}
        labels = torch.tensor([c for c, n in added.items() for _ in range(n)], dtype=torch.long)
        test_x, test_y = self.split.features, self.split.labels.numpy()
        out = {"train_images": int(len(y)), "level": level,
               "added": {self.class_names[c]: n for c, n in added.items()},
               "real_only": linear_classifier_scores(site_x, y, test_x, test_y, self.class_names)}
        if len(labels):
            synth_x = self.extractor(gan_models.sample(gan.generator, labels, self.seed + 2000))
            out["real_plus_synthetic"] = linear_classifier_scores(np.concatenate([site_x, synth_x]),
                                                                  np.concatenate([y, labels.numpy()]), test_x, test_y, self.class_names)
        else:
            out["real_plus_synthetic"] = out["real_only"]
        return out


def memorisation_check(fake_images: torch.Tensor, fake_x: np.ndarray, train_images: torch.Tensor, train_x: np.ndarray,
                       heldout_x: np.ndarray, figure: Path | None) -> dict:
    """`generative_metrics.memorisation` of the generated images against every training image,
    real held-out images as the reference; with `figure`, a PNG of the `CLOSEST_SHOWN` generated
    images nearest a training image (top row) above those training images (bottom row)."""
    fu, tu = _unit(fake_x), _unit(train_x)
    out = memorisation(fu, tu, _unit(heldout_x))
    d = torch.cdist(torch.from_numpy(fu), torch.from_numpy(tu))
    nearest_d, nearest = d.min(dim=1)
    closest = torch.argsort(nearest_d)[:CLOSEST_SHOWN]
    out["closest"] = [{"generated_index": int(i), "train_index": int(nearest[i]), "distance": float(nearest_d[i])} for i in closest]
    out["train_images"], out["heldout_images"] = int(len(train_x)), int(len(heldout_x))
    if figure is not None:
        save_grid([fake_images[closest], train_images[nearest[closest]]], ["generated", "nearest train"], figure)
        out["figure"] = str(figure)
    return out


# ---------------------------------------------------------------------------- figures
def save_grid(rows: list[torch.Tensor], row_names: list[str], path: Path, scale: int = 2) -> Path:
    """uint8 (n, 3, S, S) rows side by side in a PNG, each image enlarged `scale` times, the row's
    name on its left."""
    from PIL import Image, ImageDraw

    side = rows[0].shape[-1] * scale
    margin, pad = 96, 2
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (margin + cols * (side + pad), len(rows) * (side + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (row, name) in enumerate(zip(rows, row_names)):
        y = i * (side + pad)
        draw.text((4, y + side // 2 - 5), name, fill="black")
        for j, img in enumerate(row):
            tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (margin + j * (side + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def class_grid(gan: gan_models.ConditionalGAN, class_names: list[str], seed: int, path: Path) -> str:
    labels = torch.arange(len(class_names)).repeat_interleave(GRID_PER_CLASS)
    images = gan_models.sample(gan.generator, labels, seed + 3000)
    save_grid(list(images.split(GRID_PER_CLASS)), class_names, path)
    return str(path)


def real_grid(data: HospitalData, path: Path, seed: int) -> str:
    """Up to 8 training images per class (a class a site lacks stays an empty row)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c in range(len(data.class_names)):
        idx = torch.nonzero(data.train_labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)[:GRID_PER_CLASS]]
        rows.append(data.train_images[idx] if len(idx) else torch.full((1, *data.train_images.shape[1:]), 255, dtype=torch.uint8))
    save_grid(rows, data.class_names, path)
    return str(path)


# ---------------------------------------------------------------------------- arms
def _tag(arm: str, seed: int, args) -> str:
    return f"{arm}{'-' + args.label if args.label else ''}-seed{seed}-{args.eval}-{args.image_size}px"


def score_generator(gan, scorer: Scorer, train: HospitalData, train_name: str, heldout_x: np.ndarray, args, tag: str) -> dict:
    """Every measure of one generator trained on `train`."""
    t0 = time.perf_counter()
    train_x = scorer.train_features(train_name, train.train_images)
    scores, fake_images, fake_x, rows = scorer.fidelity(gan, args.eval_samples)
    # What a perfect copy of the training distribution would score: as many real training images
    # (at random) in place of the generated ones. The sites' images differ from the pooled split
    # (a local site's most of all), so this floor is above 0 for FID and below 1 for recall.
    real_x = train_x[np.random.default_rng(scorer.seed).permutation(len(train_x))[:len(rows)]]
    heldout_rows = scorer.split.features[rows]
    if len(real_x) >= 4:
        precision, recall = precision_recall(_unit(heldout_rows), _unit(real_x))
        scores["real_train_reference"] = {"fid": frechet_distance(heldout_rows, real_x), "precision": precision, "recall": recall,
                                          "train_examples": int(len(real_x))}
    memo = memorisation_check(fake_images, fake_x, train.train_images, train_x, heldout_x,
                              args.private_figures / f"{tag}-memorisation.png")
    scores["too_close_fraction"], scores["distance_ratio"] = memo["too_close_fraction"], memo["distance_ratio"]
    tstr = scorer.tstr(gan, args.tstr_per_class, train_x, train.train_labels.numpy())
    scores["tstr_synthetic"] = (tstr["synthetic"] or {}).get("balanced_accuracy")
    scores["tstr_real"] = (tstr["real"] or {}).get("balanced_accuracy")
    return {"scores": scores, "memorisation": memo, "tstr": tstr,
            "samples_png": class_grid(gan, scorer.class_names, scorer.seed, args.figures / f"{tag}-samples.png"),
            "score_seconds": time.perf_counter() - t0}


def run_arm(arm: str, seed: int, sites: list[HospitalData], split_parts: list[HospitalData], scorer: Scorer, args) -> dict:
    cfg = gan_config(args, seed)
    class_names = scorer.class_names
    k = len(class_names)
    pooled = pooled_data(sites)
    curve: list[dict] = []
    fixed: dict = {}  # the curve's sample count and scoring time

    def after_round(rnd: int, gan, losses: dict) -> None:
        point = {"round": rnd, **losses}
        if rnd % args.score_every == 0 or rnd == cfg.generate_rounds:
            tc = time.perf_counter()
            s, *_ = scorer.fidelity(gan, args.curve_samples)
            point.update({"fid": s["fid"], "precision": s["precision"], "recall": s["recall"]})
            fixed["samples"] = s["generated_examples"]
            fixed["seconds"] = fixed.get("seconds", 0.0) + time.perf_counter() - tc
        curve.append(point)
        print(f"    round {rnd}/{cfg.generate_rounds}: D loss {losses['discriminator_loss']:.3f}, G loss {losses['generator_loss']:.3f}"
              + (f", FID@{fixed['samples']} {point['fid']:.1f}, precision {point['precision']:.2f}, recall {point['recall']:.2f}"
                 if "fid" in point else "") + f" ({time.perf_counter() - t0:.0f}s)", flush=True)

    if arm in ("federated", "pooled"):
        scorer.pooled_train_features(sites)  # before the clock starts: shared by the arms of this process
    t0 = time.perf_counter()
    tag = _tag(arm, seed, args)
    out: dict = {"arm": arm, "seed": seed}
    heldout = scorer.split.features
    if arm == "federated":
        gan = federate(sites, cfg, k, after_round)
        out["curve_seconds"] = fixed.get("seconds", 0.0)  # scoring the curve, not training
        out["train_seconds"] = time.perf_counter() - t0 - out["curve_seconds"]
        out.update(score_generator(gan, scorer, pooled, "pooled", heldout, args, tag))
        t1 = time.perf_counter()
        out["augmentation"] = {"rare_fraction": args.rare_fraction,
                               "sites": {s.hospital: scorer.augmentation(gan, s, scorer.train_features(s.hospital, s.train_images),
                                                                         args.rare_fraction) for s in sites}}
        out["score_seconds"] += time.perf_counter() - t1
        out["curve"] = curve
    elif arm == "pooled":
        gan = train_alone(pooled, cfg, k, args.steps * len(sites), after_round)
        out["curve_seconds"] = fixed.get("seconds", 0.0)  # scoring the curve, not training
        out["train_seconds"] = time.perf_counter() - t0 - out["curve_seconds"]
        out.update(score_generator(gan, scorer, pooled, "pooled", heldout, args, tag))
        out["curve"] = curve
    else:  # local: each site alone, scored on the pooled split; memorisation against its own held-out images
        offsets = np.cumsum([0] + [len(p.test_labels) for p in split_parts])
        per_site, train_seconds = {}, 0.0
        for i, site in enumerate(sites):
            ts = time.perf_counter()
            gan = train_alone(site, cfg, k, args.steps)
            train_seconds += time.perf_counter() - ts
            per_site[site.hospital] = score_generator(gan, scorer, site, site.hospital, heldout[offsets[i]:offsets[i + 1]],
                                                      args, f"{arm}-{site.hospital}{tag[len(arm):]}")
            per_site[site.hospital]["train_seconds"] = time.perf_counter() - ts - per_site[site.hospital]["score_seconds"]
            s = per_site[site.hospital]["scores"]
            print(f"    {site.hospital}: FID {s['fid']:.1f}, precision {s['precision']:.2f}, recall {s['recall']:.2f}, "
                  f"TSTR {_fmt(s['tstr_synthetic'])} (real {_fmt(s['tstr_real'])})", flush=True)
        out["sites"] = per_site
        out["train_seconds"] = train_seconds
        out["score_seconds"] = sum(p["score_seconds"] for p in per_site.values())
        out["scores"] = _mean_scores([p["scores"] for p in per_site.values()])
        out["note"] = ("scores = mean over sites of each site-alone generator on the pooled split; each site's memorisation "
                       "is against its own training images, its own held-out images the reference")
    out["seconds"] = time.perf_counter() - t0
    out["budget"] = {"rounds": args.rounds, "steps_per_site_per_round": args.steps, "sites": len(sites),
                     "batch_size": args.batch_size,
                     "generator_steps_per_model": args.rounds * args.steps * (len(sites) if arm == "pooled" else 1),
                     "generator_steps_total": args.rounds * args.steps * len(sites)}
    out["config"] = {k: v for k, v in cfg.as_dict().items()
                     if k in ("seed", "image-size", "batch-size", "keep-optimizer-state") or k.startswith(("gan-", "generate-"))}
    return out


def _mean_scores(scores: list[dict]) -> dict:
    """Key by key mean of score dicts (nested ones too); None where no dict has a number."""
    out = {}
    for k in scores[0]:
        vals = [s.get(k) for s in scores]
        if isinstance(vals[0], dict):
            out[k] = _mean_scores([v for v in vals if v])
        else:
            xs = [v for v in vals if v is not None]
            out[k] = statistics.mean(xs) if xs else None
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


# ---------------------------------------------------------------------------- output
def key(run: dict) -> tuple:
    """What a rerun replaces: the same arm, seed, evaluation split and label."""
    return run["arm"], run["seed"], run.get("eval", "test"), run.get("label", "")


def arm_name(run: dict) -> str:
    return run["arm"] + (f" [{run['label']}]" if run.get("label") else "")


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds, per arm (and label)."""
    out = {}
    for arm in dict.fromkeys(arm_name(r) for r in runs):
        vals = [r for r in runs if arm_name(r) == arm]
        out[arm] = {"seeds": [r["seed"] for r in vals], "minutes": statistics.mean(r["seconds"] for r in vals) / 60}
        for k in HEADLINE:
            xs = [float(r["scores"][k]) for r in vals if r["scores"].get(k) is not None]
            if xs:
                out[arm][k] = {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
        refs = [r["scores"]["real_train_reference"]["fid"] for r in vals if r["scores"].get("real_train_reference")]
        if refs:
            out[arm]["fid_real_train_reference"] = statistics.mean(refs)
    return out


def machine(threads: int) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": threads, "python": platform.python_version(), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ham10000")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    ap.add_argument("--seeds", default="0", help="comma list; each arm runs once per seed")
    ap.add_argument("--eval", default="test", choices=("test", "val"), help="score on the pooled test or validation split")
    ap.add_argument("--val-fraction", type=float, default=0.15, help="validation lesions carved from each site's training split")
    ap.add_argument("--rounds", type=int, default=DEFAULTS.generate_rounds, help="R: federated rounds (run config generate-rounds)")
    ap.add_argument("--steps", type=int, default=DEFAULTS.gan_steps, help="K: steps per site per round (run config gan-steps)")
    ap.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    ap.add_argument("--image-size", type=int, default=32, choices=gan_models.IMAGE_SIZES)
    ap.add_argument("--width", type=int, default=DEFAULTS.gan_width, help="run config gan-width")
    ap.add_argument("--z-dim", type=int, default=DEFAULTS.gan_z_dim, help="run config gan-z-dim")
    ap.add_argument("--lr", type=float, default=DEFAULTS.gan_lr, help="generator learning rate (run config gan-lr)")
    ap.add_argument("--lr-discriminator", type=float, default=None,
                    help="discriminator learning rate (run config gan-lr-discriminator; default: --lr)")
    ap.add_argument("--diffaugment", default="true" if DEFAULTS.gan_diffaugment else "false", choices=("true", "false"))
    ap.add_argument("--keep-optimizer-state", default="false", choices=("true", "false"),
                    help="each hospital (and the pooled and site-alone GANs) keeps both networks' Adam moments across "
                         "rounds instead of a fresh optimizer each round (the product's generative rounds: fresh)")
    ap.add_argument("--eval-samples", type=int, default=1000, help="generated = real images for FID, precision, recall, memorisation")
    ap.add_argument("--curve-samples", type=int, default=DEFAULTS.gan_eval_samples, help="images per curve point")
    ap.add_argument("--score-every", type=int, default=2, help="federated and pooled: a curve point every this many rounds")
    ap.add_argument("--tstr-per-class", type=int, default=200, help="generated images per class the TSTR classifier fits")
    ap.add_argument("--rare-fraction", type=float, default=0.05, help="augmentation: classes under this share of a site are topped up")
    ap.add_argument("--max-images-per-site", type=int, default=0, help="cap per site before the split (0 = all; for smoke runs)")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("FEDSSL_HOME", ".fedssl")) / "cache")
    ap.add_argument("--figures", type=Path, default=Path("bench/results/generative"),
                    help="where the generated-image grids go (generated images only)")
    ap.add_argument("--private-figures", type=Path, default=Path(os.environ.get("FEDSSL_HOME", ".fedssl")) / "bench" / "generative",
                    help="where figures with real (patient) images go: the real grid and the memorisation figures; keep it "
                         "outside the repository")
    ap.add_argument("--label", default="", help="names a variant: runs are keyed by arm, seed, eval and label")
    ap.add_argument("--threads", type=int, default=0, help="torch (and BLAS) threads; 0 = the CPUs this process may use")
    ap.add_argument("--out", type=Path, default=Path("bench/results/generative.json"))
    args = ap.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise SystemExit(f"unknown arm {unknown[0]!r}; expected one of {', '.join(ARMS)}" if unknown else "--arms: give at least one arm")
    seeds = parse_seeds(args.seeds)
    if args.lr_discriminator is None:
        args.lr_discriminator = args.lr
    for flag in ("rounds", "steps", "score_every", "tstr_per_class"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1")
    if args.eval_samples < 4 or args.curve_samples < 4:
        raise SystemExit("--eval-samples and --curve-samples must be >= 4 (precision/recall with k = 3)")
    try:
        gan_config(args, seeds[0])
    except FedSSLError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not (args.data / SITES_METADATA).is_file():
        raise SystemExit(f"--data {args.data}: no {SITES_METADATA}; this benchmark needs HAM10000 with its 4 acquisition sites")

    threads = set_torch_threads(args.threads or None)
    from threadpoolctl import threadpool_limits  # sklearn's: keeps the logistic regression's BLAS on the same cores
    threadpool_limits(threads)
    command = "python -m bench.generative " + shlex.join(sys.argv[1:])
    t0 = time.perf_counter()
    try:
        full = load_sites(args)
    except FedSSLError as exc:
        raise SystemExit(f"error: {exc}") from None
    carved = [carve_validation(s, args.val_fraction) for s in full]
    sites, vals = [c[0] for c in carved], [c[1] for c in carved]
    parts = full if args.eval == "test" else vals
    split = pooled_data(parts, f"pooled-{args.eval}")
    class_names = split.class_names
    print(f"{len(sites)} sites loaded in {time.perf_counter() - t0:.0f}s: " + ", ".join(
        f"{s.hospital} {len(s.train_images)}/{len(v.test_images)}/{len(f.test_images)}" for s, v, f in zip(sites, vals, full))
        + f" train/val/test images at {args.image_size} px", flush=True)
    t0 = time.perf_counter()
    extractor = FeatureExtractor()
    base = Scorer(extractor, split, class_names, seeds[0])
    print(f"features of the {len(split.test_labels)} pooled {args.eval} images in {time.perf_counter() - t0:.0f}s", flush=True)
    real_grid_png = real_grid(pooled_data(sites), args.private_figures / f"real-train-{args.image_size}px.png", 0)

    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    runs = list(previous.get("runs", []))
    for arm in arms:
        for seed in seeds:
            scorer = _reseeded(base, seed)
            print(f"{arm} (seed {seed}, eval {args.eval}, {args.rounds} rounds x {args.steps} steps) ...", flush=True)
            r = run_arm(arm, seed, sites, parts, scorer, args)
            r.update({"eval": args.eval, "label": args.label, "command": command, "machine": machine(threads),
                      "real_grid_png": real_grid_png})
            runs = [x for x in runs if key(x) != key(r)] + [r]
            s = r["scores"]
            print(f"  FID {s['fid']:.1f}, precision {s['precision']:.3f}, recall {s['recall']:.3f}, too close "
                  f"{s['too_close_fraction']:.3f}, TSTR {_fmt(s['tstr_synthetic'])} (real {_fmt(s['tstr_real'])}) "
                  f"({r['train_seconds'] / 60:.1f} min training, {r['score_seconds'] / 60:.1f} min scoring)", flush=True)
            if s.get("real_train_reference"):
                ref = s["real_train_reference"]
                print(f"    real training images in their place: FID {ref['fid']:.1f}, precision {ref['precision']:.3f}, "
                      f"recall {ref['recall']:.3f}", flush=True)
            if "augmentation" in r:
                for h, a in r["augmentation"]["sites"].items():
                    print(f"    augmentation {h}: real {_fmt((a['real_only'] or {}).get('balanced_accuracy'))} -> real + synthetic "
                          f"{_fmt((a['real_plus_synthetic'] or {}).get('balanced_accuracy'))} (added {a['added']})", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            result = {
                "data": {"path": str(args.data), "image_size": args.image_size, "class_names": class_names,
                         "val_fraction": args.val_fraction,
                         "sites": {s.hospital: {"train": len(s.train_images), "val": len(v.test_images), "test": len(f.test_images),
                                                "class_counts": class_counts(s, v, f)} for s, v, f in zip(sites, vals, full)},
                         "pooled_test": sum(len(f.test_images) for f in full), "pooled_val": sum(len(v.test_images) for v in vals)},
                "features": "ImageNet EfficientNet-Lite0 (fedssl_flower.generative_metrics.FeatureExtractor, 96 px): "
                            "FIDs compare within fedssl only",
                "summary": {sp: summarise([x for x in runs if x.get("eval", "test") == sp]) for sp in ("test", "val")},
                "runs": runs,
            }
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every arm: a long run loses nothing

    print()
    print(f"{'arm':<22} {'seeds':>5} {'FID':>8} {'precision':>9} {'recall':>7} {'too close':>9} {'TSTR':>6} {'real':>6} {'min':>6}"
          f"  ({args.eval})")
    for arm, s in result["summary"][args.eval].items():
        cells = " ".join(f"{s[k]['mean']:>{w}.{p}f}" if k in s else f"{'-':>{w}}"
                         for k, w, p in zip(HEADLINE, (8, 9, 7, 9, 6, 6), (1, 3, 3, 3, 3, 3)))
        print(f"{arm:<22} {len(s['seeds']):>5} {cells} {s['minutes']:>6.1f}")
    print(f"\nwrote {args.out}")


def _reseeded(base: Scorer, seed: int) -> Scorer:
    """The same real features (and training-feature cache), drawing generated images with another seed."""
    scorer = copy.copy(base)
    scorer.seed = seed
    return scorer


if __name__ == "__main__":
    main()

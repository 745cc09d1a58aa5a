"""Which generative model family to train at 32 px on this machine: the product's class-conditional GAN
next to a small class-conditional diffusion model (DDPM), each trained for the same wall-clock budget
on one CPU thread, both scored the same way (issue 16).

Data as in `bench/quality.py` (whose loaders this reuses): HAM10000's 4 acquisition sites, each split
train/test by lesion (0.2), a validation split carved by lesion from each site's training split
(`--val-fraction`). Both models train on the 4 sites' training images pooled (after the carve), or
federated (`--federated-rounds`, below), and are scored on the pooled VALIDATION split; nothing here
reads the test split's images.

Models (`--models`, default both):
  gan   the product's `fedssl_core.generative.ConditionalGAN` (DCGAN generator with class-conditional
        BatchNorm, spectral-norm projection discriminator; z-dim 64, width 32), trained by the product's
        `fedssl_flower.generative.train_gan` (hinge loss, DiffAugment, Adam 2e-4 both, betas (0, 0.99),
        batch 64) in chunks of `--gan-chunk` steps (the run config's gan-steps; a fresh optimizer per
        chunk, as every round of a generative run has) until the budget is spent (the last chunk cut to
        what the remaining time holds). Sampled with
        `generative.sample` (one forward pass).
  ddpm  a compact class-conditional UNet (`TinyUNet`: residual blocks with GroupNorm at 32, 16 and 8 px,
        channels base x (1, 2, 2), sinusoidal time embedding plus a class embedding added to it, one
        self-attention block at 8x8 unless `--ddpm-attention false`), epsilon prediction, cosine noise
        schedule with 1000 steps, Adam 2e-4, batch 64, random horizontal flips, an exponential moving
        average of the weights (decay 0.999 with the usual warm-up; what is sampled). Classifier-free
        guidance: the class is dropped (a null class) for 10 % of the training images, and samples are
        drawn with guidance scale 1 (the conditional model alone: one forward pass per step) and 2
        (eps_u + 2 (eps_c - eps_u): two). Sampled with DDIM (`--ddim-steps`, 50, eta 0, x0 clipped).
        Also scored without the EMA (scale 1) as a check that the EMA is not what decides.

Federated (`--federated-rounds R`, default 0 = pooled as above): the same budget split over R rounds
of the 4 sites, each site training the global model on its own training images for budget / (4 R)
of the clock per round (a fresh optimizer each round, as every round of a generative run has), after
which the site models are averaged weighted by examples (`strategy.weighted_average`, what FedAvg with
server-lr 1 does): the GAN's whole state (both networks, BatchNorm statistics and spectral-norm vectors:
what the product's generative round averages), the UNet and its EMA copy (the EMA's update count carries
on across rounds, as the mean of the sites' steps). Same total compute as the pooled run; scored the
same way on the pooled validation split. Variants get the suffix `-fedR`. `--keep-optimizer-state true`:
each site keeps its Adam moments across rounds (and the GAN across its chunks; the pooled run too)
instead of a fresh Adam (name such a run with `--label`).

  real  a reference, not a model (not in the default `--models`): real training images of the requested
        classes (drawn at random with replacement) in place of generated ones, scored the same way: the
        FID / precision / recall a perfect copy of the training distribution gets against the validation
        split (its memorisation numbers are meaningless: they are training images).

Budget: `--minutes` of training wall clock per model (`--clock cpu`: of this process's CPU time, for a
core another process shares), measured around the optimiser steps only (the clock is read after every
GAN chunk and every DDPM step; a model stops at the first read past the budget), on one torch thread (`--threads`, default 1; run the process under `taskset -c 0`). Steps done,
wall seconds and process CPU seconds are recorded (CPU well under wall means another process shared the core).

Scores: `generative_metrics.score_generator(sample_fn, train, val, extractor=FeatureExtractor(), seed,
max_samples=--eval-samples)`: FID (raw ImageNet EfficientNet-Lite0 features: compare within fedssl only),
improved precision / recall and memorisation (unit-length features) of min(500, len(val)) generated
images in the validation class mix against as many real validation images, memorisation against
2 x 500 training images. Serving cost: seconds per generated image, measured as the wall clock (and the process CPU time) of
drawing `--timing-images` images in batches of 64 (one thread); `--retime` measures the entries already
in `--out` again (on fresh weights of the same shape: the cost does not depend on them). Parameter counts: the networks that
serve (GAN generator; UNet) and that train (GAN generator + discriminator).

A grid of 8 generated images per class (one row per class) of each model goes to
`--figures`/family-<model>.png (generated images only).

    taskset -c 0 .venv/bin/python -m bench.generative_family [--minutes 10] [--models gan,ddpm] [--federated-rounds 10]

Prints a table and writes JSON (default bench/results/generative_family.json) with the command line,
the machine and the torch threads.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedssl_core import generative as gan_models
from fedssl_flower.config import RunConfig
from fedssl_flower.generative import train_gan
from fedssl_flower.generative_metrics import FeatureExtractor, score_generator
from fedssl_flower.training import load_optimizer_moments, optimizer_moments
from fedssl_flower.strategy import weighted_average

from bench.generative import save_grid
from bench.quality import REPO, SITES_METADATA, carve_validation, load_sites, pooled_data

MODELS = ("gan", "ddpm", "real")
DEFAULTS = RunConfig()
GRID_PER_CLASS = 8
TIMESTEPS = 1000


# ---------------------------------------------------------------------------- the diffusion model
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (N,) → (N, dim), as in the DDPM / Transformer papers."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, plus the (time + class) embedding projected to a per-channel bias,
    GroupNorm → SiLU → conv; residual connection (1x1 conv when the width changes)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the pixels of a (small) feature map, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.qkv, self.out = _norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.out(a.transpose(1, 2).reshape(n, c, h, w))


class TinyUNet(nn.Module):
    """(noisy image, timestep, class) → predicted noise, for 32 px images.

    Levels at 32, 16 and 8 px with `base` x (1, 2, 2) channels and one residual block each on the way
    down, a middle of two residual blocks (attention between them) at 8 px, and on the way up two
    residual blocks per level taking the skip connections. Class `num_classes` is the null class of
    classifier-free guidance."""

    def __init__(self, num_classes: int, base: int = 32, mults: tuple[int, ...] = (1, 2, 2), attention: bool = True) -> None:
        super().__init__()
        self.num_classes, self.base, self.mults, self.attention = num_classes, base, mults, attention
        emb_dim = base * 4
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.emb_act = nn.SiLU()
        chans = [base * m for m in mults]
        self.conv_in = nn.Conv2d(3, base, 3, padding=1)
        self.down_blocks, self.downsamples = nn.ModuleList(), nn.ModuleList()
        skips, c = [base], base
        for i, ch in enumerate(chans):
            self.down_blocks.append(ResBlock(c, ch, emb_dim))
            c = ch
            skips.append(c)
            if i < len(chans) - 1:
                self.downsamples.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1, self.mid2 = ResBlock(c, c, emb_dim), ResBlock(c, c, emb_dim)
        self.mid_attn = Attention(c) if attention else nn.Identity()
        self.up_blocks, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for i, ch in reversed(list(enumerate(chans))):
            level = nn.ModuleList()
            for _ in range(2):
                level.append(ResBlock(c + skips.pop(), ch, emb_dim))
                c = ch
            self.up_blocks.append(level)
            if i > 0:
                self.upsamples.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.emb_act(self.time_mlp(timestep_embedding(t, self.base)) + self.class_emb(y))
        h = self.conv_in(x)
        hs = [h]
        for i, block in enumerate(self.down_blocks):
            h = block(h, emb)
            hs.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, level in enumerate(self.up_blocks):
            for block in level:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if i < len(self.upsamples):
                h = self.upsamples[i](F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def cosine_alpha_bar(steps: int = TIMESTEPS, s: float = 0.008) -> torch.Tensor:
    """ᾱ_t for t = 0..steps-1 of the cosine schedule (Nichol & Dhariwal 2021), betas clipped at 0.999."""
    x = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((x + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0).float()


class EMA:
    """Exponential moving average of a model's weights, decay min(`decay`, (1 + n) / (10 + n))."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @classmethod
    def over(cls, averaged: nn.Module, decay: float, updates: int) -> "EMA":
        """An EMA whose running average is `averaged` itself (not a copy), `updates` updates in."""
        ema = cls.__new__(cls)
        ema.model, ema.decay, ema.updates = averaged, decay, updates
        return ema

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def train_ddpm(model: TinyUNet, ema: EMA, images: torch.Tensor, labels: torch.Tensor, *, seconds: float, batch_size: int,
               lr: float, label_dropout: float, seed: int, clock: str = "wall", log_every: int = 100,
               optimizer_state: dict | None = None) -> dict:
    """Train until `seconds` of `clock` (wall or process CPU time) are spent (read after every step).
    `optimizer_state`: Adam's moments restored from it (when it holds any) and saved back into it."""
    g = torch.Generator().manual_seed(seed)
    alpha_bar = cosine_alpha_bar()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if optimizer_state:
        load_optimizer_moments(opt, optimizer_state["unet"])
    model.train()
    order, pos, steps, loss_sum, window = torch.randperm(len(images), generator=g), 0, 0, 0.0, 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    now = CLOCKS[clock]
    b0 = now()
    while now() - b0 < seconds:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=g), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        x0 = images[idx].float() / 127.5 - 1.0
        flip = torch.rand(len(idx), generator=g) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        y = labels[idx].clone()
        y[torch.rand(len(idx), generator=g) < label_dropout] = model.num_classes
        t = torch.randint(0, TIMESTEPS, (len(idx),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        ab = alpha_bar[t][:, None, None, None]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        loss = F.mse_loss(model(xt, t, y), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
        steps += 1
        loss_sum += float(loss.detach())
        window += float(loss.detach())
        if steps % log_every == 0:
            print(f"    ddpm step {steps}: loss {window / log_every:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
            window = 0.0
    model.eval()
    if optimizer_state is not None:
        optimizer_state["unet"] = optimizer_moments(opt)
    return {"steps": steps, "train_seconds": time.perf_counter() - t0, "train_cpu_seconds": time.process_time() - c0,
            "mean_loss": loss_sum / max(steps, 1),
            "examples": steps * batch_size}


@torch.no_grad()
def ddim_sample(model: TinyUNet, labels: torch.Tensor, seed: int, *, steps: int = 50, guidance: float = 1.0,
                batch_size: int = 64) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) images of classes `labels`: DDIM (eta 0) over `steps` evenly spaced timesteps
    from T-1 to 0, x0 clipped to [-1, 1] each step; guidance > 1 mixes in the null-class prediction
    (classifier-free guidance: eps_u + guidance (eps_c - eps_u))."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    g = torch.Generator().manual_seed(int(seed))
    alpha_bar = cosine_alpha_bar()
    ts = torch.linspace(TIMESTEPS - 1, 0, steps).round().long().tolist()
    model.eval()
    out = []
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size]
        n = len(y)
        x = torch.randn(n, 3, 32, 32, generator=g)
        for i, t in enumerate(ts):
            tt = torch.full((n,), t, dtype=torch.long)
            if guidance == 1.0:
                eps = model(x, tt, y)
            else:
                both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, model.num_classes)]))
                eps_c, eps_u = both[:n], both[n:]
                eps = eps_u + guidance * (eps_c - eps_u)
            ab = alpha_bar[t]
            x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
            ab_prev = alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        out.append(gan_models.to_uint8(x))
    return torch.cat(out) if out else torch.zeros(0, 3, 32, 32, dtype=torch.uint8)


# ---------------------------------------------------------------------------- the GAN
def train_gan_for(gan: gan_models.ConditionalGAN, images: torch.Tensor, labels: torch.Tensor, *, seconds: float, chunk: int,
                  batch_size: int, lr: float, seed: int, clock: str = "wall", lr_discriminator: float | None = None,
                  optimizer_state: dict | None = None) -> dict:
    """The product's `train_gan` in chunks of `chunk` steps (a fresh optimizer each unless `optimizer_state`
    carries both networks' Adam moments from chunk to chunk and call to call; chunk seeds
    seed, seed+1, ...) until `seconds` of `clock` (wall or process CPU time) are spent (read after every chunk).
    The last chunk is shortened to the steps the remaining time holds at the rate so far, so the
    GAN ends about where the budget does rather than up to a chunk past it."""
    t0, c0 = time.perf_counter(), time.process_time()
    steps, chunks, last = 0, 0, {}
    now = CLOCKS[clock]
    b0 = now()
    while (elapsed := now() - b0) < seconds:
        n = chunk if steps == 0 else min(chunk, max(1, round((seconds - elapsed) * steps / elapsed)))
        last = train_gan(gan, images, labels, steps=n, batch_size=batch_size, lr_generator=lr,
                         lr_discriminator=lr if lr_discriminator is None else lr_discriminator,
                         seed=seed + chunks, augment=True, optimizer_state=optimizer_state)
        steps += n
        chunks += 1
        if chunks % 10 == 0:
            print(f"    gan step {steps}: D loss {last['discriminator_loss']:.3f}, G loss {last['generator_loss']:.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    gan.eval()
    return {"steps": steps, "chunks": chunks, "chunk_steps": chunk, "train_seconds": time.perf_counter() - t0,
            "train_cpu_seconds": time.process_time() - c0,
            "examples": steps * batch_size, "last_chunk_losses": {k: v for k, v in last.items() if k != "examples"}}


# ---------------------------------------------------------------------------- federated
def average_into(target: nn.Module, models: list[nn.Module], examples: list[int]) -> None:
    """Load into `target` the example-weighted average of the models' whole state (FedAvg)."""
    updates = [({k: v.detach().cpu().numpy() for k, v in m.state_dict().items()}, n) for m, n in zip(models, examples)]
    target.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weighted_average(updates).items()})


def federate(model: nn.Module, sites: list[dict], rounds: int, seconds: float, train_site, after_round=None) -> dict:
    """`rounds` rounds in which every site trains a copy of the global `model` on its own images for
    `seconds` / (rounds x sites) of the clock (`train_site(copy, site, seconds, seed_offset)` -> its training
    record), then the global model becomes the example-weighted average (`after_round(records)` after each).
    Returns the records summed, with the examples of every site and round."""
    share = seconds / (rounds * len(sites))
    totals = {"steps": 0, "train_seconds": 0.0, "train_cpu_seconds": 0.0, "examples": 0}
    per_round, loss_sum = [], 0.0
    for rnd in range(1, rounds + 1):
        copies, recs = [], []
        for i, site in enumerate(sites):
            local = copy.deepcopy(model)
            recs.append(train_site(local, site, share, 1000 * rnd + i))
            copies.append(local)
        for rec in recs:
            for k in totals:
                totals[k] += rec[k]
            loss_sum += rec.get("mean_loss", math.nan) * rec["steps"]
        average_into(model, copies, [r["examples"] for r in recs])
        per_round.append([r["steps"] for r in recs])
        if after_round is not None:
            after_round(recs)
        print(f"    round {rnd}/{rounds}: steps per site {per_round[-1]}", flush=True)
    if "mean_loss" in recs[0]:  # the DDPM's: over every step of every site
        totals["mean_loss"] = loss_sum / max(totals["steps"], 1)
    return {**totals, "rounds": rounds, "sites": [s["name"] for s in sites], "seconds_per_site_round": share,
            "steps_per_site_round": per_round}


# ---------------------------------------------------------------------------- measuring
def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def seconds_per_image(sample_fn, num_classes: int, count: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per image of drawing `count` images in one call."""
    labels = torch.arange(count) % num_classes
    sample_fn(labels[:min(8, count)], 123)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    sample_fn(labels, 1)
    return (time.perf_counter() - t0) / count, (time.process_time() - c0) / count


def retime(runs: list[dict], num_classes: int, count: int) -> None:
    """Measure the sampling cost of the GAN and DDPM entries of `runs` again, on networks of the same
    shape with fresh weights (the cost of one generator pass or of a fixed number of DDIM steps does
    not depend on the weights); the first measurement is kept as `sampling_first`."""
    for r in runs:
        if r["model"] == "gan":
            net = gan_models.ConditionalGAN(num_classes, 32, r["config"]["z_dim"], r["config"]["width"]).generator

            def fn(labels, seed, net=net):
                return gan_models.sample(net, labels, seed, batch_size=64)
        elif r["model"] == "ddpm":
            c = r["config"]
            net = TinyUNet(num_classes, base=c["base_channels"], mults=tuple(c["channel_mults"]), attention=c["attention_8px"])
            steps = int(c["sampler"].split()[1])

            def fn(labels, seed, net=net, w=r["guidance_scale"], steps=steps):
                return ddim_sample(net, labels, seed, steps=steps, guidance=w)
        else:
            continue
        wall, cpu = seconds_per_image(fn, num_classes, count)
        r.setdefault("sampling_first", {"seconds_per_image": r["sampling_seconds_per_image"],
                                        "cpu_seconds_per_image": r.get("sampling_cpu_seconds_per_image")})
        r["sampling_seconds_per_image"], r["sampling_cpu_seconds_per_image"] = wall, cpu
        r["sampling_retimed"] = f"{count} images, fresh weights of the same shape, {time.strftime('%Y-%m-%d %H:%M')}"
        print(f"  {r['variant']}: {wall * 1000:.2f} ms/image wall, {cpu * 1000:.2f} ms/image CPU", flush=True)


def evaluate(name: str, sample_fn, data: dict, extractor: FeatureExtractor, args, num_classes: int, class_names: list[str],
             grid: bool = True) -> dict:
    t0 = time.perf_counter()
    scores = score_generator(sample_fn, data["train_images"], data["train_labels"], data["val_images"], data["val_labels"],
                             extractor=extractor, seed=args.seed, max_samples=args.eval_samples)
    out = {"scores": scores, "score_seconds": time.perf_counter() - t0}
    out["sampling_seconds_per_image"], out["sampling_cpu_seconds_per_image"] = seconds_per_image(sample_fn, num_classes,
                                                                                                  args.timing_images)
    if grid:
        labels = torch.arange(num_classes).repeat_interleave(GRID_PER_CLASS)
        images = sample_fn(labels, args.seed + 3000)
        out["samples_png"] = str(save_grid(list(images.split(GRID_PER_CLASS)), class_names, args.figures / f"family-{name}.png"))
    s = scores
    print(f"  {name}: FID {s['fid']:.1f}, precision {s['precision']:.3f}, recall {s['recall']:.3f}, memorisation ratio "
          f"{s['memorisation_distance_ratio']:.3f}, too close {s['memorisation_too_close_fraction']:.3f}, "
          f"{out['sampling_seconds_per_image'] * 1000:.2f} ms/image", flush=True)
    return out


def _federated(args) -> str:
    return f", federated: {args.federated_rounds} rounds of the 4 sites" if args.federated_rounds else ""


def _fed_suffix(args) -> str:
    return f"-fed{args.federated_rounds}" if args.federated_rounds else ""


def _site_moments(args, data: dict) -> dict[str, dict | None]:
    """--keep-optimizer-state true: a dict per site (and for the pooled run) that keeps its Adam moments
    across rounds and chunks; else None each (a fresh Adam every round and chunk)."""
    return {name: {} if args.keep_optimizer_state == "true" else None for name in [s["name"] for s in data["sites"]] + ["pooled"]}


def run_gan(data: dict, extractor, args, num_classes: int, class_names: list[str]) -> list[dict]:
    torch.manual_seed(args.seed)
    gan = gan_models.ConditionalGAN(num_classes, image_size=32, z_dim=DEFAULTS.gan_z_dim, width=DEFAULTS.gan_width)
    print(f"gan: training for {args.minutes} min in chunks of {args.gan_chunk} steps{_federated(args)} ...", flush=True)

    def train_on(net, images, labels, seconds, seed_offset=0, kept=None):
        return train_gan_for(net, images, labels, seconds=seconds, chunk=args.gan_chunk, batch_size=args.batch_size,
                             lr=args.gan_lr, lr_discriminator=args.gan_lr_discriminator, seed=args.seed + seed_offset,
                             clock=args.clock, optimizer_state=kept)

    moments = _site_moments(args, data)
    if args.federated_rounds:
        train = federate(gan, data["sites"], args.federated_rounds, args.minutes * 60,
                         lambda net, site, seconds, off: train_on(net, site["images"], site["labels"], seconds, off,
                                                                  moments[site["name"]]))
        gan.eval()
    else:
        train = train_on(gan, data["train_images"], data["train_labels"], args.minutes * 60, kept=moments["pooled"])
    print(f"  {train['steps']} steps in {train['train_seconds']:.0f}s", flush=True)

    def sample_fn(labels, seed):
        return gan_models.sample(gan.generator, labels, seed, batch_size=64)

    name = "gan" + (f"-{args.label}" if args.label else "") + _fed_suffix(args)
    out = {"model": "gan", "variant": name, "label": args.label, "federated_rounds": args.federated_rounds, "training": train,
           "params": {"serving": params(gan.generator), "training": params(gan), "generator": params(gan.generator),
                      "discriminator": params(gan.discriminator)},
           "config": {"z_dim": DEFAULTS.gan_z_dim, "width": DEFAULTS.gan_width, "lr": args.gan_lr,
                      "lr_discriminator": args.gan_lr_discriminator, "batch_size": args.batch_size,
                      "diffaugment": True, "chunk_steps": args.gan_chunk, "sampling": "one generator forward pass",
                      "keep_optimizer_state": args.keep_optimizer_state == "true"}}
    out.update(evaluate(name, sample_fn, data, extractor, args, num_classes, class_names))
    return [out]


def run_ddpm(data: dict, extractor, args, num_classes: int, class_names: list[str]) -> list[dict]:
    torch.manual_seed(args.seed)
    model = TinyUNet(num_classes, base=args.ddpm_base, attention=args.ddpm_attention == "true")
    ema = EMA(model, args.ddpm_ema)
    print(f"ddpm: {params(model) / 1e6:.2f} M parameters, training for {args.minutes} min{_federated(args)} ...", flush=True)

    def train_on(net, net_ema, images, labels, seconds, seed_offset=0, kept=None):
        return train_ddpm(net, net_ema, images, labels, seconds=seconds, batch_size=args.batch_size, lr=args.ddpm_lr,
                          label_dropout=args.label_dropout, seed=args.seed + seed_offset, clock=args.clock, optimizer_state=kept)

    moments = _site_moments(args, data)

    if args.federated_rounds:
        # The federated model is the UNet and its EMA copy together (both averaged), the EMA's count carried on.
        pair = nn.ModuleDict({"net": model, "ema": ema.model})

        def train_site(local_pair, site, seconds, off):
            local_ema = EMA.over(local_pair["ema"], ema.decay, ema.updates)  # the site's copy of the global EMA
            return train_on(local_pair["net"], local_ema, site["images"], site["labels"], seconds, off, moments[site["name"]])

        def after_round(recs):  # the EMA's warm-up count moves on by the sites' mean steps
            ema.updates += round(sum(r["steps"] for r in recs) / len(recs))

        train = federate(pair, data["sites"], args.federated_rounds, args.minutes * 60, train_site, after_round)
        model.eval()
    else:
        train = train_on(model, ema, data["train_images"], data["train_labels"], args.minutes * 60, kept=moments["pooled"])
    print(f"  {train['steps']} steps in {train['train_seconds']:.0f}s, mean loss {train['mean_loss']:.4f}", flush=True)
    config = {"base_channels": args.ddpm_base, "channel_mults": list(model.mults), "attention_8px": model.attention,
              "timesteps": TIMESTEPS, "schedule": "cosine", "prediction": "epsilon", "lr": args.ddpm_lr,
              "batch_size": args.batch_size, "hflip": True, "label_dropout": args.label_dropout, "ema_decay": args.ddpm_ema,
              "sampler": f"DDIM {args.ddim_steps} steps, eta 0, x0 clipped", "keep_optimizer_state": args.keep_optimizer_state == "true"}
    runs = []
    tag = (f"-{args.label}" if args.label else "") + _fed_suffix(args)
    variants = [(f"ddpm{tag}", ema.model, 1.0, True)]
    if args.ddpm_cfg2 == "true":
        variants.append((f"ddpm{tag}-cfg2", ema.model, 2.0, True))
    if args.ddpm_raw == "true":
        variants.append((f"ddpm{tag}-noema", model, 1.0, False))
    for name, net, w, grid in variants:
        def sample_fn(labels, seed, net=net, w=w):
            return ddim_sample(net, labels, seed, steps=args.ddim_steps, guidance=w)
        r = {"model": "ddpm", "variant": name, "label": args.label, "federated_rounds": args.federated_rounds, "guidance_scale": w, "ema": net is ema.model, "training": train,
             "params": {"serving": params(model), "training": params(model)}, "config": config}
        r.update(evaluate(name, sample_fn, data, extractor, args, num_classes, class_names, grid=grid))
        runs.append(r)
    return runs


def run_real(data: dict, extractor, args, num_classes: int, class_names: list[str]) -> list[dict]:
    images, labels = data["train_images"], data["train_labels"]
    by_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]

    def sample_fn(wanted, seed):
        g = torch.Generator().manual_seed(int(seed))
        wanted = torch.as_tensor(wanted, dtype=torch.long).reshape(-1)
        idx = torch.stack([by_class[int(c)][torch.randint(len(by_class[int(c)]), (1,), generator=g)[0]] for c in wanted]) \
            if len(wanted) else torch.zeros(0, dtype=torch.long)
        return images[idx]

    out = {"model": "real", "variant": "real-train", "training": {"steps": 0, "train_seconds": 0.0, "train_cpu_seconds": 0.0},
           "params": {"serving": 0, "training": 0},
           "note": "reference: real training images in place of generated ones (memorisation numbers meaningless)"}
    out.update(evaluate("real-train", sample_fn, data, extractor, args, num_classes, class_names, grid=False))
    return [out]


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.2f}"


def machine(threads: int) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": threads, "torch_threads_set": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ham10000")
    ap.add_argument("--models", default="gan,ddpm", help=f"comma list of {', '.join(MODELS)} (real: the reference)")
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per model, on --clock")
    ap.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                    help="what the budget counts: wall clock, or this process's CPU time (when another process shares the core)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="", help="names a variant (suffix of its entries' names); a rerun replaces the entries "
                                                "of its models with the same label")
    ap.add_argument("--val-fraction", type=float, default=0.15, help="validation lesions carved from each site's training split")
    ap.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    ap.add_argument("--gan-lr", type=float, default=DEFAULTS.gan_lr, help="GAN generator learning rate (run config gan-lr)")
    ap.add_argument("--gan-lr-discriminator", type=float, default=None, help="GAN discriminator learning rate (default: --gan-lr)")
    ap.add_argument("--gan-chunk", type=int, default=DEFAULTS.gan_steps, help="GAN steps per train_gan call (run config gan-steps)")
    ap.add_argument("--ddpm-base", type=int, default=32, help="UNet channels at 32 px")
    ap.add_argument("--ddpm-attention", default="true", choices=("true", "false"), help="self-attention at 8x8")
    ap.add_argument("--ddpm-lr", type=float, default=2e-4)
    ap.add_argument("--ddpm-ema", type=float, default=0.999)
    ap.add_argument("--ddpm-raw", default="true", choices=("true", "false"), help="also score the UNet without EMA")
    ap.add_argument("--ddpm-cfg2", default="true", choices=("true", "false"), help="also score with guidance scale 2")
    ap.add_argument("--keep-optimizer-state", default="false", choices=("true", "false"),
                    help="each site (or the pooled run) keeps its Adam moments across rounds and GAN chunks instead of a fresh Adam")
    ap.add_argument("--federated-rounds", type=int, default=0,
                    help="0: train on the pooled sites; R > 0: R federated rounds of the 4 sites, the same budget in all")
    ap.add_argument("--label-dropout", type=float, default=0.1, help="classifier-free guidance: share of null-class labels")
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--eval-samples", type=int, default=500, help="score_generator max_samples")
    ap.add_argument("--timing-images", type=int, default=128, help="images drawn to time sampling")
    ap.add_argument("--retime", action="store_true",
                    help="re-measure the sampling cost of the GAN and DDPM entries already in --out (fresh weights of "
                         "the same shape), e.g. when another process shared the core during the first measurement")
    ap.add_argument("--max-images-per-site", type=int, default=0, help="cap per site before the split (0 = all)")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("FEDSSL_HOME", ".fedssl")) / "cache")
    ap.add_argument("--figures", type=Path, default=Path("bench/results/generative"))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=Path("bench/results/generative_family.json"))
    args = ap.parse_args()
    if args.gan_lr_discriminator is None:
        args.gan_lr_discriminator = args.gan_lr
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        raise SystemExit(f"--models {args.models!r}: expected a comma list of {', '.join(MODELS)}")
    if not args.minutes > 0:
        raise SystemExit(f"--minutes {args.minutes}: expected a positive training budget")
    if args.federated_rounds < 0:
        raise SystemExit(f"--federated-rounds {args.federated_rounds}: expected 0 (pooled) or a number of rounds")
    if args.federated_rounds and "real" in models:
        raise SystemExit("--federated-rounds: the real reference trains nothing; run it without --federated-rounds")
    if args.eval_samples < 4:
        raise SystemExit("--eval-samples must be >= 4")
    if not (args.data / SITES_METADATA).is_file():
        raise SystemExit(f"--data {args.data}: no {SITES_METADATA}; this benchmark needs HAM10000 with its 4 acquisition sites")
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    except ImportError:
        pass
    command = "python -m bench.generative_family " + shlex.join(sys.argv[1:])
    args.image_size = 32

    t0 = time.perf_counter()
    full = load_sites(args)
    carved = [carve_validation(s, args.val_fraction) for s in full]
    train, val = pooled_data([c[0] for c in carved], "pooled-train"), pooled_data([c[1] for c in carved], "pooled-val")
    class_names = train.class_names
    num_classes = len(class_names)
    data = {"train_images": train.train_images, "train_labels": train.train_labels,
            "val_images": val.test_images, "val_labels": val.test_labels,
            "sites": [{"name": site.hospital, "images": site.train_images, "labels": site.train_labels} for site, _ in carved]}
    print(f"{len(train.train_images)} training / {len(val.test_images)} validation images at 32 px "
          f"({time.perf_counter() - t0:.0f}s); {torch.get_num_threads()} torch thread(s), "
          f"affinity {sorted(os.sched_getaffinity(0))}", flush=True)
    extractor = FeatureExtractor()

    # A rerun of some models replaces their entries of the same --label and --seed and keeps the others'
    # (each run carries its command and seed).
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    kept = [{"command": previous.get("command"), "machine": previous.get("machine"), "budget_minutes": previous.get("budget_minutes"),
             "clock": previous.get("clock", "wall"), "seed": previous.get("seed", 0), **r} for r in previous.get("runs", [])
            if r["model"] not in models or r.get("label", "") != args.label or r.get("seed", previous.get("seed", 0)) != args.seed
            or r.get("federated_rounds", 0) != args.federated_rounds]
    runs: list[dict] = list(kept)
    result = {"command": command, "commands": [], "machine": machine(args.threads), "budget_minutes": args.minutes, "clock": args.clock, "seed": args.seed,
              "data": {"path": str(args.data), "image_size": 32, "class_names": class_names, "val_fraction": args.val_fraction,
                       "train": len(train.train_images), "val": len(val.test_images), "eval": "pooled validation split",
                       "site_train": {site.hospital: len(site.train_images) for site, _ in carved},
                       "train_class_counts": torch.bincount(train.train_labels, minlength=num_classes).tolist(),
                       "val_class_counts": torch.bincount(val.test_labels, minlength=num_classes).tolist()},
              "features": "ImageNet EfficientNet-Lite0 (generative_metrics.FeatureExtractor, 96 px): FIDs compare within fedssl only",
              "eval_samples": args.eval_samples, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.retime:
        print(f"re-timing sampling ({args.timing_images} images) ...", flush=True)
        retime(kept, num_classes, args.timing_images)
    for m in models:
        runner = {"gan": run_gan, "ddpm": run_ddpm, "real": run_real}[m]
        for r in runner(data, extractor, args, num_classes, class_names):
            r.update({"command": command, "machine": machine(args.threads), "budget_minutes": args.minutes, "clock": args.clock,
                      "seed": args.seed})
            runs.append(r)
        result["commands"] = list(dict.fromkeys(r["command"] for r in runs))
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every model: a long run loses nothing

    print()
    head = (f"{'model':<28} {'seed':>4} {'FID':>7} {'prec':>6} {'recall':>6} {'memo ratio':>10} {'too close':>9} {'steps':>6} "
            f"{'train s':>7} {'cpu s':>6} {'ms/image':>9} {'cpu ms/im':>9} {'params':>9}")
    print(head)
    lines = [head]
    for r in sorted(runs, key=lambda r: r["model"] == "real"):
        s = r["scores"]
        line = (f"{r['variant']:<28} {r.get('seed', 0):>4} {s['fid']:>7.1f} {s['precision']:>6.3f} {s['recall']:>6.3f} "
                f"{s['memorisation_distance_ratio']:>10.3f} {s['memorisation_too_close_fraction']:>9.3f} "
                f"{r['training']['steps']:>6} {r['training']['train_seconds']:>7.0f} {r['training']['train_cpu_seconds']:>6.0f} "
                f"{r['sampling_seconds_per_image'] * 1000:>9.2f} {_ms(r.get('sampling_cpu_seconds_per_image')):>9} "
                f"{r['params']['serving'] / 1e6:>8.2f}M")
        print(line)
        lines.append(line)
    result["table"] = lines
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

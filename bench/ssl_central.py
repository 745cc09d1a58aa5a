"""Central SimCLR on HAM10000's pooled training images (one model, no federation), with the
encoder's linear probe on the validation split every `--every` steps: what SimCLR learns at a
given number of steps, apart from federated averaging. A diagnostic beside bench/quality.py
(same sites, validation carving and probe recipe: 20 epochs of AdamW at 1e-2, class-weighted),
on raw features and on features standardised with the training mean and std; with
`--recompute-bn` also after the encoder's BatchNorm statistics are recomputed on the clean
training images (`training.recompute_batchnorm`). Besides SimCLR's NT-Xent: MICLe's positive
pairs from one lesion's images (`--positives lesion`), the decoupled contrastive loss (`--loss
dcl`), BYOL and SimSiam (`--method`), the methods issue 13 names, tried here before any of them
goes into the product. One run per call, on one thread; the points go to `--out` as they come.

    .venv/bin/python -m bench.ssl_central --pretrained false --jitter 0.4 --steps 600 --every 150 \\
        --out bench/results/ssl_central/random-j0.4-600.json
    .venv/bin/python -m bench.ssl_central --pretrained false --steps 1200 --every 300 --method byol \\
        --out bench/results/ssl_central/random-j0.4-1200-byol.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "services"))

from bench import quality as Q  # noqa: E402
from fedssl_core import names  # noqa: E402
from fedssl_flower import training  # noqa: E402
from fedssl_flower.config import RunConfig  # noqa: E402
from fedssl_flower.data import HospitalData  # noqa: E402
from fedssl_flower.ssl.losses import NTXentLoss  # noqa: E402
from fedssl_flower.ssl.micle import draw_partners, group_partners  # noqa: E402
from fedssl_flower.ssl.transforms import SimCLRTransform  # noqa: E402


def probe(model, train: HospitalData, val: HospitalData) -> dict:
    """Balanced accuracy of a linear probe on raw and on standardised features."""
    f_train, f_val = training.embed(model, train.train_images), training.embed(model, val.test_images)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    weight = training._class_weights(train.train_labels, len(val.class_names))
    out = {}
    for kind, (x, y) in {"raw": (f_train, f_val), "std": ((f_train - mean) / std, (f_val - mean) / std)}.items():
        torch.manual_seed(0)
        head = torch.nn.Linear(x.shape[1], len(val.class_names))
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.0)
        g = torch.Generator().manual_seed(0)
        for _ in range(20):
            for idx in training._batches(len(x), 64, g):
                loss = F.cross_entropy(head(x[idx]), train.train_labels[idx], weight=weight)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            out[kind] = Q._balanced_accuracy(head(y).argmax(1), val.test_labels)
    out["feat_norm"], out["feat_std_mean"] = float(f_train.norm(dim=1).mean()), float(f_train.std(0).mean())
    return out


class Predictor(torch.nn.Module):
    """BYOL's and SimSiam's predictor: Linear, BatchNorm, ReLU, Linear (hidden 512)."""

    def __init__(self, dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(dim, hidden, bias=False), torch.nn.BatchNorm1d(hidden),
                                          torch.nn.ReLU(inplace=True), torch.nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DCLLoss(torch.nn.Module):
    """The decoupled contrastive loss (Yeh et al., ECCV 2022): NT-Xent with the positive pair
    left out of the denominator, which removes the negative-positive coupling that makes
    NT-Xent slow at small batches."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        n = z1.shape[0]
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        sim = z @ z.T / self.temperature
        partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
        positive = sim[torch.arange(2 * n), partner]
        mask = torch.eye(2 * n, dtype=torch.bool)
        mask[torch.arange(2 * n), partner] = True
        negatives = torch.logsumexp(sim.masked_fill(mask, float("-inf")), dim=1)
        return (negatives - positive).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ham10000")
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".fedssl" / "cache")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--arch", default=names.ARCH_EFFICIENTNET_LITE0, choices=(names.ARCH_EFFICIENTNET_LITE0, names.ARCH_RESNET18),
                    help="the encoder (run config arch)")
    ap.add_argument("--steps", type=int, default=600, help="SimCLR steps of 64 images (cosine learning rate over them)")
    ap.add_argument("--every", type=int, default=150, help="probe every this many steps")
    ap.add_argument("--jitter", type=float, default=0.4, help="colour jitter strength (run config ssl-colour-jitter)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pretrained", default="false", choices=("true", "false"), help="start from ImageNet weights")
    ap.add_argument("--crop-min", type=float, default=0.3, help="smallest random-resized-crop area")
    ap.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature")
    ap.add_argument("--recompute-bn", action="store_true", help="also probe with BatchNorm statistics recomputed on clean images")
    ap.add_argument("--positives", default="views", choices=("views", "lesion"),
                    help="a positive pair: two views of one image (SimCLR), or of two images of one lesion where the "
                         "lesion has several (MICLe, Azizi et al. 2021; one image's two views otherwise)")
    ap.add_argument("--loss", default="ntxent", choices=("ntxent", "dcl"),
                    help="NT-Xent, or the decoupled contrastive loss (Yeh et al. 2022: the positive left out of the denominator)")
    ap.add_argument("--method", default="simclr", choices=("simclr", "byol", "simsiam"),
                    help="SimCLR (contrastive, --loss), BYOL (a predictor toward a momentum target network, Grill et al. "
                         "2020) or SimSiam (a predictor toward the other view, gradient stopped, Chen & He 2021)")
    ap.add_argument("--byol-momentum", type=float, default=0.99, help="BYOL: the target's EMA momentum at the start (cosine to 1)")
    ap.add_argument("--freeze-bn", action="store_true", help="the encoder's BatchNorm statistics stay as they start (ssl-batchnorm = frozen)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)

    sites = Q.load_sites(argparse.Namespace(data=args.data, image_size=args.image_size, max_images_per_site=0,
                                            cache_dir=args.cache_dir, label_map="", class_names=""))
    carved = [Q.carve_validation(s, 0.15) for s in sites]
    train, val = Q.pooled_data([c[0] for c in carved]), Q.pooled_data([c[1] for c in carved], "val")
    cfg = RunConfig(arch=args.arch, pretrained=args.pretrained == "true", image_size=args.image_size,
                    finetune_mode="full")
    model = Q.fresh_model(cfg, len(val.class_names))
    result = {"command": "python -m bench.ssl_central " + " ".join(sys.argv[1:]),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "points": []}

    def train_mode() -> None:
        model.train()
        if args.freeze_bn:  # after every probe too, or the statistics would adapt from the first one on
            for layer in training.encoder_batchnorms(model).values():
                layer.eval()

    def record(step: int, loss: float | None) -> None:
        model.eval()
        point = {**probe(model, train, val), "step": step, "loss": loss}
        if args.recompute_bn:
            recal = copy.deepcopy(model)
            training.recompute_batchnorm(recal, train.train_images)
            point["bn_recomputed"] = probe(recal, train, val)
        train_mode()
        result["points"].append(point)
        print(json.dumps(point), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    partners = group_partners(train.train_groups)
    result["multi_image_fraction"] = float(sum(len(p) > 0 for p in partners) / len(partners))
    record(0, None)
    params = list(model.encoder.parameters()) + list(model.projection_head.parameters())
    predictor = target = None
    if args.method in ("byol", "simsiam"):
        predictor = Predictor(model.projection_head.layers[-1].out_features)
        params += list(predictor.parameters())
    if args.method == "byol":
        target = torch.nn.Sequential(copy.deepcopy(model.encoder), copy.deepcopy(model.projection_head)).requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    criterion = NTXentLoss(args.temperature) if args.loss == "ntxent" else DCLLoss(args.temperature)
    transform = SimCLRTransform(crop_scale=(args.crop_min, 1.0), brightness=args.jitter, contrast=args.jitter,
                                saturation=args.jitter, mean=model.mean, std=model.std)
    g = torch.Generator().manual_seed(0)
    train_mode()
    total, t0 = 0.0, time.time()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        idx = torch.randint(0, len(train.train_images), (64,), generator=g)
        if args.positives == "lesion":
            other = draw_partners(partners, idx, g)
            v1, _ = transform(train.train_images[idx], g)
            _, v2 = transform(train.train_images[other], g)
        else:
            v1, v2 = transform(train.train_images[idx], g)
        views = torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last)
        z = model.projection_head(model.encoder(views))
        if args.method == "simclr":
            loss = criterion(z[:64], z[64:])
        else:
            q = predictor(z)
            if target is not None:
                with torch.no_grad():
                    t = target(views)
            else:
                t = z.detach()
            loss = -0.5 * (F.cosine_similarity(q[:64], t[64:]).mean() + F.cosine_similarity(q[64:], t[:64]).mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if target is not None:  # BYOL's target: an exponential moving average of the online network
            m = 1 - (1 - args.byol_momentum) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            online = list(model.encoder.parameters()) + list(model.projection_head.parameters())
            with torch.no_grad():
                for tp, op in zip(target.parameters(), online):
                    tp.mul_(m).add_(op.detach(), alpha=1 - m)
        total += float(loss.detach())
        if step % args.every == 0:
            record(step, total / args.every)
            total = 0.0
            print(f"  {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()

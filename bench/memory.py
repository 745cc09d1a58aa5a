"""Where a hospital's memory goes: anonymous memory (private to a process, never shared with
another SuperNode's) after each library the warm SuperExec preloads, after the app's own modules
and the model, and its growth over one SSL round and one fine-tuning round of the ClientApp's
training code, with and without activation checkpointing of the encoder (timm's
`set_grad_checkpointing`: blocks recompute their forward pass during backward instead of keeping
their activations). Issue 18 asks for at most 1 GB per SuperNode with its ClientApp.

    python -m bench.memory                      # ~1 minute on one core; writes bench/results/memory.json

Each variant runs in a fresh process, so allocator caches of one do not hide the other's peak.
Read from /proc/self/smaps_rollup (Linux)."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def anonymous_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "Anonymous":
            return int(value.split()[0]) / 1024
    raise RuntimeError("/proc/self/smaps_rollup has no Anonymous line")


def probe(checkpointing: bool, image_size: int, batch_size: int, steps: int) -> dict:
    """In this process: the preload, the model, an SSL round and a fine-tuning round."""
    from fedssl_flower.warm_exec import PRELOAD

    out = {"start": anonymous_mb(), "imports": {}}
    for name in PRELOAD:
        importlib.import_module(name)
        out["imports"][name] = anonymous_mb()
    import torch

    from fedssl_core import names
    from fedssl_core.models import FedSSLModel, set_torch_threads
    from fedssl_flower import client_app, training  # noqa: F401 (what a task imports)

    set_torch_threads()
    out["app_modules"] = anonymous_mb()
    torch.manual_seed(0)
    model = FedSSLModel(names.ARCH_EFFICIENTNET_LITE0, num_classes=7)
    model.encoder.set_grad_checkpointing(checkpointing)
    out["model"] = anonymous_mb()
    images = torch.randint(0, 256, (batch_size * steps, 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.arange(len(images)) % 7
    t0 = time.perf_counter()
    training.train_ssl(model, images, names.SSL_SIMCLR, epochs=1, batch_size=batch_size)
    out["ssl_round"], out["ssl_seconds"] = anonymous_mb(), time.perf_counter() - t0
    t0 = time.perf_counter()
    training.train_supervised(model, images, labels, epochs=1, batch_size=batch_size, mode=names.FINETUNE_FULL)
    out["finetune_round"], out["finetune_seconds"] = anonymous_mb(), time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=64, help="as bench/scaling.py's hospitals (64 px)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "memory.json")
    ap.add_argument("--child", choices=("plain", "checkpointing"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(probe(args.child == "checkpointing", args.image_size, args.batch_size, args.steps)))
        return
    results = {}
    for variant in ("plain", "checkpointing"):
        proc = subprocess.run([sys.executable, "-m", "bench.memory", "--child", variant, "--image-size", str(args.image_size),
                               "--batch-size", str(args.batch_size), "--steps", str(args.steps)],
                              cwd=REPO, capture_output=True, text=True, check=True)
        r = results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{variant:>14}: preload {r['imports'][list(r['imports'])[-1]]:.0f} MB anonymous "
              f"(torch {r['imports']['torch'] - r['imports']['PIL.Image']:.0f}, torchvision "
              f"{r['imports']['torchvision'] - r['imports']['torch']:.0f}), model {r['model'] - r['app_modules']:.0f}, "
              f"SSL round +{r['ssl_round'] - r['model']:.0f} ({r['ssl_seconds']:.1f}s), fine-tuning round "
              f"+{r['finetune_round'] - r['ssl_round']:.0f} ({r['finetune_seconds']:.1f}s), end {r['finetune_round']:.0f} MB",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"python": platform.python_version()},
                                    "config": {"image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps},
                                    "anonymous_mb": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

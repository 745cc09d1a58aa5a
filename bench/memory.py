"""Where a hospital's memory goes: anonymous memory (private to a process, never shared with
another SuperNode's) after each library the warm SuperExec preloads, after the app's own modules
and the model, then the peak growth of one round of the ClientApp's training code (an SSL round,
or a fine-tuning round of the shipped recipe), with and without activation checkpointing of the
encoder (run config `activation-checkpointing`: blocks recompute their forward pass during
backward instead of keeping their activations). Issue 18 asks for at most 1 GB per SuperNode
with its ClientApp.

    python -m bench.memory                                # bench/scaling.py's hospitals: 64 px, batch 32
    python -m bench.memory --image-size 96 --batch-size 64  # the shipped recipe's fine-tuning rounds
    python -m bench.memory --env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 --label jemalloc  # another allocator

~1-2 minutes on one core. Each (variant, phase) runs in a fresh process, so the allocator
caches of one do not hide another's peak. Results go into bench/results/memory.json under the
image size and batch size (other sizes already there are kept). Read from /proc/self (Linux):
anonymous memory from smaps_rollup, during a round sampled every 10 ms by a thread for its
peak, then two more rounds unsampled for the time a step takes. The growth of resident
memory's high-water mark (VmHWM) is recorded beside it (it also counts library code paged in
by the first step, pages shared with every other process). `--env KEY=VALUE --label L` runs
the probes under another allocator set-up and stores the result under its own key."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "checkpointing")
PHASES = ("ssl", "finetune")


def _proc_mb(path: str, key: str) -> float:
    for line in Path(path).read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) / 1024
    raise RuntimeError(f"{path} has no {key} line")


def anonymous_mb() -> float:
    return _proc_mb("/proc/self/smaps_rollup", "Anonymous")


def probe(checkpointing: bool, phase: str, image_size: int, batch_size: int, steps: int) -> dict:
    """In this process: the preload, the model, then one round of `phase`."""
    from fedssl_flower.warm_exec import PRELOAD

    out = {"start": anonymous_mb(), "imports": {},
           "allocator_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "LD_PRELOAD"))}}
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
    out["model"] = anonymous_mb()
    images = torch.randint(0, 256, (batch_size * steps, 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.arange(len(images)) % 7
    before = _proc_mb("/proc/self/status", "VmRSS")
    if _proc_mb("/proc/self/status", "VmHWM") > before + 1:
        raise RuntimeError("resident memory already peaked above its current level before the round: the peak would hide it")
    peak, done = [out["model"]], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], anonymous_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    def one_round() -> float:
        t0 = time.perf_counter()
        if phase == "ssl":
            training.train_ssl(model, images, names.SSL_SIMCLR, epochs=1, batch_size=batch_size, checkpointing=checkpointing)
        else:
            training.train_supervised(model, images, labels, epochs=1, batch_size=batch_size, mode=names.FINETUNE_FULL,
                                      loss=names.LOSS_BALANCED_SOFTMAX, checkpointing=checkpointing)
        return time.perf_counter() - t0

    try:
        out["round_seconds"] = one_round()  # a task's one round, sampled (the sampler slows it)
    finally:
        done.set()
        sampler.join()
    out["round_peak"] = max(peak[0], anonymous_mb())
    out["round_hwm_growth"] = _proc_mb("/proc/self/status", "VmHWM") - before
    out["after_round"] = anonymous_mb()
    out["step_seconds"] = (one_round() + one_round()) / (2 * steps)  # two more rounds, unsampled: the time a step takes
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=64, help="as bench/scaling.py's hospitals (64 px)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "memory.json")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="set in the probes' environment, e.g. an allocator: LD_PRELOAD=/path/libjemalloc.so.2 "
                         "or MALLOC_MMAP_THRESHOLD_=131072 (repeatable; recorded, and the result is stored under --label)")
    ap.add_argument("--label", default="", help="appended to the result's key (image size and batch size)")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "PHASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    env = dict(os.environ)
    for item in args.env:
        name, eq, value = item.partition("=")
        if not eq or not name:
            ap.error(f"--env {item!r}: expected KEY=VALUE")
        if name == "LD_PRELOAD" and not Path(value).is_file():
            ap.error(f"--env LD_PRELOAD={value}: no such library")
        env[name] = value
    if args.image_size < 16 or args.batch_size < 2 or args.steps < 1:
        ap.error(f"--image-size must be >= 16, --batch-size >= 2 and --steps >= 1; got {args.image_size}, "
                 f"{args.batch_size}, {args.steps}")
    if args.child:
        variant, phase = args.child
        print(json.dumps(probe(variant == "checkpointing", phase, args.image_size, args.batch_size, args.steps)))
        return
    results: dict = {}
    for phase in PHASES:
        for variant in VARIANTS:
            proc = subprocess.run([sys.executable, "-m", "bench.memory", "--child", variant, phase, "--image-size",
                                   str(args.image_size), "--batch-size", str(args.batch_size), "--steps", str(args.steps)],
                                  cwd=REPO, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"bench.memory: the {variant} {phase} probe failed:\n{proc.stderr[-4000:]}")
            r = results.setdefault(variant, {})[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
            imports = r["imports"]
            print(f"{phase:>8} {variant:>13}: preload {imports[list(imports)[-1]]:.0f} MB anonymous (torch "
                  f"{imports['torch'] - imports['PIL.Image']:.0f}, torchvision {imports['torchvision'] - imports['torch']:.0f}), "
                  f"model {r['model'] - r['app_modules']:.0f}, the round's peak +{r['round_peak'] - r['model']:.0f} MB "
                  f"(resident high-water mark +{r['round_hwm_growth']:.0f}), peak {r['round_peak']:.0f} MB anonymous; "
                  f"{r['step_seconds']:.2f} s a step", flush=True)
    key = f"{args.image_size}px-batch{args.batch_size}" + (f"-{args.label}" if args.label else "")
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc = doc if "configs" in doc else {}  # an older single-config file is replaced
    doc["machine"] = {"python": platform.python_version()}
    doc.setdefault("configs", {})[key] = {"image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
                                          "env": args.env, "command": "python -m bench.memory " + " ".join(sys.argv[1:]),
                                          "mb": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out} ({key})")


if __name__ == "__main__":
    main()

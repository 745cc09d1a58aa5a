"""What Flower costs: the ClientApp's local training throughput next to a plain PyTorch loop,
and where a federated round's time goes.

1. Plain loop: this process loads the hospital's data exactly as the SuperNode does
   (`load_hospital_data`, same node config and decode cache) and runs `training.train_ssl`
   for `--rounds` epochs: images/s per epoch.
2. Flower: a real registry, SuperLink and `--hospitals` SuperNodes on this machine run
   `--rounds` SSL rounds of the same configuration. Each hospital reports, from inside its
   ClientApp process, how long process start-up, data set-up, local compute and the whole
   handler took (`names.TIMING_KEYS`); the aggregator records the round's wall-clock split
   (train exchange, aggregation, evaluation, registration) in the run folder.

Throughput inside the ClientApp = examples / compute_seconds; the target is within 10% of
the plain loop. The split shows Flower's own cost: spawning a ClientApp process per message,
moving the model through the SuperLink, (de)serialising it.

    .venv/bin/python -m bench.flower_overhead [--data ../shared/data/ham10000] [--max-images 1024]

Prints tables and writes JSON (default bench/results/flower_overhead.json). Numbers are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from fedssl_core import names
from fedssl_core.models import FedSSLModel, set_torch_threads
from fedssl_flower import training
from fedssl_flower.data import load_hospital_data

from tests.support import processes as P

REPO = Path(__file__).resolve().parents[1]


def node_config(args, i: int, cache_dir: Path) -> dict:
    return {"hospital": f"hospital-{i}", "ssl-task": args.ssl_task, "data-path": str(args.data), "partition-id": i,
            "num-partitions": args.hospitals, "max-images": args.max_images, "cache-dir": str(cache_dir)}


def plain_loop(args, cache_dir: Path) -> dict:
    threads = set_torch_threads()
    data = load_hospital_data(node_config(args, 0, cache_dir), args.image_size, args.seed)
    torch.manual_seed(args.seed)
    model = FedSSLModel(args.arch, num_classes=len(data.class_names))
    rates = []
    for epoch in range(args.rounds):
        t0 = time.perf_counter()
        m = training.train_ssl(model, data.train_images, args.ssl_task, epochs=1, batch_size=args.batch_size,
                               lr=args.lr, share="encoder", seed=args.seed + epoch)
        rates.append(m[names.M_EXAMPLES] / (time.perf_counter() - t0))
    return {"torch_threads": threads, "train_examples": len(data.train_images), "images_per_s_per_epoch": rates,
            "images_per_s_median": statistics.median(rates)}


def federated(args, work: Path, cache_dir: Path) -> tuple[list[dict], str]:
    work.mkdir(parents=True, exist_ok=True)
    with P.cluster(work) as c:
        registry = P.start_registry(c, work / "registry", log_level="WARNING")
        _, port = P.start_superlink(c, registry=registry, runs_dir=work / "runs")
        for i in range(args.hospitals):
            cfg = node_config(args, i, cache_dir)
            P.start_supernode(c, port, f"node-{i}", P.node_config(**cfg))
        result = P.submit(port, work, f"ssl-rounds={args.rounds}", "finetune-rounds=0", f"image-size={args.image_size}",
                          f"batch-size={args.batch_size}", f"lr={args.lr}", f"arch={args.arch}", f"seed={args.seed}",
                          f"min-hospitals={args.hospitals}", f"local-baseline={'true' if args.local_baseline else 'false'}",
                          f"probe-epochs={args.probe_epochs}", timeout=3600)
        if result.returncode != 0:
            raise SystemExit(f"the federated run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{c.logs()[-5000:]}")
    (run_dir,) = (work / "runs").iterdir()
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return rounds, result.stdout


def split(record: dict) -> dict:
    """One round's wall time, by where it went."""
    agg, timing = record["aggregated"], record["timing"]
    hospitals = record["hospitals"].values()
    slowest = max(hospitals, key=lambda m: m.get(names.M_HANDLER_SECONDS, 0.0))
    handler = slowest.get(names.M_HANDLER_SECONDS, 0.0)
    compute = slowest.get(names.M_COMPUTE_SECONDS, 0.0)
    setup = slowest.get(names.M_SETUP_SECONDS, 0.0)
    startup = slowest.get(names.M_STARTUP_SECONDS, 0.0)
    baseline = slowest.get(names.M_BASELINE_SECONDS, 0.0)
    return {
        "round": record["round"],
        "round_seconds": record["duration_seconds"],
        "local_compute_seconds": compute,
        "local_baseline_seconds": baseline,
        "clientapp_setup_seconds": setup,
        "clientapp_other_seconds": max(0.0, handler - compute - setup - baseline),  # (de)serialisation, context.state
        "clientapp_process_start_seconds": startup,
        "flower_transport_seconds": max(0.0, timing["train_seconds"] - handler - startup),  # SuperLink round trips, polling
        "aggregate_seconds": timing["aggregate_seconds"],
        "evaluate_seconds": timing["evaluate_seconds"],
        "register_seconds": timing.get("register_seconds", 0.0),
        "clientapp_images_per_s": agg.get(names.M_EXAMPLES, 0) / max(compute, 1e-9) if len(record["hospitals"]) == 1
        else sum(m[names.M_EXAMPLES] / m[names.M_COMPUTE_SECONDS] for m in hospitals) / len(record["hospitals"]),
        "bytes_sent": record["bytes_sent"], "bytes_received": record["bytes_received"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ham10000")
    ap.add_argument("--max-images", type=int, default=1024, help="images per hospital before the train/test split")
    ap.add_argument("--hospitals", type=int, default=1, help="1 isolates Flower's cost; more share this machine's cores")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ssl-task", default=names.SSL_SIMCLR, choices=names.SSL_TASKS)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-epochs", type=int, default=5)
    ap.add_argument("--local-baseline", action="store_true", help="also train each hospital's local-only model")
    ap.add_argument("--out", type=Path, default=Path("bench/results/flower_overhead.json"))
    args = ap.parse_args()
    if not (args.data / "HAM10000_metadata.csv").is_file():
        raise SystemExit(f"no HAM10000 at {args.data} (expected HAM10000_metadata.csv there); pass --data")

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp) / "cache"
        print(f"plain PyTorch loop: {args.rounds} epochs of {args.ssl_task} ...", flush=True)
        plain = plain_loop(args, cache_dir)  # also fills the decode cache the SuperNodes then read
        print(f"Flower: {args.hospitals} SuperNode(s), {args.rounds} SSL rounds ...", flush=True)
        t0 = time.perf_counter()
        rounds, _ = federated(args, Path(tmp) / "federation", cache_dir)
        wall = time.perf_counter() - t0
    splits = [split(r) for r in rounds]
    flower_rate = statistics.median(s["clientapp_images_per_s"] for s in splits)
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "plain_loop": plain,
        "clientapp_images_per_s_median": flower_rate,
        "clientapp_vs_plain": flower_rate / plain["images_per_s_median"],
        "rounds": splits,
        "federated_wall_seconds": wall,
        "target": "ClientApp throughput within 10% of the plain loop (ratio >= 0.9)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"local training throughput ({args.arch}, {args.image_size}px, batch {args.batch_size}, {args.ssl_task}, "
          f"{plain['train_examples']} images, {plain['torch_threads']} threads)")
    print(f"  plain PyTorch loop   {plain['images_per_s_median']:8.1f} images/s (median over {args.rounds} epochs)")
    print(f"  inside the ClientApp {flower_rate:8.1f} images/s (median over {args.rounds} rounds)")
    print(f"  ratio                {result['clientapp_vs_plain']:8.2f} (target >= 0.90)")
    print()
    cols = ["round_seconds", "local_compute_seconds", "clientapp_process_start_seconds", "clientapp_setup_seconds",
            "clientapp_other_seconds", "flower_transport_seconds", "aggregate_seconds", "evaluate_seconds", "register_seconds"]
    short = ["round", "compute", "proc start", "setup", "ser/state", "transport", "aggregate", "evaluate", "register"]
    print("per-round time split, seconds (slowest hospital)")
    print(f"  {'#':>2} " + " ".join(f"{h:>10}" for h in short))
    for s in splits:
        print(f"  {s['round']:>2} " + " ".join(f"{s[c]:>10.2f}" for c in cols))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

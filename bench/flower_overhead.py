"""What Flower costs: the ClientApp's local training throughput next to a plain PyTorch loop,
and where a federated round's time goes, with fedssl's warm ClientApp start and without it.

1. Plain loop: this process loads the hospital's data exactly as the SuperNode does
   (`load_hospital_data`, same node config and decode cache) and runs the phase's local
   training (`--phase finetune`, the default recipe: `train_supervised`; or `ssl`) for
   `--rounds` rounds of `--local-steps`: images/s per round.
2. Flower: a real registry, SuperLink and `--hospitals` SuperNodes on this machine run
   `--rounds` rounds of the same configuration, once per start mode (`--modes`): `warm`
   (`fedssl-supernode`: ClientApp tasks forked from a SuperExec that imported torch once) and
   `cold` (Flower's default, a new `flwr-clientapp` program per message), in the same run so
   both see the same machine. Each hospital reports, from inside its ClientApp process, how
   long process start-up, data set-up, scoring the previous global model, local compute and
   the whole handler took (`names.TIMING_KEYS`); the aggregator records the exchange's wall time.

A round is one exchange (the train message also scores the previous round's global model).
Its **fixed cost** is the round's wall time minus the hospital's local compute (training,
the local-only baseline's training and the scoring): what Flower and fedssl add around the
work itself. Throughput inside the ClientApp = examples / compute seconds.

    .venv/bin/python -m bench.flower_overhead [--data ../shared/data/ham10000] [--max-images 1024] [--modes warm,cold]

Prints tables and writes JSON (default bench/results/flower_overhead.json). Numbers are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from fedssl_core import names
from fedssl_core.models import FedSSLModel, set_torch_threads
from fedssl_flower import local
from fedssl_flower.config import RunConfig
from fedssl_flower.data import load_hospital_data

from tests.support import processes as P

REPO = Path(__file__).resolve().parents[1]
BARE_PAYLOAD_BYTES = 13_735_963  # EfficientNet-Lite0's packed float32 weights, when no fedssl mode ran first


def node_config(args, i: int, cache_dir: Path) -> dict:
    return {"hospital": f"hospital-{i}", "ssl-task": args.ssl_task, "data-path": str(args.data), "partition-id": i,
            "num-partitions": args.hospitals, "max-images": args.max_images, "cache-dir": str(cache_dir),
            "threads": max(1, (os.cpu_count() or 1) // args.hospitals)}


def run_config(args) -> list[str]:
    ssl = args.phase == names.PHASE_SSL
    return [f"ssl-rounds={args.rounds if ssl else 0}", f"finetune-rounds={0 if ssl else args.rounds}",
            f"image-size={args.image_size}", f"batch-size={args.batch_size}", f"local-steps={args.local_steps}",
            f"arch=\"{args.arch}\"", f"pretrained={'true' if args.pretrained else 'false'}", f"seed={args.seed}",
            f"min-hospitals={args.hospitals}", f"local-baseline={'true' if args.local_baseline else 'false'}",
            f"probe-epochs={args.probe_epochs}"]


def plain_loop(args, cache_dir: Path) -> dict:
    cfg = RunConfig.from_mapping(dict(kv.split("=", 1) for kv in run_config(args)) | {"arch": args.arch})
    threads = set_torch_threads(node_config(args, 0, cache_dir)["threads"])
    data = load_hospital_data(node_config(args, 0, cache_dir), args.image_size, args.seed)
    torch.manual_seed(args.seed)
    model = FedSSLModel(args.arch, num_classes=len(data.class_names), pretrained=args.pretrained)
    rates = []
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        m = local.train_round(model, data, args.ssl_task, args.phase, cfg, args.seed + rnd, rnd)
        rates.append(m[names.M_EXAMPLES] / (time.perf_counter() - t0))
    return {"torch_threads": threads, "train_examples": len(data.train_images), "images_per_s_per_round": rates,
            "images_per_s_median": statistics.median(rates)}


def federated(args, work: Path, cache_dir: Path, warm: bool, extra: tuple[str, ...] = ()) -> tuple[list[dict], str]:
    work.mkdir(parents=True, exist_ok=True)
    with P.cluster(work) as c:
        registry = P.start_registry(c, work / "registry", log_level="WARNING")
        _, port = P.start_superlink(c, registry=registry, runs_dir=work / "runs")
        for i in range(args.hospitals):
            P.start_supernode(c, port, f"node-{i}", P.node_config(**node_config(args, i, cache_dir)), warm=warm)
        result = P.submit(port, work, *run_config(args), *extra, timeout=3600)
        if result.returncode != 0:
            raise SystemExit(f"the federated run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{c.logs()[-5000:]}")
    (run_dir,) = (work / "runs").iterdir()
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return rounds, result.stdout


def bare(args, work: Path, payload_bytes: int) -> dict:
    """Flower's floor: the bare app (bench/bare_flower) on the same kind of SuperLink and
    SuperNodes (Flower's own `flower-supernode`), the same payload, handlers that return at once."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "bare.json"
    with P.cluster(work) as c:
        _, port = P.start_superlink(c, runs_dir=work / "runs")
        for i in range(args.hospitals):
            c.spawn(f"bare-node-{i}", [str(P.VENV_BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                                        "--port", str(P.free_port())], P.base_env(FLWR_HOME=str(work / f"flwr-node-{i}")))
        cmd = [str(P.VENV_BIN / "fedssl-submit"), "--superlink", f"127.0.0.1:{port}", "--app", str(REPO / "bench" / "bare_flower"),
               "--flwr-home", str(work / "flwr-cli"), "--poll-seconds", "5", "-c", f"rounds={args.rounds}",
               "-c", f"payload-bytes={payload_bytes}", "-c", f"min-nodes={args.hospitals}", "-c", f'out="{out}"']
        result = subprocess.run(cmd, env=P.base_env(), capture_output=True, text=True, timeout=1800)
        if result.returncode != 0 or not out.is_file():
            raise SystemExit(f"the bare Flower run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{c.logs()[-5000:]}")
    return json.loads(out.read_text())


def split(record: dict, previous: dict | None) -> dict:
    """One round's exchange, by where its time went (the slowest hospital's view). The
    scoring done in this exchange is of the previous round's model: `previous`'s evaluation."""
    timing = record["timing"]
    hospitals = record["hospitals"]
    trained = {h: m for h, m in hospitals.items() if names.M_HANDLER_SECONDS in m}
    name, slowest = max(trained.items(), key=lambda kv: kv[1][names.M_HANDLER_SECONDS])
    handler = slowest[names.M_HANDLER_SECONDS]
    compute = slowest.get(names.M_COMPUTE_SECONDS, 0.0)
    setup = slowest.get(names.M_SETUP_SECONDS, 0.0)
    startup = slowest.get(names.M_STARTUP_SECONDS, 0.0)
    baseline = slowest.get(names.M_BASELINE_SECONDS, 0.0)
    scoring = (previous or {}).get("hospitals", {}).get(name, {}).get(names.M_EVALUATE_SECONDS, 0.0)
    exchange = timing["train_seconds"] + timing["aggregate_seconds"]
    return {
        "round": record["round"],
        "round_seconds": exchange,
        "local_compute_seconds": compute,
        "local_baseline_seconds": baseline,
        "scoring_seconds": scoring,
        "fixed_cost_seconds": exchange - compute - baseline - scoring,
        "clientapp_process_start_seconds": startup,
        "clientapp_setup_seconds": setup,
        "clientapp_other_seconds": max(0.0, handler - compute - setup - baseline - scoring),  # (de)serialisation, state files
        "flower_transport_seconds": max(0.0, timing["train_seconds"] - handler - startup),  # SuperLink round trips, polling
        "aggregate_seconds": timing["aggregate_seconds"],
        "final_evaluation_seconds": timing["evaluate_seconds"],
        "register_seconds": timing.get("register_seconds", 0.0),
        "clientapp_images_per_s": sum(m[names.M_EXAMPLES] / m[names.M_COMPUTE_SECONDS] for m in trained.values()) / len(trained),
        "bytes_sent": record["bytes_sent"], "bytes_received": record["bytes_received"],
        **({"secure_aggregation": record["secure_aggregation"]} if "secure_aggregation" in record else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ham10000")
    ap.add_argument("--max-images", type=int, default=1024, help="images per hospital before the train/test split")
    ap.add_argument("--hospitals", type=int, default=1, help="1 isolates Flower's cost; more share this machine's cores")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="warm,cold,bare",
                    help="warm (fedssl-supernode), cold (Flower's per-message ClientApp programs), bare (a bare Flower app "
                         "with the same payload whose handlers return at once: Flower's floor), secure (warm with "
                         "secure-aggregation=true: Flower's SecAgg+, needs --hospitals >= 2)")
    ap.add_argument("--phase", default=names.PHASE_FINETUNE, choices=names.PHASES)
    ap.add_argument("--ssl-task", default=names.SSL_SIMCLR, choices=names.SSL_TASKS)
    ap.add_argument("--arch", default="efficientnet_lite0", choices=names.ARCHITECTURES)
    ap.add_argument("--pretrained", default=True, type=lambda v: v.lower() == "true", help="true|false")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--local-steps", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-epochs", type=int, default=5)
    ap.add_argument("--local-baseline", action="store_true", help="also train each hospital's local-only model")
    ap.add_argument("--out", type=Path, default=Path("bench/results/flower_overhead.json"))
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"warm", "cold", "bare", "secure"}:
        raise SystemExit(f"--modes {args.modes!r}: expected a comma-separated list of warm, cold, bare, secure")
    if "secure" in modes and args.hospitals < 2:
        raise SystemExit("--modes secure needs --hospitals >= 2: secure aggregation sums the updates of two or more")
    if not (args.data / "HAM10000_metadata.csv").is_file():
        raise SystemExit(f"no HAM10000 at {args.data} (expected HAM10000_metadata.csv there); pass --data")

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp) / "cache"
        print(f"plain PyTorch loop: {args.rounds} rounds of {args.phase} ...", flush=True)
        plain = plain_loop(args, cache_dir)  # also fills the decode cache the SuperNodes then read
        for mode in modes:
            if mode == "bare":
                payload = int(statistics.median([s["bytes_sent"] for r in runs.values() for s in r["rounds"]] or [BARE_PAYLOAD_BYTES * args.hospitals]))
                print(f"bare Flower app: {args.hospitals} SuperNode(s), {args.rounds} rounds of {payload} bytes ...", flush=True)
                floor = bare(args, Path(tmp) / "bare", payload // max(1, args.hospitals))
                floor["round_seconds_median"] = statistics.median(r["round_seconds"] for r in floor["rounds"])
                runs[mode] = floor
                continue
            print(f"Flower ({mode} ClientApp start): {args.hospitals} SuperNode(s), {args.rounds} {args.phase} rounds ...", flush=True)
            t0 = time.perf_counter()
            rounds, _ = federated(args, Path(tmp) / f"federation-{mode}", cache_dir, warm=mode in ("warm", "secure"),
                                  extra=("secure-aggregation=true",) if mode == "secure" else ())
            splits = [split(r, rounds[i - 1] if i else None) for i, r in enumerate(rounds)]
            rate = statistics.median(s["clientapp_images_per_s"] for s in splits)
            runs[mode] = {"rounds": splits, "federated_wall_seconds": time.perf_counter() - t0,
                          "clientapp_images_per_s_median": rate, "clientapp_vs_plain": rate / plain["images_per_s_median"],
                          "fixed_cost_seconds_median": statistics.median(s["fixed_cost_seconds"] for s in splits)}
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": "python -m bench.flower_overhead " + " ".join(sys.argv[1:]),
        "plain_loop": plain,
        "modes": runs,
        "target": "ClientApp throughput within 10% of the plain loop (ratio >= 0.9); fixed cost of a round <= 8 s (issue 18)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"local training throughput ({args.arch}, {args.image_size}px, batch {args.batch_size}, {args.phase}, "
          f"{plain['train_examples']} images, {plain['torch_threads']} threads)")
    print(f"  plain PyTorch loop   {plain['images_per_s_median']:8.1f} images/s (median over {args.rounds} rounds)")
    for mode, r in runs.items():
        if mode == "bare":
            continue
        print(f"  ClientApp, {mode:<5}     {r['clientapp_images_per_s_median']:8.1f} images/s ({r['clientapp_vs_plain']:.2f}x)")
    cols = ["round_seconds", "fixed_cost_seconds", "local_compute_seconds", "scoring_seconds", "clientapp_process_start_seconds",
            "clientapp_setup_seconds", "clientapp_other_seconds", "flower_transport_seconds", "register_seconds"]
    short = ["round", "fixed", "compute", "scoring", "proc start", "setup", "ser/state", "transport", "register"]
    for mode, r in runs.items():
        if mode == "bare":
            print(f"\nbare Flower app, {r['payload_bytes']} bytes each way per node: rounds "
                  + ", ".join(f"{x['round_seconds']:.2f}s" for x in r["rounds"]) + f" (median {r['round_seconds_median']:.2f}s)")
            continue
        print(f"\nper-round time split, seconds (slowest hospital), {mode} ClientApp start; "
              f"final evaluation {r['rounds'][-1]['final_evaluation_seconds']:.1f}s")
        print(f"  {'#':>2} " + " ".join(f"{h:>10}" for h in short))
        for s in r["rounds"]:
            print(f"  {s['round']:>2} " + " ".join(f"{s[c]:>10.2f}" for c in cols))
        if mode == "secure":
            print("  SecAgg+ stages per round: seconds, MB sent / received by the aggregator (all hospitals)")
            for s in r["rounds"]:
                print(f"  {s['round']:>2} " + ", ".join(f"{st['stage']} {st['seconds']:.1f}s {st['bytes_sent'] / 1e6:.2f}/"
                                                     f"{st['bytes_received'] / 1e6:.2f}" for st in s["secure_aggregation"]["stages"]))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

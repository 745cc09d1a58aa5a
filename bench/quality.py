"""Model quality on real data, and what update encodings cost: federated SSL + federated
fine-tuning next to pooled, local-only, no-SSL and per-task variants.

Data: HAM10000 at `--data`; 4 hospitals = the 4 acquisition sites of
`HAM10000_metadata_dataverse.csv` (`partition-by = site`); each site split into train/test
by lesion, stratified by class (test fraction 0.2). Every arm is scored on the pooled test
set, the union of the sites' test splits (as FLamby's Fed-ISIC2019 does).

Arms (`--arms`, default all):
  federated       every site SimCLR, then federated full fine-tuning       (--seeds)
  pooled          one model on the union of the sites' training images,
                  same epochs: SimCLR then full fine-tuning                 (--seeds)
  local           each site alone, same pipeline on its own images only     (first seed)
  no-ssl          federated fine-tuning from a random encoder               (first seed)
  rotation        every site rotation prediction                            (first seed)
  mixed           sites alternate SimCLR / rotation (the product default)   (first seed)
  fp16, int8      `federated` with compressed updates, both directions       (first seed)
  projection-head frozen random backbone, only the SimCLR head shared       (first seed)

The federation runs in this process with the code the hospitals and the aggregator run:
`fedssl_flower.local` for a hospital's round (same seeds, private heads kept at the
hospital), `strategy.weighted_average` for aggregation, `compression` for the encodings
and `records.to_array_record` for the bytes on the wire (what the run folder reports).
Flower's transport and process start-up are not in the loop: bench/flower_overhead.py
measures those. Each arm's wall time is reported.

    .venv/bin/python -m bench.quality [--arms federated,pooled] [--seeds 0,1,2]

Prints a table and writes JSON (default bench/results/quality.json); `bench/report.py`
turns the JSON files into the plots and tables of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from fedssl_core import names
from fedssl_core.models import FedSSLModel, set_torch_threads
from fedssl_flower import local, records, training
from fedssl_flower.config import RunConfig
from fedssl_flower.data import HospitalData, load_hospital_data
from fedssl_flower.strategy import weighted_average

REPO = Path(__file__).resolve().parents[1]
ARMS = ("federated", "pooled", "local", "no-ssl", "rotation", "mixed", "fp16", "int8", "projection-head")
SEEDED_ARMS = ("federated", "pooled")  # run for every seed; the others for the first seed only
HEADLINE = (names.M_BALANCED_ACCURACY, names.M_MACRO_AUC, names.M_ACCURACY)
# FLamby Fed-ISIC2019 (6 centres incl. the 4 HAM10000 sites, ImageNet-pretrained EfficientNet-b0,
# balanced accuracy on the pooled test), for orientation only: different model, data and budget.
FLAMBY_FED_ISIC2019 = {"pooled": 0.745, "FedAvg": 0.595, "Scaffold": 0.626}


def load_sites(args) -> list[HospitalData]:
    sites = []
    for i in range(4):
        cfg = {"hospital": f"site-{i}", "data-path": str(args.data), "partition-by": "site", "num-partitions": 4,
               "partition-id": i, "max-images": args.max_images_per_site, "cache-dir": str(args.cache_dir)}
        data = load_hospital_data(cfg, args.image_size, seed=0)  # one split for every seed
        data.hospital = data.audit["partition"]["sites"][0]
        sites.append(data)
    return sites


def pooled_data(parts: list[HospitalData], name: str = "pooled") -> HospitalData:
    return HospitalData(
        hospital=name, class_names=parts[0].class_names,
        train_images=torch.cat([p.train_images for p in parts]), train_labels=torch.cat([p.train_labels for p in parts]),
        test_images=torch.cat([p.test_images for p in parts]), test_labels=torch.cat([p.test_labels for p in parts]),
    )


def scores(model: FedSSLModel, data: HospitalData) -> dict:
    m = training.evaluate(model, data.test_images, data.test_labels, data.class_names)
    return {k: m[k] for k in (*HEADLINE, names.M_F1, names.M_CONFUSION_MATRIX)}


def probe(model: FedSSLModel, train: HospitalData, test: HospitalData, cfg: RunConfig) -> dict:
    """Linear probe of the SSL encoder: how much diagnosis the features carry before fine-tuning."""
    data = dataclasses.replace(train, test_images=test.test_images, test_labels=test.test_labels)
    m = local.score(model, data, names.PHASE_SSL, cfg)
    return {k: m[k] for k in HEADLINE}


def fresh_model(cfg: RunConfig, num_classes: int) -> FedSSLModel:
    torch.manual_seed(cfg.seed)  # what the aggregator and every ClientApp start from
    return FedSSLModel(cfg.arch, num_classes=num_classes)


def schedule(cfg: RunConfig) -> list[tuple[str, int]]:
    return ([(names.PHASE_SSL, r) for r in range(1, cfg.ssl_rounds + 1)]
            + [(names.PHASE_FINETUNE, r) for r in range(1, cfg.finetune_rounds + 1)])


def wire(arrays: dict[str, np.ndarray], encoding: str) -> tuple[dict[str, np.ndarray], int]:
    """What a receiver gets from `arrays` sent with `encoding`, and the bytes it took."""
    record = records.to_array_record(arrays, encoding)
    return records.from_array_record(record, encoding), record.count_bytes()


def federate(sites: list[HospitalData], test: HospitalData, cfg: RunConfig, tasks: list[str]) -> dict:
    """The aggregator's round loop with every hospital in this process."""
    num_classes = len(test.class_names)
    state = fresh_model(cfg, num_classes).state_dict()
    hospitals = [fresh_model(cfg, num_classes) for _ in sites]
    has_model = [False] * len(sites)
    server = fresh_model(cfg, num_classes)
    curve, comm, ssl_probe = [], [], None
    for phase, rnd in schedule(cfg):
        shared = training.shared_groups(phase, cfg.share, cfg.finetune_mode)
        updates, traffic = [], {}
        for i, (site, model, task) in enumerate(zip(sites, hospitals, tasks)):
            down, sent = wire(records.state_arrays(state, None if not has_model[i] else shared), cfg.update_encoding)
            records.load_arrays(model, down)
            has_model[i] = True
            m = local.train_round(model, site, task, phase, cfg, local.round_seed(cfg.seed, phase, rnd))
            contributes = bool(set(shared) & set(training.trainable_groups(phase, task, cfg.share, cfg.finetune_mode)))
            up, received = wire(records.state_arrays(model.state_dict(), shared), cfg.update_encoding)
            updates.append((up, m[names.M_EXAMPLES] if contributes else 0))
            traffic[site.hospital] = {"train_sent": sent, "train_received": received}
        for key, value in weighted_average(updates).items():
            state[key] = torch.from_numpy(value).to(state[key].dtype).reshape(state[key].shape)
        # The evaluation message (the same for every hospital) carries the new shared groups; hospitals keep them.
        down, sent = wire(records.state_arrays(state, shared), cfg.update_encoding)
        for site, model in zip(sites, hospitals):
            records.load_arrays(model, down)
            traffic[site.hospital]["evaluate_sent"] = sent
        comm.append({"phase": phase, "round": rnd, "hospitals": traffic})
        server.load_state_dict(state)
        if phase == names.PHASE_SSL and rnd == cfg.ssl_rounds:
            ssl_probe = probe(server, pooled_data(sites), test, cfg)
        if phase == names.PHASE_FINETUNE:
            final = scores(server, test)
            curve.append({"round": rnd, **{k: v for k, v in final.items() if k in HEADLINE}})
        print(f"    {phase} round {rnd}: " + (f"balanced accuracy {curve[-1][names.M_BALANCED_ACCURACY]:.3f}"
                                              if phase == names.PHASE_FINETUNE else "done"), flush=True)
    return {"test": final, "ssl_probe": ssl_probe, "curve": curve, "communication": comm}


def centralised(data: HospitalData, test: HospitalData, cfg: RunConfig, task: str, own_test: bool = False) -> dict:
    """One model on one data set, the same epochs as the federation's rounds; `own_test` also
    scores it on `data`'s own test split."""
    model = fresh_model(cfg, len(test.class_names))
    curve, ssl_probe = [], None
    for phase, rnd in schedule(cfg):
        local.train_round(model, data, task, phase, cfg, local.round_seed(cfg.seed, phase, rnd))
        if phase == names.PHASE_SSL and rnd == cfg.ssl_rounds:
            ssl_probe = probe(model, data, test, cfg)
        if phase == names.PHASE_FINETUNE:
            final = scores(model, test)
            curve.append({"round": rnd, **{k: v for k, v in final.items() if k in HEADLINE}})
    out = {"test": final, "ssl_probe": ssl_probe, "curve": curve}
    if own_test:
        out["own_test"] = {k: v for k, v in scores(model, data).items() if k in HEADLINE}
    return out


def run_arm(arm: str, seed: int, sites: list[HospitalData], test: HospitalData, base: RunConfig) -> dict:
    cfg = dataclasses.replace(base, seed=seed)
    simclr, rotation = names.SSL_SIMCLR, names.SSL_ROTATION
    t0 = time.perf_counter()
    if arm == "pooled":
        out = centralised(pooled_data(sites), test, cfg, simclr)
    elif arm == "local":
        per_site = {s.hospital: centralised(s, test, cfg, simclr, own_test=True) for s in sites}
        out = {"sites": per_site,
               "test": {k: statistics.mean(r["test"][k] for r in per_site.values()) for k in HEADLINE},
               "note": "test = mean over sites of each site-alone model on the pooled test"}
    else:
        tasks = {"rotation": [rotation] * 4, "mixed": [simclr, rotation] * 2}.get(arm, [simclr] * 4)
        variant = {"no-ssl": {"ssl_rounds": 0}, "fp16": {"update_encoding": "fp16"}, "int8": {"update_encoding": "int8"},
                   "projection-head": {"share": training.SHARE_PROJECTION_HEAD}}.get(arm, {})
        cfg = dataclasses.replace(cfg, **variant)
        out = federate(sites, test, cfg, tasks)
        out["ssl_tasks"] = dict(zip((s.hospital for s in sites), tasks))
    out.update({"arm": arm, "seed": seed, "seconds": time.perf_counter() - t0,
                "config": {k: v for k, v in cfg.as_dict().items() if k not in ("registry-url", "runs-dir", "data-warning")}})
    return out


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds, per arm."""
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        vals = [r for r in runs if r["arm"] == arm]
        out[arm] = {"seeds": [r["seed"] for r in vals]}
        for k in HEADLINE:
            xs = [float(r["test"][k]) for r in vals]
            out[arm][k] = {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
        comm = vals[0].get("communication")
        if comm:  # mean bytes per hospital per round, by phase; the first round also ships the whole model
            out[arm]["bytes_per_hospital_per_round"] = {
                phase: statistics.mean(sum(h["train_sent"] + h["train_received"] + h["evaluate_sent"] for h in r["hospitals"].values())
                                       / len(r["hospitals"]) for r in rounds)
                for phase in names.PHASES if (rounds := [r for r in comm[1:] if r["phase"] == phase])
            }
            first = comm[0]["hospitals"].values()
            out[arm]["bytes_first_round_per_hospital"] = statistics.mean(h["train_sent"] + h["train_received"] + h["evaluate_sent"] for h in first)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ham10000")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the federated and pooled arms; the first one for the others")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--ssl-rounds", type=int, default=3, help="federated SSL rounds = pooled SSL epochs")
    ap.add_argument("--finetune-rounds", type=int, default=3, help="federated fine-tune rounds = pooled fine-tune epochs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--finetune-mode", default=training.FINETUNE_FULL, choices=training.FINETUNE_MODES)
    ap.add_argument("--max-images-per-site", type=int, default=0, help="cap per site before the split (0 = all; for smoke runs)")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("FEDSSL_HOME", ".fedssl")) / "cache")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    args = ap.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}; expected some of {', '.join(ARMS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    if not seeds:
        raise SystemExit("--seeds: give at least one seed")
    if args.finetune_rounds < 1:
        raise SystemExit("--finetune-rounds must be >= 1: the arms are scored by their fine-tuned classifier")
    if not (args.data / "HAM10000_metadata_dataverse.csv").is_file():
        raise SystemExit(f"no HAM10000_metadata_dataverse.csv under {args.data}: the 4-site split needs it; pass --data")

    threads = set_torch_threads()
    base = RunConfig(ssl_rounds=args.ssl_rounds, finetune_rounds=args.finetune_rounds, image_size=args.image_size,
                     batch_size=args.batch_size, lr=args.lr, finetune_mode=args.finetune_mode, local_baseline=False)
    base.validate()
    t0 = time.perf_counter()
    sites = load_sites(args)
    test = pooled_data(sites, "pooled-test")
    print(f"{len(sites)} sites loaded in {time.perf_counter() - t0:.0f}s: " + ", ".join(
        f"{s.hospital} {len(s.train_images)}/{len(s.test_images)}" for s in sites) + " train/test images", flush=True)

    runs = []
    for arm in arms:
        for seed in (seeds if arm in SEEDED_ARMS else seeds[:1]):
            print(f"{arm} (seed {seed}) ...", flush=True)
            runs.append(run_arm(arm, seed, sites, test, base))
            r = runs[-1]
            print(f"  balanced accuracy {r['test'][names.M_BALANCED_ACCURACY]:.3f}, macro AUC {r['test'][names.M_MACRO_AUC]:.3f}, "
                  f"accuracy {r['test'][names.M_ACCURACY]:.3f} ({r['seconds'] / 60:.1f} min)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            result = {
                "machine": {"cpus": os.cpu_count(), "torch_threads": threads, "python": platform.python_version(), "torch": torch.__version__},
                "command": "python -m bench.quality " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                                 if k not in ("data", "cache_dir", "out")),
                "data": {"path": str(args.data), "image_size": args.image_size, "class_names": test.class_names,
                         "sites": {s.hospital: {"train": len(s.train_images), "test": len(s.test_images),
                                                "class_counts": s.audit["class_counts"]} for s in sites},
                         "pooled_test": len(test.test_images)},
                "reference_flamby_fed_isic2019_balanced_accuracy": FLAMBY_FED_ISIC2019,
                "summary": summarise(runs),
                "runs": runs,
            }
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every arm: a long run loses nothing

    print()
    print(f"{'arm':<16} {'seeds':>5} {'balanced acc':>16} {'macro AUC':>16} {'accuracy':>16}")
    for arm, s in result["summary"].items():
        cells = " ".join(f"{s[k]['mean']:>8.3f} ± {s[k]['std']:.3f}" for k in HEADLINE)
        print(f"{arm:<16} {len(s['seeds']):>5} {cells}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Plots and Markdown tables for docs/benchmarks.md from the JSON the benchmarks wrote.

    .venv/bin/python -m bench.report [--results bench/results] [--out docs/benchmarks]

Writes PNGs to `--out` and prints the tables (Markdown) to stdout. Missing result files are
skipped with a note, so each benchmark can be re-run on its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MB = 1e6
LABELS = {
    "federated": "federated (SimCLR everywhere)", "pooled": "pooled (centralised)", "local": "each site alone (mean)",
    "no-ssl": "federated, no SSL", "rotation": "federated, rotation only", "mixed": "federated, SimCLR + rotation",
    "fp16": "federated, fp16 updates", "int8": "federated, int8 updates", "projection-head": "federated, projection head only",
}


def _load(path: Path) -> dict | None:
    if not path.is_file():
        print(f"<!-- {path} missing: skipped -->")
        return None
    return json.loads(path.read_text())


def _pm(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["std"] else f"{s['mean']:.3f}"


def quality(q: dict, out: Path) -> None:
    summary = q["summary"]
    print("| arm | seeds | balanced accuracy | macro AUC | accuracy | minutes per run |")
    print("|---|---|---|---|---|---|")
    for arm, s in summary.items():
        minutes = statistics.mean(r["seconds"] for r in q["runs"] if r["arm"] == arm) / 60
        print(f"| {LABELS.get(arm, arm)} | {len(s['seeds'])} | {_pm(s['balanced_accuracy'])} | {_pm(s['macro_auc'])} | "
              f"{_pm(s['accuracy'])} | {minutes:.1f} |")
    print()
    local = next((r for r in q["runs"] if r["arm"] == "local"), None)
    if local:
        print("| site alone | train images | balanced accuracy, pooled test | balanced accuracy, own test |")
        print("|---|---|---|---|")
        for site, r in local["sites"].items():
            print(f"| {site} | {q['data']['sites'][site]['train']} | {r['test']['balanced_accuracy']:.3f} | "
                  f"{r['own_test']['balanced_accuracy']:.3f} |")
        print()
    probes = [(r["arm"], r["seed"], r["ssl_probe"]["balanced_accuracy"]) for r in q["runs"] if r.get("ssl_probe")]
    if probes:
        print("| arm | linear probe after SSL, balanced accuracy (mean over seeds) |")
        print("|---|---|")
        for arm in dict.fromkeys(a for a, _, _ in probes):
            print(f"| {LABELS.get(arm, arm)} | {statistics.mean(p for a, _, p in probes if a == arm):.3f} |")
        print()

    arms = list(summary)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(arms) + 1.5))
    means = [summary[a]["balanced_accuracy"]["mean"] for a in arms]
    stds = [summary[a]["balanced_accuracy"]["std"] for a in arms]
    ax.barh([LABELS.get(a, a) for a in arms], means, xerr=stds, color=["#3b6ea8" if a in ("federated", "pooled") else "#9bb3cf" for a in arms])
    ref = q.get("reference_flamby_fed_isic2019_balanced_accuracy", {})
    for name, value, style in (("FLamby pooled", ref.get("pooled"), "--"), ("FLamby FedAvg", ref.get("FedAvg"), ":")):
        if value:
            ax.axvline(value, color="#b04040", linestyle=style, label=f"{name} {value} (EfficientNet-b0, ImageNet)")
    ax.invert_yaxis()
    ax.set_xlabel("balanced accuracy, pooled test of the 4 HAM10000 sites")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ("federated", "pooled", "no-ssl", "mixed"):
        runs = [r for r in q["runs"] if r["arm"] == arm and r.get("curve")]
        if not runs:
            continue
        rounds = [c["round"] for c in runs[0]["curve"]]
        ys = [statistics.mean(r["curve"][i]["balanced_accuracy"] for r in runs) for i in range(len(rounds))]
        ax.plot(rounds, ys, marker="o", label=LABELS.get(arm, arm))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("fine-tuning round (pooled: epoch)")
    ax.set_ylabel("balanced accuracy, pooled test")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_curves.png", dpi=110)
    plt.close(fig)


def communication(q: dict, out: Path) -> None:
    rows = [(a, s) for a, s in q["summary"].items() if s.get("bytes_per_hospital_per_round")]
    if not rows:
        return
    print("| update encoding / sharing | MB per hospital per SSL round | MB per fine-tune round | first round (whole model) | balanced accuracy |")
    print("|---|---|---|---|---|")
    for arm, s in rows:
        b = s["bytes_per_hospital_per_round"]
        ssl = f"{b['ssl'] / MB:.1f}" if "ssl" in b else "n/a"
        ft = f"{b['finetune'] / MB:.1f}" if "finetune" in b else "n/a"
        print(f"| {LABELS.get(arm, arm)} | {ssl} | {ft} | {s['bytes_first_round_per_hospital'] / MB:.1f} | "
              f"{_pm(s['balanced_accuracy'])} |")
    print()
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, s in rows:
        b = s["bytes_per_hospital_per_round"]
        x = b.get("ssl", b.get("finetune")) / MB
        ax.scatter(x, s["balanced_accuracy"]["mean"])
        ax.annotate(arm, (x, s["balanced_accuracy"]["mean"]), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set_xlabel("MB per hospital per SSL round (down + up + evaluation)")
    ax.set_ylabel("balanced accuracy, pooled test")
    fig.tight_layout()
    fig.savefig(out / "communication.png", dpi=110)
    plt.close(fig)


def scaling(s: dict, out: Path) -> None:
    print("| hospitals | round (s, median) | train exchange (s) | evaluation exchange (s) | peak RSS per SuperNode + ClientApp (MB) | SuperNode idle (MB) | SuperLink + ServerApp peak (MB) | replies lost, sent again |")
    print("|---|---|---|---|---|---|---|---|")
    for r in s["results"]:
        last = r["rounds"][-1]
        print(f"| {r['hospitals']} | {r['round_seconds_median']:.1f} | {last['train_seconds']:.1f} | {last['evaluate_seconds']:.1f} | "
              f"{r['supernode_peak_rss_mb_mean']:.0f} (max {r['supernode_peak_rss_mb_max']:.0f}) | {r['supernode_idle_rss_mb']:.0f} | "
              f"{r['superlink_peak_rss_mb']:.0f} | {r.get('lost_replies', 0)} |")
    print()
    n = [r["hospitals"] for r in s["results"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(n, [r["round_seconds_median"] for r in s["results"]], marker="o")
    a1.set_xlabel("hospitals (SuperNodes on one 2-core machine)")
    a1.set_ylabel("round wall time (s)")
    a2.plot(n, [r["supernode_peak_rss_mb_mean"] for r in s["results"]], marker="o", label="SuperNode + ClientApp, peak")
    a2.plot(n, [r["superlink_peak_rss_mb"] for r in s["results"]], marker="s", label="SuperLink + ServerApp, peak")
    a2.set_xlabel("hospitals")
    a2.set_ylabel("resident memory (MB)")
    a2.legend(fontsize=8)
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks(n, [str(x) for x in n])
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)


def speed(f: dict | None, r: dict | None) -> None:
    if f:
        print("| local training (ResNet-18, 64 px, batch 64, SimCLR) | images/s |")
        print("|---|---|")
        print(f"| plain PyTorch loop | {f['plain_loop']['images_per_s_median']:.1f} |")
        print(f"| inside the ClientApp | {f['clientapp_images_per_s_median']:.1f} ({f['clientapp_vs_plain']:.2f}x) |")
        print()
        print("| round | total s | compute | process start | setup | (de)serialise | transport | aggregate | evaluate | register |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for s in f["rounds"]:
            print(f"| {s['round']} | {s['round_seconds']:.1f} | {s['local_compute_seconds']:.1f} | {s['clientapp_process_start_seconds']:.1f} | "
                  f"{s['clientapp_setup_seconds']:.2f} | {s['clientapp_other_seconds']:.2f} | {s['flower_transport_seconds']:.1f} | "
                  f"{s['aggregate_seconds']:.2f} | {s['evaluate_seconds']:.1f} | {s['register_seconds']:.2f} |")
        print()
    if r:
        c = r["config"]["concurrency"]
        print("| serving (ResNet-18 classifier, 64 px) | p50 ms | p99 ms | images/s |")
        print("|---|---|---|---|")
        ip = r["in_process"]
        print(f"| in-process forward, batch 1 | {ip['p50_ms_batch1']:.2f} | {ip['p99_ms_batch1']:.2f} | {ip['images_per_s_batch1']:.0f} |")
        batched = ip[f"images_per_s_batch{ip['batch']}"]
        print(f"| in-process forward, batch {ip['batch']} | | | {batched:.0f} |")
        for key, label in (("http_concurrency_1", "v2 REST infer, concurrency 1"), (f"http_concurrency_{c}", f"v2 REST infer, concurrency {c}")):
            h = r[key]
            print(f"| {label} | {h['p50_ms']:.2f} | {h['p99_ms']:.2f} | {h['images_per_s']:.0f} |")
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path("bench/results"))
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    q = _load(args.results / "quality.json")
    if q:
        quality(q, args.out)
        communication(q, args.out)
    s = _load(args.results / "scaling.json")
    if s:
        scaling(s, args.out)
    speed(_load(args.results / "flower_overhead.json"), _load(args.results / "registry_bench.json"))


if __name__ == "__main__":
    main()

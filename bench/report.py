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
    "federated": "federated: SimCLR rounds, then fine-tuning", "pooled": "pooled (centralised), same steps",
    "local": "each site alone (mean)", "no-ssl": "federated fine-tuning only (ImageNet start)",
    "random": "federated fine-tuning only (random start)", "random-ssl": "federated SimCLR + fine-tuning (random start)",
    "probes": "linear probe, frozen ImageNet encoder", "fp16": "federated, fp16 updates", "int8": "federated, int8 updates",
}


LABEL_EFFICIENCY_VARIANT = "96px"  # bench/quality.py --label of the shipped recipe's runs


def _parse(spec: str) -> tuple[str, float | None, str]:
    """An arm name from `bench.quality.arm_name` ("no-ssl@0.1 [96px]") -> (arm, label fraction, variant)."""
    spec, _, variant = spec.partition(" [")
    arm, _, frac = spec.partition("@")
    return arm, float(frac) if frac else None, variant.removesuffix("]")


def _label(spec: str) -> str:
    arm, frac, variant = _parse(spec)
    return LABELS.get(arm, arm) + (f", {frac:.0%} of labels" if frac else "") + (f" [{variant}]" if variant else "")


def _load(path: Path) -> dict | None:
    if not path.is_file():
        print(f"<!-- {path} missing: skipped -->")
        return None
    return json.loads(path.read_text())


def _pm(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["std"] else f"{s['mean']:.3f}"


def quality(q: dict, out: Path) -> None:
    summary = q["summary"]["test"]
    runs = [r for r in q["runs"] if r.get("eval", "test") == "test"]
    print("| arm | seeds | balanced accuracy | macro AUC | accuracy | ECE | ECE, temperature-scaled | minutes per run |")
    print("|---|---|---|---|---|---|---|---|")
    for arm, s in summary.items():
        cal = s.get("ece_temperature_scaled")
        print(f"| {_label(arm)} | {len(s['seeds'])} | {_pm(s['balanced_accuracy'])} | {_pm(s['macro_auc'])} | "
              f"{_pm(s['accuracy'])} | {_pm(s['ece']) if 'ece' in s else 'n/a'} | {_pm(cal) if cal else 'n/a'} | {s['minutes']:.1f} |")
    print()
    probes = next((r for r in runs if r["arm"] == "probes"), None)
    ssl = [r["ssl_probe_val"] for r in q["runs"] if r["arm"] == "federated" and r.get("ssl_probe_val")]
    if probes or ssl:
        print("| frozen encoder | linear probe, balanced accuracy (validation) | kNN balanced accuracy (validation) |")
        print("|---|---|---|")
        if probes:
            for name, label in (("probe_random", "random weights"), ("probe_start", "ImageNet weights (the start)")):
                v = probes[name]["val"]
                print(f"| {label} | {v['balanced_accuracy']:.3f} | {v['knn_balanced_accuracy']:.3f} |")
        if ssl:
            print(f"| after the federated SimCLR rounds ({len(ssl)} seeds) | {statistics.mean(p['balanced_accuracy'] for p in ssl):.3f} | "
                  f"{statistics.mean(p['knn_balanced_accuracy'] for p in ssl):.3f} |")
        print()

    arms = [a for a in summary if a != "probes"]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(arms) + 1.5))
    ax.barh([_label(a) for a in arms], [summary[a]["balanced_accuracy"]["mean"] for a in arms],
            xerr=[summary[a]["balanced_accuracy"]["std"] for a in arms],
            color=["#3b6ea8" if a in ("federated", "pooled") else "#9bb3cf" for a in arms])
    tta = [(i, summary[a]["with_test_time_augmentation"]["balanced_accuracy"]["mean"]) for i, a in enumerate(arms)
           if "with_test_time_augmentation" in summary[a]]
    if tta:  # --tta runs: the same models scored with dihedral test-time augmentation, as served
        ax.scatter([v for _, v in tta], [i for i, _ in tta], marker="D", color="black", zorder=3, s=18,
                   label="the same models with dihedral test-time augmentation (8 views, as served)")
    ref = q.get("reference_flamby_fed_isic2019_balanced_accuracy", {})
    for name, value, style in (("FLamby pooled", ref.get("pooled"), "--"), ("FLamby FedAvg", ref.get("FedAvg"), ":")):
        if value:
            ax.axvline(value, color="#b04040", linestyle=style, label=f"{name} {value} (EfficientNet-b0 at 224 px, GPU)")
    ax.invert_yaxis()
    ax.set_xlabel("balanced accuracy, pooled lesion-grouped test of the 4 HAM10000 sites")
    ax.set_xlim(0, 1)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6 / (0.45 * len(arms) + 1.5) - 0.02), fontsize=8, ncol=1)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110, bbox_inches="tight")  # long labels and the legend below the axis fit
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ("federated", "pooled", "no-ssl", "random"):
        curves = [r["curve"] for r in runs if r["arm"] == arm and r.get("curve") and not r.get("label")]  # labelled runs are variants
        if curves:
            rounds = [c["round"] for c in curves[0]]
            ax.plot(rounds, [statistics.mean(c[i]["balanced_accuracy"] for c in curves) for i in range(len(rounds))],
                    marker="o", label=_label(arm))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("fine-tuning round")
    ax.set_ylabel("balanced accuracy, pooled test")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_curves.png", dpi=110)
    plt.close(fig)

    # Label efficiency: balanced accuracy against the fraction of training labels kept.
    # One series per arm at the shipped recipe (runs labelled LABEL_EFFICIENCY_VARIANT), from its
    # runs at each fraction; earlier 64 px runs mixed fresh and kept AdamW moments, so they stay
    # in the hand-written table of docs/benchmarks.md.
    series: dict[str, list[tuple[float, float]]] = {}
    for spec, s in summary.items():
        arm, frac, variant = _parse(spec)
        if arm in ("federated", "no-ssl", "random") and variant == LABEL_EFFICIENCY_VARIANT:
            name = arm + (f" [{variant}]" if variant else "")
            series.setdefault(name, []).append((frac or 1.0, s["balanced_accuracy"]["mean"]))
    if any(len(v) > 1 for v in series.values()):  # a single point (e.g. SSL at 10 % only) is drawn as a marker
        print("| label fraction | " + " | ".join(_label(b) for b in series) + " |")
        print("|---|" + "---|" * len(series))
        for f in sorted({f for v in series.values() for f, _ in v}):
            print(f"| {f:.0%} | " + " | ".join(next((f"{y:.3f}" for x, y in v if x == f), "n/a") for v in series.values()) + " |")
        print()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for base, pts in series.items():
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=_label(base),
                    linestyle="-" if len(pts) > 1 else "none")
        ax.set_xscale("log")
        ax.set_xticks([0.01, 0.1, 1.0], ["1 %", "10 %", "100 %"])
        ax.set_xlabel("training labels kept (SSL sees every image)")
        ax.set_ylabel("balanced accuracy, pooled test")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "label_efficiency.png", dpi=110)
        plt.close(fig)


def communication(q: dict, out: Path) -> None:
    rows = [(a, s) for a, s in q["summary"]["test"].items() if s.get("bytes_per_hospital_per_round")]
    if not rows:
        return
    print("| update encoding | MB per hospital per SSL round (down + up) | MB per fine-tune round | balanced accuracy |")
    print("|---|---|---|---|")
    for arm, s in rows:
        b = s["bytes_per_hospital_per_round"]
        ssl = f"{b['ssl'] / MB:.1f}" if "ssl" in b else "n/a"
        ft = f"{b['finetune'] / MB:.1f}" if "finetune" in b else "n/a"
        print(f"| {_label(arm)} | {ssl} | {ft} | {_pm(s['balanced_accuracy'])} |")
    print()


def scaling(s: dict, out: Path) -> None:
    print("| hospitals | round (s, median) | train exchange (s) | evaluation exchange (s) | peak per SuperNode tree, PSS: largest (mean) / RSS mean (MB) | SuperNode idle (MB) | SuperLink + ServerApp peak (MB) | replies lost, sent again |")
    print("|---|---|---|---|---|---|---|---|")
    for r in s["results"]:
        last = r["rounds"][-1]
        print(f"| {r['hospitals']} | {r['round_seconds_median']:.1f} | {last['train_seconds']:.1f} | {last['evaluate_seconds']:.1f} | "
              f"{r['supernode_peak_pss_mb_max']:.0f} ({r['supernode_peak_pss_mb_mean']:.0f}) / {r['supernode_peak_rss_mb_mean']:.0f} | "
              f"{r['supernode_idle_rss_mb']:.0f} | {r['superlink_peak_rss_mb']:.0f} | {r.get('lost_replies', 0)} |")
    print()
    n = [r["hospitals"] for r in s["results"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(n, [r["round_seconds_median"] for r in s["results"]], marker="o")
    a1.set_xlabel("hospitals (SuperNodes on one 2-core machine)")
    a1.set_ylabel("round wall time (s)")
    a2.plot(n, [r["supernode_peak_pss_mb_mean"] for r in s["results"]], marker="o", label="SuperNode tree, peak PSS (mean)")
    a2.plot(n, [r["supernode_peak_pss_mb_max"] for r in s["results"]], marker="v", label="SuperNode tree, peak PSS (largest)")
    a2.plot(n, [r["superlink_peak_rss_mb"] for r in s["results"]], marker="s", label="SuperLink + ServerApp, peak RSS")
    a2.axhline(1000, color="grey", linestyle=":", linewidth=1, label="1 GB per SuperNode (issue 18)")
    a2.set_xlabel("hospitals")
    a2.set_ylabel("memory (MB)")
    a2.legend(fontsize=7)
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks(n, [str(x) for x in n])
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)


def speed(f: dict | None, r: dict | None) -> None:
    if f and "modes" in f:
        c = f["config"]
        print(f"| local training ({c['arch']}, {c['image_size']} px, batch {c['batch_size']}, {c['phase']}) | images/s |")
        print("|---|---|")
        print(f"| plain PyTorch loop | {f['plain_loop']['images_per_s_median']:.1f} |")
        fedssl = {mode: m for mode, m in f["modes"].items() if mode != "bare"}
        for mode, m in fedssl.items():
            print(f"| inside the ClientApp, {mode} start | {m['clientapp_images_per_s_median']:.1f} ({m['clientapp_vs_plain']:.2f}x) |")
        print()
        print("| start | round | total s | fixed cost | compute | scoring | process start | setup | (de)serialise, state | transport | register |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for mode, m in fedssl.items():
            for s in m["rounds"]:
                print(f"| {mode} | {s['round']} | {s['round_seconds']:.1f} | {s['fixed_cost_seconds']:.1f} | {s['local_compute_seconds']:.1f} | "
                      f"{s['scoring_seconds']:.1f} | {s['clientapp_process_start_seconds']:.1f} | {s['clientapp_setup_seconds']:.2f} | "
                      f"{s['clientapp_other_seconds']:.2f} | {s['flower_transport_seconds']:.1f} | {s['register_seconds']:.2f} |")
        print()
        if "bare" in f["modes"]:
            b = f["modes"]["bare"]
            seconds = ", ".join(format(x["round_seconds"], ".1f") for x in b["rounds"])
            print(f"Flower's floor, a bare app with the same payload ({b['payload_bytes'] / 1e6:.1f} MB each way) whose handlers return "
                  f"at once: rounds of {seconds} s (median {b['round_seconds_median']:.1f} s); "
                  + "; ".join(f"fedssl's fixed cost, {mode} start: median {m['fixed_cost_seconds_median']:.1f} s" for mode, m in fedssl.items()))
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


def quality_hospitals(q: dict) -> None:
    """Tables for a hospital-folders benchmark (bench/results/quality_mri.json): each hospital's
    class mix, then every arm and each hospital alone on the pooled test."""
    classes, sites = q["data"]["class_names"], q["data"]["sites"]
    print("| hospital | " + " | ".join(classes) + " | train / val / test images |")
    print("|---|" + "---|" * (len(classes) + 1))
    for name, site in sites.items():
        counts = site["class_counts"]
        total = {c: sum(counts[split][c] for split in counts) for c in classes}
        n = sum(total.values())
        print(f"| `{name}` | " + " | ".join(f"{total[c]} ({total[c] / n:.0%})" for c in classes)
              + f" | {site['train']} / {site['val']} / {site['test']} |")
    print()
    print("| arm | balanced accuracy | macro AUC | accuracy | ECE | minutes (one core) |")
    print("|---|---|---|---|---|---|")
    for arm, s in q["summary"]["test"].items():
        base, _, label = arm.partition(" [")
        print(f"| {_label(base)}{' [' + label if label else ''} | {_pm(s['balanced_accuracy'])} | {_pm(s['macro_auc'])} | {_pm(s['accuracy'])} | "
              f"{_pm(s['ece']) if 'ece' in s else 'n/a'} | {s['minutes']:.1f} |")
        run = next(r for r in q["runs"] if r.get("eval", "test") == "test"  # bench.quality.arm_name
                   and r["arm"] + (f" [{r['label']}]" if r.get("label") else "") == arm)
        for name, alone in run.get("sites", {}).items():
            t = alone["test"]
            print(f"| &nbsp;&nbsp;`{name}` alone | {t['balanced_accuracy']:.3f} | {t['macro_auc']:.3f} | {t['accuracy']:.3f} | "
                  f"{t['ece']:.3f} | |")
    print()


def robustness(q: dict) -> None:
    """The robust-aggregation table (bench/results/quality_robustness.json): each strategy
    clean and with one hospital attacking, its cost against clean FedAvg and against the
    same strategy's clean run, and how large the attacker's update arrived (round 1)."""
    runs = [r for r in q["runs"] if r.get("eval", "test") == "test"]
    # A run trained without a site (--exclude-site) is nobody's clean reference: its own row.
    clean = {r["strategy"]["name"]: r["test"] for r in runs if "attack" not in r and not r.get("excluded_site")}
    print("| strategy | attack | balanced accuracy | macro AUC | vs clean FedAvg | vs its own clean run | attacker's update / honest (round 1) |")
    print("|---|---|---|---|---|---|---|")
    strategies = {s: i for i, s in enumerate(("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "median-cosine"))}
    attacks = {a: i for i, a in enumerate(("none", "scale:100", "sign-flip"))}
    for r in sorted(runs, key=lambda r: (strategies.get(r["strategy"]["name"], 99), bool(r.get("excluded_site")),
                                         attacks.get(r.get("attack", {}).get("spec", "none"), 9))):
        name, t = r["strategy"]["name"], r["test"]
        params = ", ".join(f"{k} {v}" for k, v in r["strategy"].items() if k not in ("name", "server-lr", "server-momentum"))
        attack = r.get("attack")

        def cost(ref):
            return f"{t['balanced_accuracy'] - ref['balanced_accuracy']:+.3f}" if ref else "n/a"

        ratio = ""
        if attack:
            norms = r["communication"][0]["update_norms"]["hospitals"]
            honest = [v for h, v in norms.items() if h != attack["hospital"]]
            ratio = f"{norms[attack['hospital']] / statistics.median(honest):.1f}x"
        what = (attack["spec"] + " by " + attack["hospital"] if attack else
                f"none; trained without {r['excluded_site']}" if r.get("excluded_site") else "none")
        print(f"| {name}{f' ({params})' if params else ''} | {what} | "
              f"{t['balanced_accuracy']:.3f} | {t['macro_auc']:.3f} | {cost(clean.get('fedavg'))} | "
              f"{cost(clean.get(name)) if attack else ''} | {ratio} |")
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
    mri = _load(args.results / "quality_mri.json")
    if mri:
        quality_hospitals(mri)
    rob = _load(args.results / "quality_robustness.json")
    if rob:
        robustness(rob)
    s = _load(args.results / "scaling.json")
    if s:
        scaling(s, args.out)
    speed(_load(args.results / "flower_overhead.json"), _load(args.results / "registry_bench.json"))


if __name__ == "__main__":
    main()

"""How a federated round grows with the number of hospitals, on one machine.

For each N in `--hospitals` (default 2,4,8,16): a real SuperLink and N SuperNodes on this
machine, each hospital a small IID (lesion) partition of HAM10000 (`--max-images` images),
run `--rounds` SSL rounds (no registry, no local-only baseline). Reports per N the round
wall time (and its train/evaluate split from the run folder) and memory: the peak resident
set of each SuperNode together with the ClientApp processes it starts (sampled from /proc
every 0.2 s), and of the SuperLink with its ServerApp.

Every hospital's ClientApp is its own process importing PyTorch; on 2 cores N of them
start, train and evaluate concurrently, so the round time mostly measures that.

    .venv/bin/python -m bench.scaling [--hospitals 2,4,8,16] [--rounds 2] [--max-images 64] [--run-config K=V ...]

Prints a table and writes JSON (default bench/results/scaling.json). Numbers are reported,
never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

from fedssl_core import names
from fedssl_flower import allocator
from tests.support import processes as P

REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    """Proportional set size: shared pages split among the processes sharing them, so a
    ClientApp task forked from the warm SuperExec is not charged again for torch's pages."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


class TreeMemory:
    """Peak resident memory of process trees, sampled in a background thread."""

    def __init__(self, roots: dict[str, int], interval: float = 0.2) -> None:
        self.roots, self.interval = roots, interval
        self.peak = {name: 0 for name in roots}
        self.peak_pss = {name: 0 for name in roots}
        # at each tree's PSS peak: the PSS of its root, of the root's children and of theirs (a
        # SuperNode, its warm SuperExec, the ClientApp tasks running then)
        self.peak_pss_parts: dict[str, list[list[int]]] = {name: [] for name in roots}
        self.idle = {name: _rss(pid) for name, pid in roots.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _levels(pid: int, kids: dict[int, list[int]]) -> list[list[int]]:
        """The pids of the tree under `pid`, level by level (the root first)."""
        levels, level = [], [pid]
        while level:
            levels.append(level)
            level = [k for p in level for k in kids.get(p, [])]
        return levels

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            kids = _children()
            for name, pid in self.roots.items():
                levels = self._levels(pid, kids)
                self.peak[name] = max(self.peak[name], sum(_rss(p) for level in levels for p in level))
                pss = [[_pss(p) for p in level] for level in levels]
                if (total := sum(map(sum, pss))) > self.peak_pss[name]:
                    self.peak_pss[name], self.peak_pss_parts[name] = total, pss

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _wait_for_nodes(work: Path, n: int, timeout: float = 120.0) -> None:
    """Until all n SuperNodes have registered (each logs its node id), so that a round
    starts with every hospital even when min-hospitals is lower."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum("SuperNode ID:" in p.read_text(errors="replace") for p in work.glob("node-*.log")) >= n:
            return
        time.sleep(0.5)
    raise SystemExit(f"only some of the {n} SuperNodes registered within {timeout:.0f}s; see {work}/node-*.log")


def one(args, n: int, work: Path, cache_dir: Path) -> dict:
    work.mkdir(parents=True)
    with P.cluster(work) as c:
        link, port = P.start_superlink(c, runs_dir=work / "runs")
        nodes = {}
        for i in range(n):
            cfg = {"hospital": f"hospital-{i:02d}", "ssl-task": ("simclr", "rotation")[i % 2], "data-path": str(args.data),
                   "partition-id": i, "num-partitions": n, "max-images": args.max_images, "cache-dir": str(cache_dir),
                   "threads": 1}
            nodes[f"hospital-{i:02d}"] = P.start_supernode(c, port, f"node-{i}", P.node_config(**cfg),
                                                           FEDSSL_CLIENTAPP_ALLOCATOR=args.clientapp_allocator).popen.pid
        _wait_for_nodes(work, n)
        with TreeMemory({"superlink": link.popen.pid, **nodes}) as mem:
            t0 = time.perf_counter()
            result = P.submit(port, work, f"ssl-rounds={args.rounds}", "finetune-rounds=0", f"image-size={args.image_size}",
                              f"batch-size={args.batch_size}", f"min-hospitals={max(1, round(n * args.min_fraction))}", "local-baseline=false",
                              f"probe-epochs={args.probe_epochs}", f"round-timeout={args.round_timeout}", *args.run_config,
                              timeout=3600)
            wall = time.perf_counter() - t0
        if result.returncode != 0:
            raise SystemExit(f"the run with {n} hospitals failed:\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}\n{c.logs()[-5000:]}")
    (run_dir,) = (work / "runs").iterdir()
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    node_peaks = [v for k, v in mem.peak.items() if k != "superlink"]
    node_pss = [v for k, v in mem.peak_pss.items() if k != "superlink"]
    node_idle = [v for k, v in mem.idle.items() if k != "superlink"]
    return {
        "hospitals": n,
        "clientapp_allocator": args.allocator.describe(),
        "wall_seconds": wall,
        "rounds": [{"round": r["round"], "seconds": r["duration_seconds"], **r["timing"], "failed_hospitals": r["failed_hospitals"],
                    "bytes_sent": r["bytes_sent"], "bytes_received": r["bytes_received"]} for r in rounds],
        # Replies the SuperNodes could not deliver (and the aggregator sent again after round-timeout).
        "lost_replies": sum("no answer from node" in line for line in result.stdout.splitlines()),
        "round_seconds_median": statistics.median(r["duration_seconds"] for r in rounds),
        "supernode_idle_rss_mb": statistics.mean(node_idle) / 2**20,
        "supernode_peak_rss_mb_mean": statistics.mean(node_peaks) / 2**20,
        "supernode_peak_rss_mb_max": max(node_peaks) / 2**20,
        "supernode_peak_pss_mb_mean": statistics.mean(node_pss) / 2**20,
        "supernode_peak_pss_mb_max": max(node_pss) / 2**20,
        "supernode_peak_pss_mb": sorted(round(v / 2**20) for v in node_pss),
        # the largest tree at its peak: MB of the SuperNode, of its children (the warm SuperExec),
        # of theirs (ClientApp tasks)
        "supernode_peak_pss_parts_largest_mb": [[round(v / 2**20) for v in level] for level in max(
            (parts for k, parts in mem.peak_pss_parts.items() if k != "superlink"), key=lambda parts: sum(map(sum, parts)))],
        "superlink_peak_rss_mb": mem.peak["superlink"] / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ham10000")
    ap.add_argument("--hospitals", default="2,4,8,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-images", type=int, default=64, help="images per hospital before its train/test split")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--probe-epochs", type=int, default=2)
    ap.add_argument("--min-fraction", type=float, default=1.0,
                    help="min-hospitals as a fraction of the hospitals (1.0: a round fails when any reply is lost)")
    ap.add_argument("--append", action="store_true", help="keep the results for other hospital counts already in --out")
    ap.add_argument("--round-timeout", type=float, default=300.0,
                    help="seconds before the aggregator sends a lost message again (run config round-timeout)")
    ap.add_argument("--run-config", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more run config for the runs, e.g. activation-checkpointing=false")
    ap.add_argument("--clientapp-allocator", choices=allocator.CHOICES, default="auto",
                    help="the SuperNodes' FEDSSL_CLIENTAPP_ALLOCATOR (auto: jemalloc where installed)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/scaling.json"))
    args = ap.parse_args()
    try:
        args.allocator = allocator.choose({names.ENV_CLIENTAPP_ALLOCATOR: args.clientapp_allocator})
    except allocator.AllocatorError as exc:
        raise SystemExit(f"--clientapp-allocator: {exc}") from None
    for item in args.run_config:
        if "=" not in item:
            raise SystemExit(f"--run-config {item!r}: expected KEY=VALUE")
    try:
        counts = [int(x) for x in args.hospitals.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--hospitals {args.hospitals!r}: expected comma-separated integers") from None
    if not counts or min(counts) < 1:
        raise SystemExit("--hospitals: give one or more counts >= 1")
    if not (args.data / "HAM10000_metadata.csv").is_file():
        raise SystemExit(f"no HAM10000 at {args.data} (expected HAM10000_metadata.csv there); pass --data")

    results = []
    if args.append and args.out.is_file():
        results = [r for r in json.loads(args.out.read_text())["results"] if r["hospitals"] not in counts]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            print(f"{n} hospitals, {args.rounds} SSL rounds, ClientApps with {args.allocator.describe()} ...", flush=True)
            r = one(args, n, Path(tmp) / f"n{n}", Path(tmp) / "cache")
            r["min_hospitals"] = max(1, round(n * args.min_fraction))
            results = sorted([*results, r], key=lambda x: x["hospitals"])
            print(f"  round {r['round_seconds_median']:.1f}s; SuperNode peak {r['supernode_peak_rss_mb_mean']:.0f} MB RSS, "
                  f"{r['supernode_peak_pss_mb_mean']:.0f} MB PSS "
                  f"(idle {r['supernode_idle_rss_mb']:.0f} MB); SuperLink {r['superlink_peak_rss_mb']:.0f} MB; "
                  f"{r['lost_replies']} lost repl(ies) sent again", flush=True)
            out = {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("append", "allocator")},
                "results": results,
                "note": "ClientApps run with threads=1 node config; RSS counts shared library pages in every process, "
                        "PSS splits them among the processes sharing them (a SuperNode's tree: fedssl-supernode, its warm "
                        "SuperExec and the ClientApp tasks forked from it)",
            }
            args.out.write_text(json.dumps(out, indent=2) + "\n")  # after every N: a long run loses nothing
    print()
    print(f"{'hospitals':>9} {'round s':>8} {'train s':>8} {'eval s':>8} {'node peak MB':>13} {'node idle MB':>13} {'superlink MB':>13}")
    for r in results:
        last = r["rounds"][-1]
        print(f"{r['hospitals']:>9} {r['round_seconds_median']:>8.1f} {last['train_seconds']:>8.1f} {last['evaluate_seconds']:>8.1f} "
              f"{r['supernode_peak_rss_mb_mean']:>13.0f} {r['supernode_idle_rss_mb']:>13.0f} {r['superlink_peak_rss_mb']:>13.0f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Serving speed: the registry's KServe v2 endpoint next to the same model's in-process forward.

Starts a real `fedssl-registry` on a free port (temp SQLite + artifacts), registers a ResNet
classifier, then measures on this machine:

  * in-process: `build_inference_model` forward, batch 1 (latency) and batch C (throughput)
  * HTTP, concurrency 1: one image per request, p50/p99 latency → overhead over in-process
  * HTTP, concurrency C: C clients, one image per request, dynamic batching on the
    server → throughput relative to in-process batched forward

The four measurements run in `--rounds` interleaved rounds (this machine's speed drifts by
10-20 % from minute to minute); each round's ratios compare measurements taken seconds
apart, and the medians over rounds are reported, with their range. Within a round the
throughput comparison alternates `--segments` in-process and HTTP segments of equal length
(`--segment-seconds`), so that a drift weighs on both sides alike.

Requests use the v2 binary tensor extension (what tritonclient sends with binary_data=True);
`--json` measures JSON tensors instead. The load generator (`--client raw`, default) keeps one
HTTP/1.1 keep-alive connection per simulated client and writes pre-encoded requests from one
uvloop process, as wrk or hey do, so that the numbers are mostly the server's; `--client
httpx` uses a Python HTTP client per thread instead, whose own CPU use (it shares the 2
cores with the server) shows up in the results. The server runs with its defaults
(`--log-level INFO`: one access line per request).

    .venv/bin/python -m bench.registry_bench [--rounds 5] [--segments 4] [--concurrency 8]

Prints a table and writes JSON (default bench/results/registry_bench.json). Targets from the
issue: throughput with batching >= 0.8x in-process batched forward; p50 overhead at
concurrency 1 < 5 ms. Numbers are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import torch
import uvloop
from fedssl_core import names, weights
from fedssl_core.models import (
    TASK_GROUPS,
    FedSSLModel,
    build_inference_model,
    select_groups,
    set_torch_threads,
)

from tests.support import processes as P

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class InProcess:
    """The same forward the registry runs, without HTTP or batching machinery."""

    def __init__(self, arch: str, image_size: int, batch: int, tta: str = names.TTA_NONE) -> None:
        torch.manual_seed(0)
        self.model = build_inference_model(names.TASK_CLASSIFICATION, arch, len(CLASSES), tta).eval()
        self.x1 = torch.randn(1, 3, image_size, image_size)
        self.xb = torch.randn(batch, 3, image_size, image_size)
        self.batch = batch
        with torch.inference_mode():
            for _ in range(5):
                self.model(self.x1), self.model(self.xb)

    def latency(self, seconds: float) -> dict:
        lat = []
        with torch.inference_mode():
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                t = time.perf_counter()
                torch.softmax(self.model(self.x1), dim=1)
                lat.append(time.perf_counter() - t)
        return {"p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3, "images_per_s": 1.0 / statistics.mean(lat)}

    def throughput(self, seconds: float) -> tuple[int, float]:
        """(images, seconds) of back-to-back batched forwards for about `seconds`."""
        with torch.inference_mode():
            n, t0 = 0, time.perf_counter()
            end = t0 + seconds
            while time.perf_counter() < end:
                torch.softmax(self.model(self.xb), dim=1)
                n += self.batch
        return n, time.perf_counter() - t0


def request_body(image_size: int, as_json: bool, rng: np.random.Generator) -> tuple[bytes, dict]:
    x = rng.standard_normal((1, 3, image_size, image_size)).astype(np.float32)
    inp = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    if as_json:
        inp["data"] = x.ravel().tolist()
        return json.dumps({"inputs": [inp]}).encode(), {"Content-Type": "application/json"}
    raw = x.tobytes()
    inp["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"inputs": [inp], "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    return header + raw, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}


_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)\r$")


def raw_load(url: str, token: str, path: str, image_size: int, concurrency: int, requests: int, as_json: bool,
             seconds: float | None = None) -> dict:
    """`concurrency` keep-alive connections sending pre-encoded requests back to back:
    `requests` in all, or as many as fit in `seconds` when given."""
    rng = np.random.default_rng(0)
    host, port = urlsplit(url).hostname, urlsplit(url).port
    wire = []
    for body, headers in (request_body(image_size, as_json, rng) for _ in range(8)):
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Authorization: Bearer {token}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        wire.append(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    lat: list[float] = []
    errors: list[str] = []
    per_conn = max(1, requests // concurrency)

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        match = _LENGTH.search(head)
        body = await reader.readexactly(int(match.group(1))) if match else b""
        return int(head.split(b" ", 2)[1]), body

    async def client(i: int, start: asyncio.Event, ready: list) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        for _ in range(3):  # warm the connection and the model cache
            await one(reader, writer, wire[0])
        ready.append(i)
        await start.wait()
        deadline = time.perf_counter() + seconds if seconds else None
        for j in itertools.count() if deadline else range(per_conn):
            if deadline and time.perf_counter() >= deadline:
                break
            t = time.perf_counter()
            status, body = await one(reader, writer, wire[(i + j) % len(wire)])
            lat.append(time.perf_counter() - t)
            if status != 200:
                errors.append(f"{status} {body[:200]!r}")
        writer.close()

    async def run() -> float:
        start, ready = asyncio.Event(), []
        tasks = [asyncio.create_task(client(i, start, ready)) for i in range(concurrency)]
        while len(ready) < concurrency:
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        return time.perf_counter() - t0

    wall = uvloop.run(run())
    return summary(concurrency, lat, wall, errors)


def summary(concurrency: int, lat: list[float], wall: float, errors: list[str]) -> dict:
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"concurrency": concurrency, "requests": len(lat), "p50_ms": percentile(lat, 50) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3, "images_per_s": len(lat) / wall, "seconds": wall, "latencies": lat}


def merged(parts: list[dict]) -> dict:
    """One measurement from several segments: images over the summed wall time, pooled latencies."""
    lat = [x for p in parts for x in p["latencies"]]
    return summary(parts[0]["concurrency"], lat, sum(p["seconds"] for p in parts), [])


def http_load(url: str, token: str, path: str, image_size: int, concurrency: int, requests: int, as_json: bool,
              seconds: float | None = None) -> dict:
    rng = np.random.default_rng(0)
    bodies = [request_body(image_size, as_json, rng) for _ in range(8)]
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    per_thread = max(1, requests // concurrency)

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            for _ in range(3):  # warm the connection and the model cache
                http.post(path, content=bodies[0][0], headers=bodies[0][1])
            barrier.wait()
            deadline = time.perf_counter() + seconds if seconds else None
            for j in itertools.count() if deadline else range(per_thread):
                if deadline and time.perf_counter() >= deadline:
                    break
                body, headers = bodies[(i + j) % len(bodies)]
                t = time.perf_counter()
                r = http.post(path, content=body, headers=headers)
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                    lat.append(dt)

    barrier = threading.Barrier(concurrency + 1)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return summary(concurrency, lat, time.perf_counter() - t0, errors)


def median_of(rows: list[dict]) -> dict:
    return {k: statistics.median(row[k] for row in rows) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18", choices=list(names.ARCHITECTURES))
    ap.add_argument("--test-time-augmentation", default=names.TTA_NONE, choices=names.TTA_MODES,
                    help="the classifier's input_spec test_time_augmentation (dihedral: 8 forward passes per image)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of all four measurements; medians are reported")
    ap.add_argument("--requests", type=int, default=600, help="requests of the HTTP concurrency-1 measurement")
    ap.add_argument("--segments", type=int, default=4,
                    help="alternating in-process / HTTP segments that make up one round's throughput comparison")
    ap.add_argument("--segment-seconds", type=float, default=1.5, help="duration of each throughput segment")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-batch-size", type=int, default=32, help="server's dynamic batching limit (service default)")
    ap.add_argument("--max-batch-wait-ms", type=float, default=5.0, help="server's batching wait (service default)")
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of the in-process batch-1 measurement")
    ap.add_argument("--json", action="store_true", help="send JSON tensors instead of the binary extension")
    ap.add_argument("--log-level", default="INFO",
                    help="the server's log level; INFO (the service default) writes one access line per request")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="load generator: pre-encoded keep-alive requests (raw) or httpx client threads")
    ap.add_argument("--out", type=Path, default=Path("bench/results/registry_bench.json"))
    args = ap.parse_args()
    for flag, value in (("--rounds", args.rounds), ("--segments", args.segments), ("--segment-seconds", args.segment_seconds),
                        ("--requests", args.requests), ("--concurrency", args.concurrency), ("--seconds", args.seconds)):
        if value <= 0:
            ap.error(f"{flag} must be positive, got {value}")
    threads = set_torch_threads()
    local = InProcess(args.arch, args.image_size, args.concurrency, args.test_time_augmentation)
    load = raw_load if args.client == "raw" else http_load
    c = args.concurrency

    token = "bench-token"
    rounds = []
    with tempfile.TemporaryDirectory() as tmp, P.cluster(Path(tmp)) as cluster:
        reg = P.start_registry(cluster, Path(tmp) / "data", token=token, max_batch_size=str(args.max_batch_size),
                               max_batch_wait_ms=str(args.max_batch_wait_ms), log_level=args.log_level)
        torch.manual_seed(0)
        state = select_groups(FedSSLModel(args.arch, num_classes=len(CLASSES)).state_dict(), TASK_GROUPS[names.TASK_CLASSIFICATION])
        with reg.client() as http:
            http.post("/v1/models", json={"name": "bench", "task": "classification", "architecture": args.arch,
                                          "input_spec": {"image_size": args.image_size, "class_names": CLASSES,
                                                         "test_time_augmentation": args.test_time_augmentation}}).raise_for_status()
            http.post("/v1/models/bench/versions", files={"file": ("w.safetensors", weights.to_bytes(state, {}), "application/octet-stream")}
                      ).raise_for_status()
        path = "/v2/models/bench/infer"
        # The machine's speed drifts (other tenants, CPU frequency): each round measures the
        # in-process forward right before the HTTP measurement it is compared with.
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}: in-process batch 1, HTTP concurrency 1, in-process batch {c}, "
                  f"HTTP concurrency {c} ...", flush=True)
            r = {"in_process_batch1": local.latency(args.seconds),
                 "http_concurrency_1": load(reg.url, token, path, args.image_size, 1, args.requests, args.json)}
            # Throughput: in-process and HTTP segments of equal length, alternating, so that a
            # drift of the machine's speed weighs on both sides of the ratio alike.
            forwards, segments = [], []
            for _ in range(args.segments):
                forwards.append(local.throughput(args.segment_seconds))
                segments.append(load(reg.url, token, path, args.image_size, c, 0, args.json, seconds=args.segment_seconds))
            r[f"in_process_batch{c}_images_per_s"] = sum(n for n, _ in forwards) / sum(t for _, t in forwards)
            r[f"http_concurrency_{c}"] = merged(segments)
            r["p50_overhead_ms"] = r["http_concurrency_1"]["p50_ms"] - r["in_process_batch1"]["p50_ms"]
            r["throughput_ratio"] = r[f"http_concurrency_{c}"]["images_per_s"] / r[f"in_process_batch{c}_images_per_s"]
            print(f"  p50 overhead {r['p50_overhead_ms']:.2f} ms, throughput ratio {r['throughput_ratio']:.2f}x", flush=True)
            for key in ("http_concurrency_1", f"http_concurrency_{c}"):
                r[key].pop("latencies")
            rounds.append(r)
        metrics = httpx.get(reg.url + "/metrics").text
    batch_sizes = [line for line in metrics.splitlines() if line.startswith("fedssl_inference_batch_size_")]
    sums = {name: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            for name in ("fedssl_inference_duration_seconds_sum", "fedssl_inference_duration_seconds_count",
                         "fedssl_inference_batch_size_sum") if line.startswith(name + "{")}

    b1 = median_of([r["in_process_batch1"] for r in rounds])
    batched = statistics.median(r[f"in_process_batch{c}_images_per_s"] for r in rounds)
    c1 = median_of([r["http_concurrency_1"] for r in rounds])
    cn = median_of([r[f"http_concurrency_{c}"] for r in rounds])
    overheads = [r["p50_overhead_ms"] for r in rounds]
    ratios = [r["throughput_ratio"] for r in rounds]
    result = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": threads, "python": platform.python_version(), "torch": torch.__version__},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "in_process": {"p50_ms_batch1": b1["p50_ms"], "p99_ms_batch1": b1["p99_ms"], "images_per_s_batch1": b1["images_per_s"],
                       f"images_per_s_batch{c}": batched, "batch": c},
        "http_concurrency_1": c1,
        f"http_concurrency_{c}": cn,
        "p50_overhead_ms_concurrency_1": statistics.median(overheads),
        "p50_overhead_ms_range": [min(overheads), max(overheads)],
        "throughput_ratio_vs_in_process_batched": statistics.median(ratios),
        "throughput_ratio_range": [min(ratios), max(ratios)],
        "rounds": rounds,
        "server_batch_size_histogram": batch_sizes,
        "server_mean_forward_ms": 1e3 * sums.get("fedssl_inference_duration_seconds_sum", 0.0)
        / max(sums.get("fedssl_inference_duration_seconds_count", 1.0), 1.0),
        "server_mean_batch_size": sums.get("fedssl_inference_batch_size_sum", 0.0)
        / max(sums.get("fedssl_inference_duration_seconds_count", 1.0), 1.0),
        "targets": {"p50_overhead_ms_concurrency_1": "< 5", "throughput_ratio_vs_in_process_batched": ">= 0.8"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"medians of {args.rounds} rounds")
    print(f"{'measurement':<44} {'p50 ms':>9} {'p99 ms':>9} {'images/s':>10}")
    print(f"{'in-process forward, batch 1':<44} {b1['p50_ms']:>9.2f} {b1['p99_ms']:>9.2f} {b1['images_per_s']:>10.1f}")
    print(f"{f'in-process forward, batch {c}':<44} {'':>9} {'':>9} {batched:>10.1f}")
    print(f"{'HTTP v2 infer, concurrency 1':<44} {c1['p50_ms']:>9.2f} {c1['p99_ms']:>9.2f} {c1['images_per_s']:>10.1f}")
    print(f"{f'HTTP v2 infer, concurrency {c} (dynamic batching)':<44} {cn['p50_ms']:>9.2f} {cn['p99_ms']:>9.2f} {cn['images_per_s']:>10.1f}")
    print()
    print(f"p50 overhead at concurrency 1: {result['p50_overhead_ms_concurrency_1']:.2f} ms "
          f"(rounds {min(overheads):.2f} to {max(overheads):.2f}; target < 5 ms)")
    print(f"throughput vs in-process batched forward: {result['throughput_ratio_vs_in_process_batched']:.2f}x "
          f"(rounds {min(ratios):.2f} to {max(ratios):.2f}; target >= 0.8x)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Prometheus metrics and request logging: every metric defined here, in one place.

Names follow Prometheus conventions (base units, `_total`, `_seconds`); labels stay low
cardinality: the route template, never the raw path; model names and run ids are bounded
by what the registry holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from fedssl_core import names

from .errors import body_too_large, error_response

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # *_created series only add cardinality here
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fedssl_http_requests_total", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("fedssl_http_request_duration_seconds", "HTTP request latency by route and method.",
                                         ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("fedssl_inference_duration_seconds", "Forward-pass latency of one batch.",
                                           ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("fedssl_inference_batch_size", "Images per forward pass (dynamic batching).",
                                    ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.inference_images = Counter("fedssl_inference_images_total", "Images run through models.", ["model"], registry=r)
        self.generated_images = Counter("fedssl_generated_images_total", "Images drawn by generation models (:generate, /v2 "
                                        "infer); their forward passes are in fedssl_inference_duration_seconds and "
                                        "fedssl_inference_batch_size too.", ["model"], registry=r)
        self.loaded_models = Gauge("fedssl_loaded_models", "Model versions loaded in memory.", registry=r)
        self.model_loads = Counter("fedssl_model_loads_total", "Model versions loaded: pinned (an alias or the default) "
                                   "or on demand (any other version).", ["model", "kind"], registry=r)
        self.model_loads_refused = Counter("fedssl_model_loads_refused_total", "Requests answered 429: the version was not "
                                           "loaded and the model's on-demand loads were at FEDSSL_REGISTRY_MODEL_LOADS_PER_MINUTE.",
                                           ["model"], registry=r)
        self.decodes_running = Gauge("fedssl_decodes_running", "Images or v2 request bodies being decoded now "
                                     "(at most FEDSSL_REGISTRY_DECODE_WORKERS).", registry=r)
        self.decodes_waiting = Gauge("fedssl_decodes_waiting", "Images or v2 request bodies waiting for a decode thread.", registry=r)
        self.model_versions = Gauge("fedssl_model_versions", "Registered versions per model.", ["model"], registry=r)
        self.fl_rounds = Counter("fedssl_federated_rounds_total", "Federated rounds reported by the aggregator.", ["phase"], registry=r)
        self.fl_loss = Gauge("fedssl_federated_round_loss", "Latest aggregated training loss per run and phase.", ["run_id", "phase"], registry=r)
        self.fl_bacc = Gauge("fedssl_federated_round_balanced_accuracy", "Latest aggregated balanced accuracy per run and phase.",
                             ["run_id", "phase"], registry=r)
        self.fl_served_bacc = Gauge("fedssl_federated_round_served_balanced_accuracy",
                                    "Balanced accuracy of a run's final classifier as served to each hospital naming itself "
                                    "(hospital-batchnorm: its own statistics and label mix; confusion matrices summed).",
                                    ["run_id", "phase"], registry=r)
        self.fl_duration = Gauge("fedssl_federated_round_duration_seconds", "Duration of the latest round per run and phase.",
                                 ["run_id", "phase"], registry=r)
        self.fl_examples = Gauge("fedssl_federated_hospital_examples", "Training examples per hospital in the latest round.",
                                 ["run_id", "hospital"], registry=r)
        self.fl_bytes = Counter("fedssl_federated_bytes_total", "Model bytes exchanged in federated rounds.", ["direction"], registry=r)

    def observe_batch(self, model: str, n: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(n)
        self.inference_seconds.labels(model).observe(seconds)
        self.inference_images.labels(model).inc(n)

    def observe_generation(self, model: str, n: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(n)
        self.inference_seconds.labels(model).observe(seconds)
        self.generated_images.labels(model).inc(n)

    def on_registry_event(self, event: str, payload: dict) -> None:
        if event == "version":
            self.model_versions.labels(payload["model"]).set(payload["version"])
        elif event == "round":
            run, phase = payload["run_id"], payload["phase"]
            agg = payload.get("aggregated", {})
            self.fl_rounds.labels(phase).inc()
            loss = agg.get(names.M_FINETUNE_LOSS if phase == names.PHASE_FINETUNE else names.M_LOSS)
            if isinstance(loss, (int, float)):
                self.fl_loss.labels(run, phase).set(loss)
            if isinstance(agg.get(names.M_BALANCED_ACCURACY), (int, float)):
                self.fl_bacc.labels(run, phase).set(agg[names.M_BALANCED_ACCURACY])
            if isinstance(agg.get(names.M_SERVED_BALANCED_ACCURACY), (int, float)):
                self.fl_served_bacc.labels(run, phase).set(agg[names.M_SERVED_BALANCED_ACCURACY])
            if payload.get("duration_seconds") is not None:
                self.fl_duration.labels(run, phase).set(payload["duration_seconds"])
            for hospital, n in (payload.get("examples") or {}).items():
                self.fl_examples.labels(run, hospital).set(n)
            for direction, key in (("sent", "bytes_sent"), ("received", "bytes_received")):
                if payload.get(key):
                    self.fl_bytes.labels(direction).inc(payload[key])


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("uvicorn.access").disabled = True  # our middleware logs each request once


access_log = logging.getLogger("fedssl.registry.access")


def log_request(method: str, path: str, status: int, seconds: float, client: str | None) -> None:
    access_log.info("%s %s %d %.1fms", method, path, status, seconds * 1000,
                    extra={"fields": {"method": method, "path": path, "status": status,
                                      "duration_ms": round(seconds * 1000, 2), "client": client}})


def now() -> float:
    return time.perf_counter()


class ObserveMiddleware:
    """Pure ASGI middleware (cheaper per request than Starlette's BaseHTTPMiddleware): refuses
    bodies larger than `max_body` with 413 (declared ones at once, chunked ones when they pass
    the limit), then counts, times and logs every request by its route template.

    The count, the latency observation and the access-log line are recorded in a callback on
    the next turn of the event loop, not inline: when a batch of inferences finishes, the
    event loop then writes all the batch's responses first and logs them afterwards, and the
    model's next batch does not wait for log lines (docs/benchmarks.md, Serving). The latency
    is measured when the response has been sent, as before.
    """

    def __init__(self, app, *, metrics: Metrics, max_body: int) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body

    def _limited(self, receive):
        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise body_too_large(self.max_body)
            return message

        return receive_limited

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = now()
        status = 500

        async def send_observed(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        try:
            if length is not None and length.isdigit() and int(length) > self.max_body:
                refused = body_too_large(self.max_body, int(length))
                await error_response(refused.status_code, refused.detail)(scope, receive, send_observed)
            elif length is None:  # chunked: count the body as it arrives
                await self.app(scope, self._limited(receive), send_observed)
            else:
                await self.app(scope, receive, send_observed)
        finally:
            asyncio.get_running_loop().call_soon(self._record, scope, status, now() - t0)

    def _record(self, scope, status: int, elapsed: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope["method"]
        self.metrics.requests.labels(template, method, str(status)).inc()
        self.metrics.request_seconds.labels(template, method).observe(elapsed)
        client = scope.get("client")
        log_request(method, scope["path"], status, elapsed, client[0] if client else None)

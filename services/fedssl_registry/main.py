"""Application factory and entry point (`fedssl-registry`)."""

from __future__ import annotations

import logging
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from . import __version__, dashboard, db
from .api.deps import ReadAuth
from .api.routes import models, runs, v2
from .core import errors
from .core.config import Settings
from .core.observability import Metrics, ObserveMiddleware, setup_logging
from .core.transport import HttpProtocol
from .inference import v2_datamodels
from .inference.repository import ModelRepository, torch_thread
from .service import Registry
from .storage import ArtifactStore

log = logging.getLogger("fedssl.registry")


def create_app(settings: Settings) -> FastAPI:
    """A registry app over `settings` (its own database, artifacts and metrics)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = db.make_engine(settings.db_url)
    store = ArtifactStore(settings.artifact_dir)
    torch_executor = torch_thread(settings.threads or None)
    registry = Registry(db.make_sessionmaker(engine), store, torch_executor)
    store.cleanup(registry.referenced_shas())  # leftovers of uploads a crash interrupted
    metrics = Metrics()
    registry.listeners.append(metrics.on_registry_event)
    for m in registry.list_models():
        if m["latest_version"]:
            metrics.model_versions.labels(m["name"]).set(m["latest_version"])
    repository = ModelRepository(registry, cache_size=settings.model_cache_size, max_batch_size=settings.max_batch_size,
                                 max_wait_ms=settings.max_batch_wait_ms, metrics=metrics, executor=torch_executor,
                                 decode_workers=settings.decode_workers, loads_per_minute=settings.model_loads_per_minute)
    registry.listeners.append(repository.on_registry_event)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        log.info("fedssl registry %s: data %s, database %s, read auth %s", __version__, settings.data_dir,
                 settings.db_url.split("@")[-1], "on" if settings.read_auth else "off")
        if not settings.token:
            log.warning("DEVELOPMENT MODE: no token; anyone who can reach this service can change the registry")
        yield
        repository.close()
        engine.dispose()

    app = FastAPI(title="fedssl model registry", version=__version__, lifespan=lifespan)
    app.state.settings, app.state.registry, app.state.repository, app.state.metrics = settings, registry, repository, metrics
    errors.install(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type", "Inference-Header-Content-Length"])

    app.add_middleware(ObserveMiddleware, metrics=metrics, max_body=settings.max_upload_bytes)

    # Metrics name models and hospitals' traffic: they follow read_auth like every other read.
    @app.get("/metrics", include_in_schema=False, dependencies=[ReadAuth])
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.router.routes[0:0] = v2.infer_routes  # first: the hot path skips FastAPI's routing (see v2.InferRoute)
    app.include_router(models.router)
    app.include_router(runs.router)
    app.include_router(v2.router)
    app.include_router(dashboard.router)
    openapi = app.openapi
    built: list[dict] = []

    def openapi_with_infer() -> dict:
        """FastAPI's schema plus the plain-ASGI infer routes, built once (as FastAPI caches its own)."""
        if built:
            return built[0]
        schema = openapi()
        schema["paths"].update(v2.openapi_paths())
        schema.setdefault("components", {}).setdefault("schemas", {}).update(v2_datamodels.openapi_components())
        # FastAPI declares a 422 with its own body on every route with a parameter; the
        # routes declare the 422s they can answer (errors.error_responses), with our body.
        for ops in schema["paths"].values():
            for op in ops.values():
                ref = op.get("responses", {}).get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
                if ref.get("$ref", "").endswith("/HTTPValidationError"):
                    del op["responses"]["422"]
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        built.append(schema)
        return schema

    app.openapi = openapi_with_infer  # type: ignore[method-assign]
    return app


def run() -> None:
    """Console entry point: settings from FEDSSL_REGISTRY_* env, then uvicorn."""
    try:
        settings = Settings()
    except ValidationError as exc:
        msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        print(f"fedssl-registry: invalid settings: {msgs}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(settings.log_level, settings.log_json)
    import uvicorn

    try:
        app = create_app(settings)
    except (SQLAlchemyError, ImportError) as exc:  # unreachable server, bad URL, driver not installed
        url = make_url(settings.db_url).render_as_string(hide_password=True)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"fedssl-registry: cannot open the database {url}: {reason}", file=sys.stderr)
        raise SystemExit(2) from None
    tls = {"ssl_certfile": str(settings.ssl_certfile), "ssl_keyfile": str(settings.ssl_keyfile)} if settings.ssl_certfile else {}
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                http=HttpProtocol, **tls)


if __name__ == "__main__":
    run()

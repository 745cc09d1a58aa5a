"""KServe Open Inference Protocol v2 (REST): health, metadata, infer."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Path, Request
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from fedssl_core import names

from ... import __version__
from ...core.errors import InvalidInput, error_responses
from ...inference import v2 as protocol
from ...inference import v2_datamodels as dm
from ...schemas import DB_INT_MAX
from ..deps import ReadAuth, RegistryDep, RepositoryDep, SettingsDep, check_token

router = APIRouter(prefix="/v2", tags=["v2"])
VERSION_RE = re.compile(r"[0-9]{1,10}")
# Checked by `_version` (400, as for any bad v2 request) rather than by FastAPI (422).
VersionPath = Annotated[str, Path(description="a positive integer", examples=["1"])]


@router.get("/health/live", response_model=dm.ServerLiveResponse)
def live() -> dict:
    return {"live": True}


@router.get("/health/ready", response_model=dm.ServerReadyResponse)
def ready(request: Request, registry: RegistryDep) -> dict:
    registry.list_models()  # the database answers
    return {"ready": True}


@router.get("", response_model=dm.ServerMetadataResponse, dependencies=[ReadAuth], responses=error_responses(401))
def server_metadata() -> dict:
    return {"name": "fedssl-registry", "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]}


def _metadata(registry, settings, name: str, version: int | None) -> dict:
    model, ver = registry.resolve(name, version)
    versions = [v["version"] for v in registry.list_versions(name)] if version is None else [ver["version"]]
    return protocol.model_metadata(model, versions, _max_batch(model["task"], settings))


def _max_batch(task: str, settings) -> int:
    """Most images (N) in one infer request to a model of `task`."""
    return settings.max_generate_count if task == names.TASK_GENERATION else settings.max_infer_batch


@router.get("/models/{name}", response_model=dm.ModelMetadataResponse, dependencies=[ReadAuth],
            responses=error_responses(400, 401, 404))
def model_metadata(name: str, registry: RegistryDep, settings: SettingsDep) -> dict:
    return _metadata(registry, settings, name, None)


@router.get("/models/{name}/versions/{version}", response_model=dm.ModelMetadataResponse, dependencies=[ReadAuth],
            responses=error_responses(400, 401, 404))
def model_version_metadata(name: str, version: VersionPath, registry: RegistryDep, settings: SettingsDep) -> dict:
    return _metadata(registry, settings, name, _version(version))


async def _ready(name: str, version: int | None, repository) -> dict:
    loaded = await repository.get(name, version)
    return {"name": loaded.name, "version": str(loaded.version), "ready": True}


@router.get("/models/{name}/ready", response_model=dm.ModelReadyResponse, dependencies=[ReadAuth],
            responses=error_responses(400, 401, 404, 429, 503))
async def model_ready(name: str, repository: RepositoryDep) -> dict:
    return await _ready(name, None, repository)


@router.get("/models/{name}/versions/{version}/ready", response_model=dm.ModelReadyResponse, dependencies=[ReadAuth],
            responses=error_responses(400, 401, 404, 429, 503))
async def model_version_ready(name: str, version: VersionPath, repository: RepositoryDep) -> dict:
    return await _ready(name, _version(version), repository)


class InferRoute(Route):
    """`POST /v2/models/{name}[/versions/{version}]/infer`, the hot path, as a plain ASGI app.

    The app lists these routes first, so an inference request skips FastAPI's routing,
    dependency injection and Request/Response objects: on 2 cores that was a third of the
    event loop's time per request, time during which the model sits idle
    (bench/registry_bench.py). The middleware (size limit, metrics, logs, CORS) and the app's
    error handlers still apply: a RegistryError raised here becomes the usual JSON error.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path, _infer, methods=["POST"], include_in_schema=False)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match != Match.NONE:
            child["route"] = self  # metrics label requests by this template, as FastAPI's routes do
        return match, child


class _InferEndpoint:
    """An ASGI app, not a function: Starlette would wrap a function in Request/Response."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["app"].state
        headers = dict(scope["headers"])
        if state.settings.read_auth:
            check_token(headers.get(b"authorization", b"").decode("latin-1"), state.settings)
        params = scope["path_params"]
        model = await state.repository.get(params["name"], _version(params.get("version")))
        if model.task == names.TASK_GENERATION:
            await self._generate(model, headers, state, receive, send)
            return
        with model.batcher.incoming():
            req = await _parse(state, headers, await read_body(receive), protocol.parse_request,
                               model.image_size, model.mean, model.std, state.settings.max_infer_batch)
        out = await model.infer(req.array, req.hospital)
        payload, extra = protocol.build_response(model.name, model.version, model.task, model.class_names, out, req)
        await _respond(send, payload, extra)

    async def _generate(self, model, headers: dict, state, receive: Receive, send: Send) -> None:
        """A generation model's infer: `class` with `seed` or `latent` in, `images` out."""
        req = await _parse(state, headers, await read_body(receive), protocol.parse_generate_request,
                           model.name, model.class_names, int(model.spec["z_dim"]), state.settings.max_generate_count)
        images = await state.repository.generate(model, req.labels, req.seed, req.latent)
        payload, extra = protocol.build_response(model.name, model.version, model.task, model.class_names, images, req)
        await _respond(send, payload, extra)


async def _parse(state, headers: dict, body: bytes, parse, *args):
    """`parse(body, header_length, *args)`: on the event loop when the body is small, else
    (JSON and numpy work of up to seconds) off it, bounded (inference.decode)."""
    raw_length = headers.get(protocol.HEADER_LENGTH.lower().encode())
    header_length = None if raw_length is None else raw_length.decode("latin-1")
    if protocol.parses_inline(len(body), header_length):
        return parse(body, header_length, *args)
    return await state.repository.decoder.run(parse, body, header_length, *args)


async def _respond(send: Send, payload: bytes, extra: dict[str, str]) -> None:
    response_headers = [(b"content-length", str(len(payload)).encode())]
    response_headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": 200, "headers": response_headers})
    await send({"type": "http.response.body", "body": payload})


_infer = _InferEndpoint()


def _version(value: str | None) -> int | None:
    """A v2 path's version: a positive integer in ASCII digits, else 400 (as for any bad v2
    request). Not `str.isdigit`: it takes '²' (which `int` refuses) and '١' (which it reads as 1)."""
    if value is None:
        return None
    if not VERSION_RE.fullmatch(value) or not 1 <= int(value) <= DB_INT_MAX:
        raise InvalidInput(f"version must be a positive integer (ASCII digits, at most {DB_INT_MAX}), got {value!r}")
    return int(value)


async def read_body(receive: Receive) -> bytes:
    """The whole request body (the size limit is enforced by the middleware as it arrives)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


infer_routes = [InferRoute("/v2/models/{name}/infer"), InferRoute("/v2/models/{name}/versions/{version}/infer")]


def openapi_paths() -> dict:
    """OpenAPI entries for the infer routes (plain ASGI routes are not in FastAPI's schema)."""
    errors = {str(status): {"description": text, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "string"}}}}}}
        for status, text in ((400, "Bad tensor, shape, datatype or JSON, or an input the model's task does not take"),
                             (401, "Missing or wrong token (read auth)"),
                             (404, "Unknown model or version"),
                             (413, "Body too large, or more images than the model metadata's parameters.max_batch_size"),
                             (429, "Version not loaded and the model's on-demand loads at their limit; see Retry-After"),
                             (503, "Model cannot be loaded"))}
    body = {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "description": "v2 inference request with JSON tensors: 'image' "
                                         "or 'input' for embedding and classification models, 'class' with 'seed' or "
                                         "'latent' for generation models (the model metadata lists them)"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description":
            f"v2 binary tensor extension: JSON header ({protocol.HEADER_LENGTH} bytes) then the tensor bytes"}}}}
    ok = {"description": "v2 inference response (binary when the request asked for binary outputs: the JSON header, "
                         f"its length in {protocol.HEADER_LENGTH}, then the outputs' bytes)",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferenceResponse"}},
                      "application/octet-stream": {}}}
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1, "maximum": DB_INT_MAX}}

    def op(summary: str, parameters: list) -> dict:
        return {"post": {"tags": ["v2"], "summary": summary, "parameters": parameters, "requestBody": body,
                         "responses": {"200": ok, **errors}}}

    return {
        "/v2/models/{name}/infer": op("Infer (the production alias, else the latest version)", [name]),
        "/v2/models/{name}/versions/{version}/infer": op("Infer with a given version", [name, version]),
    }

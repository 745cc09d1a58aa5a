"""KServe Open Inference Protocol v2 (REST): health, metadata, infer."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ... import __version__
from ...core.errors import ModelNotFound
from ...inference import v2 as protocol
from ..deps import ReadAuth, RegistryDep, RepositoryDep

router = APIRouter(prefix="/v2", tags=["v2"])


@router.get("/health/live")
def live() -> dict:
    return {"live": True}


@router.get("/health/ready")
def ready(request: Request, registry: RegistryDep) -> dict:
    registry.list_models()  # the database answers
    return {"ready": True}


@router.get("", dependencies=[ReadAuth])
def server_metadata() -> dict:
    return {"name": "fedssl-registry", "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]}


def _metadata(registry, name: str, version: int | None) -> dict:
    model, ver = registry.resolve(name, version)
    versions = [v["version"] for v in registry.list_versions(name)] if version is None else [ver["version"]]
    return protocol.model_metadata(model, versions)


@router.get("/models/{name}", dependencies=[ReadAuth])
def model_metadata(name: str, registry: RegistryDep) -> dict:
    return _metadata(registry, name, None)


@router.get("/models/{name}/versions/{version}", dependencies=[ReadAuth])
def model_version_metadata(name: str, version: int, registry: RegistryDep) -> dict:
    return _metadata(registry, name, version)


async def _ready(name: str, version: int | None, repository) -> dict:
    try:
        loaded = await repository.get(name, version)
    except ModelNotFound:
        raise
    return {"name": loaded.name, "version": str(loaded.version), "ready": True}


@router.get("/models/{name}/ready", dependencies=[ReadAuth])
async def model_ready(name: str, repository: RepositoryDep) -> dict:
    return await _ready(name, None, repository)


@router.get("/models/{name}/versions/{version}/ready", dependencies=[ReadAuth])
async def model_version_ready(name: str, version: int, repository: RepositoryDep) -> dict:
    return await _ready(name, version, repository)


async def _infer(name: str, version: int | None, request: Request, repository) -> Response:
    model = await repository.get(name, version)
    with model.batcher.incoming():
        body = await request.body()
        req = protocol.parse_request(body, request.headers.get(protocol.HEADER_LENGTH), model.image_size,
                                     model.spec.get("mean"), model.spec.get("std"))
    out = await model.batcher.submit(req.array)
    payload, headers = protocol.build_response(model.name, model.version, model.task, model.class_names, out, req)
    media = headers.pop("content-type")
    return Response(payload, media_type=media, headers=headers)


@router.post("/models/{name}/infer", dependencies=[ReadAuth])
async def infer(name: str, request: Request, repository: RepositoryDep) -> Response:
    return await _infer(name, None, request, repository)


@router.post("/models/{name}/versions/{version}/infer", dependencies=[ReadAuth])
async def infer_version(name: str, version: int, request: Request, repository: RepositoryDep) -> Response:
    return await _infer(name, version, request, repository)

"""/v1/models: registered models, versions (safetensors uploads), aliases, image prediction
and image generation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from fedssl_core import names
from fedssl_core.preprocessing import ImageDecodeError

from ...core.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType, error_responses
from ...inference import generate as gen
from ...inference.repository import GENERATION_TASKS, IMAGE_TASKS
from ...schemas import (DB_INT_MAX, AliasSet, GenerateRequest, ModelCreate, ModelList, ModelResponse,
                        PredictResponse, VersionList, VersionResponse)
from ...service import version_metadata
from ..deps import ReadAuth, RegistryDep, RepositoryDep, SettingsDep, WriteAuth

router = APIRouter(prefix="/v1/models", tags=["models"])

SAFETENSORS_TYPES = {"application/octet-stream", "application/x-safetensors", ""}
IMAGE_TYPES = {"image/jpeg", "image/png", "image/jpg"}
VersionPath = Annotated[int, Path(ge=1, le=DB_INT_MAX, description="a version number")]
VersionQuery = Annotated[int | None, Query(ge=1, le=DB_INT_MAX, description="a version number (default: the production "
                                                                            "alias, else the latest)")]


def _require_multipart(request: Request) -> None:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise UnsupportedMediaType(f"expected a multipart/form-data upload with a 'file' field, got {ctype or 'no content type'}")


@router.get("", response_model=ModelList, dependencies=[ReadAuth], responses=error_responses(401))
def list_models(registry: RegistryDep) -> dict:
    return {"models": registry.list_models()}


@router.post("", status_code=201, response_model=ModelResponse, dependencies=[WriteAuth],
             responses=error_responses(400, 401, 409, 413, 422))
def create_model(body: ModelCreate, registry: RegistryDep) -> dict:
    return registry.create_model(body)


@router.get("/{name}", response_model=ModelResponse, dependencies=[ReadAuth], responses=error_responses(400, 401, 404))
def get_model(name: str, registry: RegistryDep) -> dict:
    return registry.get_model(name)


@router.get("/{name}/versions", response_model=VersionList, dependencies=[ReadAuth], responses=error_responses(400, 401, 404))
def list_versions(name: str, registry: RegistryDep) -> dict:
    return {"versions": registry.list_versions(name)}


@router.post("/{name}/versions", status_code=201, response_model=VersionResponse, dependencies=[WriteAuth],
             responses=error_responses(400, 401, 404, 409, 413, 415, 422))
async def upload_version(name: str, request: Request, registry: RegistryDep, settings: SettingsDep,
                         file: UploadFile = File(...), metadata: str | None = Form(None)) -> dict:
    _require_multipart(request)
    registry.get_model(name)  # 404 before reading a large body into the store
    if (file.content_type or "") not in SAFETENSORS_TYPES:
        raise UnsupportedMediaType(f"weights must be a safetensors file sent as application/octet-stream, got {file.content_type}")
    meta = version_metadata(metadata)
    upload = await registry.store.receive(_chunks(file), settings.max_upload_bytes)
    return await run_in_threadpool(registry.create_version, name, upload, meta)


async def _chunks(file: UploadFile, size: int = 1 << 20) -> AsyncIterator[bytes]:
    while chunk := await file.read(size):
        yield chunk


@router.get("/{name}/versions/{version}", response_model=VersionResponse, dependencies=[ReadAuth],
            responses=error_responses(400, 401, 404, 422))
def get_version(name: str, version: VersionPath, registry: RegistryDep) -> dict:
    return registry.get_version(name, version)


@router.get("/{name}/versions/{version}/weights", dependencies=[ReadAuth], response_class=FileResponse,
            responses={200: {"description": "The safetensors file", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                       **error_responses(400, 401, 404, 422)})
def download_weights(name: str, version: VersionPath, registry: RegistryDep) -> FileResponse:
    path = registry.weights_path(name, version)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{name}-v{version}.safetensors")


@router.delete("/{name}/versions/{version}", status_code=204, dependencies=[WriteAuth], responses=error_responses(400, 401, 404, 409, 422))
def delete_version(name: str, version: VersionPath, registry: RegistryDep) -> None:
    registry.delete_version(name, version)  # the model repository unloads it on the version_deleted event


@router.put("/{name}/aliases/{alias}", response_model=ModelResponse, dependencies=[WriteAuth],
            responses=error_responses(400, 401, 404, 413, 422))
def set_alias(name: str, alias: str, body: AliasSet, registry: RegistryDep) -> dict:
    return registry.set_alias(name, alias, body.version)


@router.delete("/{name}/aliases/{alias}", status_code=204, dependencies=[WriteAuth], responses=error_responses(400, 401, 404))
def delete_alias(name: str, alias: str, registry: RegistryDep) -> None:
    registry.delete_alias(name, alias)


@router.post("/{name}:predict", response_model=PredictResponse, response_model_exclude_unset=True, dependencies=[ReadAuth],
             responses=error_responses(400, 401, 404, 413, 415, 422, 429, 503))
async def predict(name: str, request: Request, repository: RepositoryDep, settings: SettingsDep,
                  file: UploadFile = File(...), version: VersionQuery = None, alias: str | None = None,
                  hospital: str | None = None) -> dict:
    """Classify (or embed) one uploaded JPEG/PNG image. `hospital`: the asking hospital, one of
    those that trained the classifier; its probabilities are then adjusted to that hospital's
    own label mix (`fedssl_core.label_shift`), and its image normalised by that hospital's own
    BatchNorm statistics where the version carries them (`fedssl_core.hospital_batchnorm`)."""
    _require_multipart(request)
    if (file.content_type or "").lower() not in IMAGE_TYPES:
        raise UnsupportedMediaType(f"expected a JPEG or PNG image (image/jpeg, image/png), got {file.content_type or 'no content type'}")
    data = await file.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise PayloadTooLarge(f"image exceeds {settings.max_image_bytes} bytes")
    model = await repository.get(name, version, alias, tasks=IMAGE_TASKS, call=":predict")
    model.label_ratio(hospital)  # before any work: an unknown hospital is a 400
    try:
        x = await repository.decoder.run(model.preprocess, data, settings.max_image_pixels)
    except ImageDecodeError as exc:
        raise InvalidInput(str(exc)) from None
    out = (await model.infer(x, hospital))[0]
    if model.task == names.TASK_CLASSIFICATION:
        best = int(out.argmax())
        return {"model": model.name, "version": model.version, "label": model.class_names[best],
                "probabilities": dict(zip(model.class_names, out.tolist())), **({"hospital": hospital} if hospital is not None else {})}
    return {"model": model.name, "version": model.version, "embedding": out.tolist()}


@router.post("/{name}:generate", dependencies=[ReadAuth],
             responses={200: {"model": gen.GeneratedImages, "description": "format json: the images as base64 PNGs; format "
                              "zip: an application/zip of PNGs named <class>-<seed>-<i>.png",
                              "content": {gen.ZIP_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
                        **error_responses(400, 401, 404, 413, 422, 429, 503)})
async def generate(name: str, body: GenerateRequest, repository: RepositoryDep, settings: SettingsDep,
                   version: VersionQuery = None, alias: str | None = None) -> Response:
    """Draw `count` images of one class from a generation model: those of
    `fedssl_core.generative.sample(generator, [class] * count, seed)`, so the same class,
    count and seed give the same images, byte for byte."""
    gen.check_count(body.count, settings.max_generate_count)
    model = await repository.get(name, version, alias, tasks=GENERATION_TASKS, call=":generate")
    index = gen.class_index(body.class_, model.class_names, model.name)
    images = await repository.generate(model, np.full(body.count, index, dtype=np.int64), body.seed)
    class_name = model.class_names[index]
    if body.format == gen.FORMAT_ZIP:
        data = await repository.decoder.run(gen.zip_body, images, class_name, index, body.seed)
        stem = f"{gen.file_stem(model.name, 'model')}-v{model.version}-{gen.file_stem(class_name, f'class{index}')}"
        filename = f"{stem}-{body.seed}.zip"
        return Response(data, media_type=gen.ZIP_TYPE, headers={"Content-Disposition": f'attachment; filename="{filename}"'})
    answer = await repository.decoder.run(gen.json_body, images, model.name, model.version, class_name, index, body.seed)
    return Response(json.dumps(answer).encode(), media_type="application/json")

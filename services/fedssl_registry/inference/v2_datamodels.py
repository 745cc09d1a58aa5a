"""The JSON answers of the Open Inference Protocol v2 (REST), as pydantic models: the routes
declare them (`response_model`), so FastAPI checks every answer against them and the OpenAPI
schema describes each one, as KServe's `kserve/protocol/rest/v2_datamodels.py` does. The
infer routes are plain ASGI (see `api.routes.v2.InferRoute`): `InferenceResponse` only
documents their JSON answer there (`openapi_components`), and the schema fuzz test checks real
answers against it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ServerLiveResponse(BaseModel):
    live: bool


class ServerReadyResponse(BaseModel):
    ready: bool


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class MetadataTensor(BaseModel):
    name: str
    datatype: str = Field(description="a v2 tensor datatype: FP32, UINT8, INT64, BYTES, ...")
    shape: list[int] = Field(description="-1 where the size is free (the batch, or an embedding's width)")


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str] = Field(description="the registered versions; on a version's route, that version")
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any] = Field(default_factory=dict, description=(
        "task, architecture, class_names, max_batch_size; classifiers: mean, std and test_time_augmentation; "
        "generators: image_size, z_dim, required_inputs, optional_inputs and default_seed"))


class ModelReadyResponse(BaseModel):
    name: str
    version: str
    ready: bool


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = Field(None, description="row-major values; absent when the output travels as binary data")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size when the output follows the JSON header")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="hospital: the hospital the answer was served as")
    outputs: list[ResponseOutput]


def openapi_components() -> dict[str, dict]:
    """`InferenceResponse` and the models it nests, as OpenAPI component schemas."""
    schema = InferenceResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    nested = schema.pop("$defs", {})
    return {**nested, "InferenceResponse": schema}

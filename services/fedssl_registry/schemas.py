"""Request bodies of the /v1 API (responses are plain dicts built in `service`)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedssl_core import names

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_size: int = Field(ge=16, le=1024)
    channels: Literal[3] = 3
    mean: list[float] = Field(default_factory=lambda: list(names.IMAGENET_MEAN), min_length=3, max_length=3)
    std: list[float] = Field(default_factory=lambda: list(names.IMAGENET_STD), min_length=3, max_length=3)
    class_names: list[str] = Field(default_factory=list)


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    task: Literal["embedding", "classification"]
    architecture: Literal["resnet18", "resnet50", "efficientnet_lite0"] = "resnet18"
    input_spec: InputSpec

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must match ^[a-z0-9][a-z0-9._-]{0,62}$ (lower-case letters, digits, . _ -)")
        return v


class VersionMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tags: dict[str, str] = Field(default_factory=dict)
    lineage: dict[str, Any] = Field(default_factory=dict)
    data_source: str = ""
    synthetic_data: bool = False


class AliasSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)


class RunUpsert(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["running", "succeeded", "failed"] = "running"
    phase: str | None = None
    planned_rounds: dict[str, int] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    data_source: str = ""
    synthetic_data: bool = False
    warnings: list[str] = Field(default_factory=list)
    hospitals: dict[str, dict[str, Any]] = Field(default_factory=dict)
    class_names: list[str] = Field(default_factory=list)
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None


class RoundCreate(BaseModel):
    model_config = ConfigDict(extra="allow")
    phase: Literal["ssl", "finetune"]
    round: int = Field(ge=1)
    aggregated: dict[str, Any] = Field(default_factory=dict)
    hospitals: dict[str, dict[str, Any]] = Field(default_factory=dict)
    examples: dict[str, int] = Field(default_factory=dict)
    duration_seconds: float | None = None
    bytes_sent: int | None = None
    bytes_received: int | None = None

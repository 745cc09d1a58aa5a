"""Request bodies and answers of the /v1 API, and the bounds every number and JSON value a
client sends must keep: checked here, once, at the boundary, so nothing past it meets a value
the database or the JSON encoder refuses. The answers (`...Response`, built as dicts in
`service`) are what the routes declare: FastAPI checks each answer against its model and the
OpenAPI schema describes it. A run's and a round's answers carry every key their client sent
(the aggregator's own fields), so those two allow keys beyond the ones declared."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from fedssl_core import names

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# Version and round numbers live in Integer columns: 64-bit on SQLite, 32-bit on PostgreSQL.
# The smaller bound holds on both, and no registry will ever reach it.
DB_INT_MAX = 2**31 - 1
# Integers inside JSON documents (metrics, counts, lineage): what a signed 64-bit integer holds.
JSON_INT_MAX = 2**63 - 1
# Deepest nesting of objects and arrays in a JSON body: lineage and run config need 5 or 6.
MAX_JSON_DEPTH = 32

VersionNumber = Annotated[int, Field(ge=1, le=DB_INT_MAX)]
RoundNumber = Annotated[int, Field(ge=1, le=DB_INT_MAX)]
Count = Annotated[int, Field(ge=0, le=JSON_INT_MAX)]


def json_problem(value: Any, where: str = "") -> str | None:
    """What makes `value` (parsed JSON) unfit to store and send back, as "<path>: <reason>",
    or None: nesting deeper than MAX_JSON_DEPTH, NaN or Infinity (Python's json reads them,
    strict JSON has no such numbers), integers beyond 64 bits, strings with NUL (PostgreSQL
    text cannot hold it) or a lone UTF-16 surrogate (not UTF-8 encodable). Iterative, so
    the check itself cannot run out of stack."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, (where,) if where else ())]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            return f"{'.'.join(path[:4])}…: nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays"
        if isinstance(item, dict):
            for key, sub in item.items():
                problem = _string_problem(key) if isinstance(key, str) else None
                if problem:
                    return f"{'.'.join(path) or 'body'}: key {key!r} {problem}"
                stack.append((sub, (*path, str(key))))
        elif isinstance(item, list):
            stack.extend((sub, (*path, str(i))) for i, sub in enumerate(item))
        else:
            problem = None
            if isinstance(item, float) and not math.isfinite(item):
                problem = "must be a finite number (NaN and Infinity are not JSON)"
            elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > JSON_INT_MAX:
                problem = f"integer out of range: at most {JSON_INT_MAX} in magnitude"
            elif isinstance(item, str):
                problem = _string_problem(item)
            if problem:
                return f"{'.'.join(path) or 'body'}: {problem}"
    return None


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "must not contain NUL characters"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate (\\ud800-\\udfff), which is not a Unicode character"
    return None


class Body(BaseModel):
    """A JSON request body: unknown keys refused, every value storable (`json_problem`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="wrap")
    @classmethod
    def _storable_json(cls, data: Any, handler: Any) -> Any:
        model = handler(data)  # the fields' own constraints first: they name the tighter bound
        problem = json_problem(data)
        if problem:
            raise ValueError(problem)
        return model


class InputSpec(Body):
    image_size: int = Field(ge=16, le=1024)
    channels: Literal[3] = 3
    mean: list[float] = Field(default_factory=lambda: list(names.IMAGENET_MEAN), min_length=3, max_length=3)
    std: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: list(names.IMAGENET_STD), min_length=3, max_length=3)
    class_names: list[str] = Field(default_factory=list)
    # classification: none, or dihedral (the softmax averaged over the 8 flips and 90-degree turns
    # of each image; fedssl_core.models.tta_views), what the model was scored with at the hospitals
    test_time_augmentation: Literal["none", "dihedral"] = "none"
    # generation only, and required there: the length of the generator's latent vectors (the v2
    # `latent` input's width). image_size and class_names are then what the generator draws.
    z_dim: int | None = Field(None, ge=1, le=1024)

    @field_validator("class_names")
    @classmethod
    def _distinct_names(cls, v: list[str]) -> list[str]:
        if any(not c.strip() for c in v):
            raise ValueError("class names must be non-empty")
        seen: set[str] = set()
        for c in v:
            if c in seen:
                raise ValueError(f"class name {c!r} appears more than once; class names must be unique")
            seen.add(c)
        return v


class ModelCreate(Body):
    name: str
    description: str = ""
    task: Literal["embedding", "classification", "generation"]  # names.MODEL_TASKS
    # names.ARCHITECTURES, and names.ARCH_CGAN for a generation model (its default there: a
    # generator has one architecture, so a client need not name it)
    architecture: Literal["resnet18", "resnet50", "efficientnet_lite0", "cgan-sn"] = "resnet18"
    input_spec: InputSpec

    @model_validator(mode="after")
    def _generator_architecture(self) -> "ModelCreate":
        if self.task == names.TASK_GENERATION and "architecture" not in self.model_fields_set:
            self.architecture = names.ARCH_CGAN
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must match ^[a-z0-9][a-z0-9._-]{0,62}$ (lower-case letters, digits, . _ -)")
        return v


class VersionMetadata(Body):
    tags: dict[str, str] = Field(default_factory=dict)
    lineage: dict[str, Any] = Field(default_factory=dict)
    data_source: str = ""
    synthetic_data: bool = False


class AliasSet(Body):
    version: VersionNumber


class GenerateRequest(Body):
    """`POST /v1/models/{name}:generate`: `count` images of one class. The registry's
    `max_generate_count` setting bounds `count` (checked by the route, which names it)."""

    class_: StrictStr | StrictInt = Field(alias="class", description="a class name of the model's input_spec.class_names, "
                                                                      "or its index")
    count: int = Field(ge=1, le=DB_INT_MAX, description="images to draw, at most FEDSSL_REGISTRY_MAX_GENERATE_COUNT")
    seed: int = Field(0, ge=0, le=JSON_INT_MAX, description="the latents' seed: the same seed, class and count give "
                                                            "the same images")
    format: Literal["json", "zip"] = Field("json", description="json: PNGs in base64; zip: an application/zip of PNGs")


class RunUpsert(Body):
    model_config = ConfigDict(extra="allow")
    status: Literal["running", "succeeded", "failed"] = "running"
    phase: str | None = None
    planned_rounds: dict[str, Annotated[int, Field(ge=0, le=DB_INT_MAX)]] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    data_source: str = ""
    synthetic_data: bool = False
    warnings: list[str] = Field(default_factory=list)
    hospitals: dict[str, dict[str, Any]] = Field(default_factory=dict)
    class_names: list[str] = Field(default_factory=list)
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None


class RoundCreate(Body):
    model_config = ConfigDict(extra="allow")
    phase: Literal["ssl", "finetune", "generate"]  # names.PHASES and names.PHASE_GENERATE
    round: RoundNumber
    aggregated: dict[str, Any] = Field(default_factory=dict)
    hospitals: dict[str, dict[str, Any]] = Field(default_factory=dict)
    examples: dict[str, Count] = Field(default_factory=dict)
    duration_seconds: float | None = Field(None, ge=0)
    bytes_sent: Count | None = None
    bytes_received: Count | None = None


# ---------------------------------------------------------------------------- answers


class ModelResponse(BaseModel):
    name: str
    description: str
    task: str
    architecture: str
    input_spec: dict[str, Any]
    latest_version: int | None = Field(description="null until the first version is uploaded")
    versions: int = Field(description="how many versions the model has")
    aliases: dict[str, int] = Field(description="alias -> version")
    created_at: str


class ModelList(BaseModel):
    models: list[ModelResponse]


class VersionResponse(BaseModel):
    model: str
    version: int
    sha256: str
    size_bytes: int
    created_at: str
    tags: dict[str, str]
    lineage: dict[str, Any] = Field(description="run, round, phase, hospitals, metrics, recipe: what made this version")
    aliases: list[str]
    data_source: str
    synthetic_data: bool


class VersionList(BaseModel):
    versions: list[VersionResponse]


class PredictResponse(BaseModel):
    """A classifier's answer (label, probabilities; hospital when one was named) or an
    encoder's (embedding): only the keys of the model's task are present."""

    model: str
    version: int
    label: str | None = None
    probabilities: dict[str, float] | None = None
    hospital: str | None = Field(None, description="the hospital the image was served as (?hospital=)")
    embedding: list[float] | None = None


class RunResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    run_id: str
    status: str
    rounds_done: dict[str, int] = Field(description="phase -> the highest round posted")
    rounds_total: int
    created_at: str
    updated_at: str


class RunList(BaseModel):
    runs: list[RunResponse]


class RoundResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    phase: str
    round: int
    aggregated: dict[str, Any]
    hospitals: dict[str, dict[str, Any]]


class PostedRound(RoundResponse):
    run_id: str


class RoundList(BaseModel):
    run_id: str
    rounds: list[RoundResponse]

"""Service settings: environment variables with the FEDSSL_REGISTRY_ prefix.

Unsafe defaults are refused outside development: without a token the service does not start
unless FEDSSL_REGISTRY_DEV_MODE=true says this is a developer's machine.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from fedssl_core.tokens import read_token_file


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDSSL_REGISTRY_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 in containers.")
    port: int = Field(8080, description="HTTP port.")
    data_dir: Path = Field(Path(".fedssl/registry"), description="SQLite file and weight artifacts live here.")
    database_url: str = Field("", description="SQLAlchemy URL; default sqlite:///<data_dir>/registry.db. PostgreSQL works too.")
    token: str = Field("", description="Bearer token required for every write (and reads when read_auth).")
    token_file: Path | None = Field(None, description="A file holding the token (a mounted Kubernetes Secret), "
                                                      "instead of FEDSSL_REGISTRY_TOKEN: files stay out of the "
                                                      "environment, which child processes and crash dumps see.")
    ssl_certfile: Path | None = Field(None, description="Serve HTTPS with this PEM certificate (chain); needs ssl_keyfile.")
    ssl_keyfile: Path | None = Field(None, description="The PEM private key of ssl_certfile.")
    dev_mode: bool = Field(False, description="Allow starting without a token: a developer's machine only.")
    read_auth: bool = Field(False, description="Require the token for reads too (dashboard, GETs, inference).")
    log_json: bool = Field(False, description="One JSON object per log line (for kubectl logs and log stacks).")
    log_level: str = Field("INFO", description="Python logging level.")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS; none by default.")
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Largest request body (weights uploads), bytes.")
    max_image_bytes: int = Field(10 * 1024 * 1024, description="Largest image upload for :predict, bytes.")
    max_image_pixels: int = Field(40_000_000, description="Largest image :predict decodes, pixels (decompression-bomb guard). "
                                                          "A PNG is decoded at full size, so it is also held to "
                                                          "fedssl_core.preprocessing.MAX_PNG_PIXELS (16 MP).")
    decode_workers: int = Field(2, description="Images (:predict uploads) and large v2 request bodies decoded at once, "
                                               "each on its own thread off the event loop; more wait their turn. Bounds "
                                               "decoding memory: up to ~130 MB for one 16 MP PNG.")
    max_batch_size: int = Field(32, description="Dynamic batching: most images in one forward pass; a request with more "
                                                "is split into turns that alternate with other requests.")
    max_infer_batch: int = Field(64, description="Most images in one /v2 infer request (its N); larger ones are refused "
                                                 "with 413. Published as parameters.max_batch_size in the v2 model metadata.")
    max_generate_count: int = Field(64, description="Most images one request to a generation model draws (:generate's "
                                                    "count, the N of a /v2 infer); more are refused with 413. Published as "
                                                    "parameters.max_batch_size in a generator's v2 model metadata. A request "
                                                    "is one turn of the torch thread (64 images of the default generator: "
                                                    "~0.15 s at 32 px, ~0.65 s at 64 px on one core).")
    max_batch_wait_ms: float = Field(5.0, description="Dynamic batching: longest wait for a batch to fill, ms.")
    model_cache_size: int = Field(4, description="On-demand model versions kept loaded (least recently used evicted): "
                                                 "versions asked for by number that no alias points at and that are not the "
                                                 "default. Alias targets and each model's default (production, else latest) "
                                                 "are pinned: kept loaded besides these.")
    model_loads_per_minute: int = Field(6, description="On-demand loads per model in any 60 s (0: no limit). A request for a "
                                                       "version that is not loaded, past this, is answered 429 with Retry-After; "
                                                       "pinned versions are never refused. A load takes the torch thread ~1 s.")
    threads: int = Field(0, description="Torch threads for inference; 0 = the CPUs this process may use.")

    @field_validator("database_url")
    @classmethod
    def _sqlalchemy_url(cls, value: str) -> str:
        if value:
            try:
                make_url(value)
            except ArgumentError:
                raise ValueError("FEDSSL_REGISTRY_DATABASE_URL is not a database URL; expected e.g. "
                                 "postgresql+psycopg://user:password@host:5432/fedssl (empty: SQLite in the data directory)") from None
        return value

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> "Settings":
        if self.token_file is not None:
            if self.token:
                raise ValueError("set FEDSSL_REGISTRY_TOKEN or FEDSSL_REGISTRY_TOKEN_FILE, not both")
            self.token = read_token_file(self.token_file, "FEDSSL_REGISTRY_TOKEN_FILE")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("FEDSSL_REGISTRY_SSL_CERTFILE and FEDSSL_REGISTRY_SSL_KEYFILE go together: set both for HTTPS, or neither")
        for what, path in (("SSL_CERTFILE", self.ssl_certfile), ("SSL_KEYFILE", self.ssl_keyfile)):
            if path is not None and not path.is_file():
                raise ValueError(f"FEDSSL_REGISTRY_{what} {path} is not a file")
        if not self.token and not self.dev_mode:
            raise ValueError(
                "FEDSSL_REGISTRY_TOKEN is not set: the registry refuses to start without a write token "
                "(set FEDSSL_REGISTRY_DEV_MODE=true only on a developer's machine)"
            )
        if self.max_batch_size < 1:
            raise ValueError("FEDSSL_REGISTRY_MAX_BATCH_SIZE must be >= 1")
        if self.decode_workers < 1:
            raise ValueError("FEDSSL_REGISTRY_DECODE_WORKERS must be >= 1")
        if self.model_cache_size < 1:
            raise ValueError("FEDSSL_REGISTRY_MODEL_CACHE_SIZE must be >= 1")
        if self.model_loads_per_minute < 0:
            raise ValueError("FEDSSL_REGISTRY_MODEL_LOADS_PER_MINUTE must be >= 0 (0: no limit)")
        if self.max_infer_batch < 1:
            raise ValueError("FEDSSL_REGISTRY_MAX_INFER_BATCH must be >= 1")
        if self.max_generate_count < 1:
            raise ValueError("FEDSSL_REGISTRY_MAX_GENERATE_COUNT must be >= 1")
        return self

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'registry.db'}"

    @property
    def artifact_dir(self) -> Path:
        return self.data_dir / "artifacts"

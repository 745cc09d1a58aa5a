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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDSSL_REGISTRY_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 in containers.")
    port: int = Field(8080, description="HTTP port.")
    data_dir: Path = Field(Path(".fedssl/registry"), description="SQLite file and weight artifacts live here.")
    database_url: str = Field("", description="SQLAlchemy URL; default sqlite:///<data_dir>/registry.db. PostgreSQL works too.")
    token: str = Field("", description="Bearer token required for every write (and reads when read_auth).")
    dev_mode: bool = Field(False, description="Allow starting without a token: a developer's machine only.")
    read_auth: bool = Field(False, description="Require the token for reads too (dashboard, GETs, inference).")
    log_json: bool = Field(False, description="One JSON object per log line (for kubectl logs and log stacks).")
    log_level: str = Field("INFO", description="Python logging level.")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS; none by default.")
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Largest request body (weights uploads), bytes.")
    max_image_bytes: int = Field(10 * 1024 * 1024, description="Largest image upload for :predict, bytes.")
    max_image_pixels: int = Field(40_000_000, description="Largest decoded image, pixels (decompression-bomb guard).")
    max_batch_size: int = Field(32, description="Dynamic batching: most requests in one forward pass.")
    max_batch_wait_ms: float = Field(5.0, description="Dynamic batching: longest wait for a batch to fill, ms.")
    model_cache_size: int = Field(4, description="Loaded model versions kept in memory (LRU).")
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
        if not self.token and not self.dev_mode:
            raise ValueError(
                "FEDSSL_REGISTRY_TOKEN is not set: the registry refuses to start without a write token "
                "(set FEDSSL_REGISTRY_DEV_MODE=true only on a developer's machine)"
            )
        if self.max_batch_size < 1:
            raise ValueError("FEDSSL_REGISTRY_MAX_BATCH_SIZE must be >= 1")
        return self

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'registry.db'}"

    @property
    def artifact_dir(self) -> Path:
        return self.data_dir / "artifacts"

"""Dependencies shared by the routes: the registry, the model repository, auth.

All are `async def`: they never block, and FastAPI would run a plain `def` dependency in
its thread pool, one thread hop per dependency per request."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from ..core.config import Settings
from ..core.errors import Unauthorized
from ..inference.repository import ModelRepository
from ..service import Registry


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


async def get_repository(request: Request) -> ModelRepository:
    return request.app.state.repository


def check_token(authorization: str, settings: Settings) -> None:
    """`authorization` is the request's Authorization header ("" when absent)."""
    if not settings.token:  # development mode without a token
        return
    scheme, _, supplied = authorization.partition(" ")
    if scheme.lower() != "bearer" or not supplied:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(supplied.encode(), settings.token.encode()):
        raise Unauthorized("invalid bearer token")


async def require_write(request: Request) -> None:
    """Every write needs the token."""
    check_token(request.headers.get("authorization", ""), request.app.state.settings)


async def require_read(request: Request) -> None:
    """Reads need the token only when FEDSSL_REGISTRY_READ_AUTH=true."""
    settings = request.app.state.settings
    if settings.read_auth:
        check_token(request.headers.get("authorization", ""), settings)


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]
ReadAuth = Depends(require_read)
WriteAuth = Depends(require_write)

"""Errors named for the condition, each with its HTTP status, mapped to JSON in one place."""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger("fedssl.registry")


class RegistryError(Exception):
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(RegistryError):
    """400: the request is well-formed HTTP but its content is wrong."""


class Unauthorized(RegistryError):
    """401: no or wrong bearer token."""

    status = 401


class ModelNotFound(RegistryError):
    """404: unknown model, version, alias or run."""

    status = 404


class Conflict(RegistryError):
    """409: the change contradicts the current state (name taken, alias points at a version)."""

    status = 409


class PayloadTooLarge(RegistryError):
    """413: body or image above the configured limit."""

    status = 413


class UnsupportedMediaType(RegistryError):
    """415: wrong content type for the endpoint."""

    status = 415


class ModelNotReady(RegistryError):
    """503: the model cannot be loaded right now."""

    status = 503


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def body_too_large(limit: int, declared: int | None = None) -> HTTPException:
    """413 for a request body over `limit` bytes (`declared`: its Content-Length, if it had one).

    An HTTPException because it is raised while an endpoint reads the body, and FastAPI turns
    any other exception raised there into a 400."""
    size = f" of {declared} bytes" if declared is not None else ""
    return HTTPException(413, f"request body{size} exceeds the limit of {limit} bytes")


def install(app: FastAPI) -> None:
    @app.exception_handler(RegistryError)
    async def _registry(_: Request, exc: RegistryError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
        return error_response(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such endpoint"
        return error_response(exc.status_code, detail, exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> JSONResponse:
        # Nobody is left to read an answer; the status is for the access log and metrics
        # (499, nginx's "client closed request"), and nothing failed on this side.
        log.info("client disconnected before the request was complete: %s %s", request.method, request.url.path)
        return error_response(499, "client disconnected before the request was complete")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; see the service log")

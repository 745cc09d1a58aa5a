"""Errors named for the condition, each with its HTTP status, mapped to JSON in one place."""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..schemas import MAX_JSON_DEPTH

log = logging.getLogger("fedssl.registry")


class RegistryError(Exception):
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str] | None:
        """Extra response headers of this error."""
        return None


class InvalidInput(RegistryError):
    """400: the request is well-formed HTTP but its content is wrong."""


class WrongTask(InvalidInput):
    """400: the model's task is not one this route or input serves (an image to a generator,
    `:generate` to a classifier); the message names the call that serves it."""


class Unauthorized(RegistryError):
    """401: no or wrong bearer token."""

    status = 401

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


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


class TooManyLoads(RegistryError):
    """429: serving this request would load one more model version than the model's rate of
    on-demand loads allows; `Retry-After` says when one is allowed again."""

    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ModelNotReady(RegistryError):
    """503: the model cannot be loaded right now."""

    status = 503


class ErrorBody(BaseModel):
    """Every error answer: `{"error": "<what was wrong and what was expected>"}`."""

    error: str


ERROR_SCHEMA = ErrorBody.model_json_schema()
ERROR_DESCRIPTIONS = {
    400: "Bad input: a malformed name, body, image, weights file or (on /v2) tensor, version or JSON; "
         "or a model whose task the route does not serve",
    401: "Missing or wrong bearer token",
    404: "Unknown model, version, alias or run",
    409: "Conflicts with the current state (name taken, version held by an alias)",
    413: "Body or image above the configured limit",
    415: "Wrong content type for the endpoint",
    422: "A /v1 body, path or query value fails validation; the message names the field",
    429: "The version asked for is not loaded and the model's on-demand loads are at their limit; see Retry-After",
    503: "The model cannot be loaded",
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """`responses=` for a route: the error statuses it may answer, each with `ErrorBody`, so the
    OpenAPI schema lists what the route really returns (FastAPI's default 422 body, a list of
    `detail`s, is not what `install` sends). Always JSON, also on routes whose success is not."""
    return {status: {"description": ERROR_DESCRIPTIONS[status], "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            for status in statuses}


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
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
        return error_response(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's 400 for a JSON body its parser could not nest into
            return error_response(422, "invalid request: body: JSON nests too deeply to parse; "
                                       f"at most {MAX_JSON_DEPTH} levels of objects and arrays are accepted")
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

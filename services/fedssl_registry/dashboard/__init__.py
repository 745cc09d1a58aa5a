"""Web dashboard (issue 5): one HTML shell and a small vanilla-JS front end, served by the
registry itself (no CDN, no build step).

The shell and the static files carry no registry data, so they are served without a token;
every piece of data is read by the browser from the /v1 JSON API with the bearer token the
user typed (kept in sessionStorage). Read auth therefore follows FEDSSL_REGISTRY_READ_AUTH
exactly as for any other client, and the dashboard performs no writes at all.

Every response here carries a strict Content-Security-Policy: scripts, styles and fetches
from this origin only, no inline scripts or styles, no framing.
"""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from .. import __version__
from ..core.errors import ModelNotFound

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
SHELL = HERE / "templates" / "index.html"
PREFIX = "/dashboard"

# blob: images are the previews of files the user picks on the "Try it" page.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "font-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon"}
# The only files ever served: a fixed allow-list built at import, so no request path can
# reach anything else on disk.
STATIC_FILES = {p.name: p for p in sorted(STATIC_DIR.iterdir()) if p.suffix in CONTENT_TYPES} if STATIC_DIR.is_dir() else {}

router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse(f"{PREFIX}/", status_code=307)


@router.get(f"{PREFIX}/static/{{name}}")
def static(name: str) -> Response:
    path = STATIC_FILES.get(name)
    if path is None:
        raise ModelNotFound(f"no dashboard file {name!r}")
    return Response(path.read_bytes(), media_type=CONTENT_TYPES[path.suffix], headers=SECURITY_HEADERS)


@router.get(PREFIX)
@router.get(f"{PREFIX}/{{page:path}}")
def shell(request: Request, page: str = "") -> Response:
    """The HTML shell of every dashboard page; the front end routes on the URL path."""
    if page.startswith("static/"):  # e.g. an encoded "../": never a page, never a file
        raise ModelNotFound(f"no dashboard file {page.removeprefix('static/')!r}")
    settings = request.app.state.settings
    body = SHELL.read_text(encoding="utf-8")
    for key, value in {"version": __version__, "read_auth": "true" if settings.read_auth else "false",
                       "open_writes": "false" if settings.token else "true"}.items():
        body = body.replace("{{" + key + "}}", html.escape(value, quote=True))
    return Response(body, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

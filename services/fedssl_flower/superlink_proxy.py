"""`fedssl-superlink-proxy`: nginx in front of the SuperLink, one listener per audience.

Flower 1.41's SuperLink serves its Fleet API (SuperNodes), Control API (`flwr run`, `flwr ls`,
`flwr supernode register`: whoever reaches it runs code in the SuperLink pod and in every
hospital) and Runtime API (its own ServerApp processes) on one HTTP port, and the open-source
Control API has no authentication. So the SuperLink listens on 127.0.0.1 only, and this
command renders an nginx configuration and execs nginx with two listeners:

  fleet    (hospitals)  POST /v1/fleet/<method> and GET /health; everything else is 403
  control  (run Job,    POST /v1/control/<method> with `Authorization: Bearer <token>` (the
           operators)   token read from a file, e.g. a mounted Secret) and GET /health;
                        a missing or wrong token is 403, anything else 404

The Runtime API (/v1/runtime) is on neither: only processes inside the pod reach it.

The request target must be a plain path (`/segment/segment...` of `[a-z0-9-]`: no query, no
percent-encoding, no dots, no empty segment) on both listeners, so nginx's normalised path, which picks the location, and the raw path
it forwards, which the SuperLink routes on, cannot differ.

TLS: with `--ssl-certfile`/`--ssl-keyfile` both listeners serve HTTPS and nginx talks HTTPS to
the SuperLink too (it must stay TLS: Flower refuses SuperNode authentication without it),
verifying its certificate with `--ssl-ca-certfile` for `--upstream-server-name`. SuperNode
authentication itself (signed headers) passes through untouched.

Refusals carry a JSON body `{"detail": "..."}`, which the flwr CLI prints as its error.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

from fedssl_core import tokens
from fedssl_core.errors import ConfigError

FLEET_PREFIX = "/v1/fleet/"
CONTROL_PREFIX = "/v1/control/"
HEALTH_PATH = "/health"
# Characters a token may have: it is written into nginx's configuration.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~+/=-]{32,512}")
MIN_TOKEN_CHARS = 32

FLEET_REFUSAL = ("This is the SuperLink's Fleet API listener (SuperNodes only). The Control API "
                 "(flwr run, flwr ls, flwr supernode register) is not served here; operators use "
                 "the control listener with the control token.")
CONTROL_REFUSAL = ("The SuperLink's Control API needs the control token (Authorization: Bearer). "
                   "fedssl-submit --control-token-file, or write_cli_config(..., control_token=...), "
                   "makes the flwr CLI send it.")
CONTROL_NOT_FOUND = "The control listener serves only /v1/control/ and /health."
BAD_TARGET = "Request target refused: only plain paths (/[a-z0-9-]+ segments) are forwarded to the SuperLink."


class ProxyConfigError(ValueError):
    """The proxy cannot start with these settings (message says what to change)."""


def read_token(path: Path) -> str:
    try:
        token = tokens.read_token_file(path, "the control token file")
    except ConfigError as exc:
        raise ProxyConfigError(str(exc)) from None
    if not TOKEN_PATTERN.fullmatch(token):
        raise ProxyConfigError(f"the control token in {path} must be {MIN_TOKEN_CHARS} to 512 characters "
                               "of A-Z a-z 0-9 . _ ~ + / = - (e.g. `openssl rand -hex 32`)")
    return token


def _json(text: str) -> str:
    """An nginx `return` body: a JSON object, quoted for nginx."""
    body = '{"detail": "%s"}' % text.replace("\\", "\\\\").replace('"', '\\"')
    return "'" + body.replace("'", "\\'") + "'"


def render(*, upstream: str, fleet_listen: str, control_listen: str, token: str, state_dir: Path,
           certfile: str | None = None, keyfile: str | None = None, cafile: str | None = None,
           upstream_server_name: str | None = None) -> str:
    """The nginx configuration (a string). `upstream` is the SuperLink's `host:port`; the
    listen addresses are nginx `listen` values (`9092`, `0.0.0.0:9092`, `127.0.0.1:0`...)."""
    if not TOKEN_PATTERN.fullmatch(token):
        raise ProxyConfigError("the control token has characters nginx cannot be given safely")
    tls = bool(certfile or keyfile)
    if tls and not (certfile and keyfile and cafile):
        raise ProxyConfigError("TLS needs --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile (the CA verifies "
                               "the SuperLink behind the proxy)")
    scheme = "https" if tls else "http"
    ssl = " ssl" if tls else ""
    server_tls = ""
    upstream_tls = ""
    if tls:
        server_tls = f"""
    ssl_certificate {certfile};
    ssl_certificate_key {keyfile};
    ssl_protocols TLSv1.2 TLSv1.3;"""
        upstream_tls = f"""
    # The SuperLink's own TLS (needed for SuperNode authentication), verified.
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate {cafile};
    proxy_ssl_name {upstream_server_name or upstream.rsplit(':', 1)[0]};
    proxy_ssl_server_name on;
    proxy_ssl_session_reuse on;"""
    temp = {name: state_dir / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    forward = f"""proxy_pass {scheme}://superlink;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Connection "";"""
    return f"""# Rendered by fedssl-superlink-proxy (fedssl_flower/superlink_proxy.py); do not edit.
worker_processes 1;
pid {state_dir / 'nginx.pid'};
events {{ worker_connections 1024; }}

http {{
    server_tokens off;
    default_type application/json;
    # The Authorization header is never logged.
    log_format fedssl '$remote_addr [$time_local] $server_port "$request_method $uri" $status $body_bytes_sent $request_time';
    access_log /dev/stdout fedssl;
    client_body_temp_path {temp['client_body']};
    proxy_temp_path {temp['proxy']};
    fastcgi_temp_path {temp['fastcgi']};
    uwsgi_temp_path {temp['uwsgi']};
    scgi_temp_path {temp['scgi']};

    # FABs and model replies (tens of MB) stream through; Flower bounds its messages itself.
    client_max_body_size 0;
    proxy_request_buffering off;
    # `flwr log --stream` / run events are long-lived streaming responses.
    proxy_buffering off;
    proxy_read_timeout 1h;
    proxy_send_timeout 1h;
    proxy_intercept_errors off;{upstream_tls}

    upstream superlink {{
        server {upstream};
        keepalive 16;
    }}

    # Hospitals: the Fleet API only.
    server {{
        listen {fleet_listen}{ssl};{server_tls}
        if ($request_uri !~ "^(/[a-z0-9-]+)+$") {{ return 400 {_json(BAD_TARGET)}; }}
        location {FLEET_PREFIX} {{
            {forward}
        }}
        location = {HEALTH_PATH} {{
            {forward}
        }}
        location / {{ return 403 {_json(FLEET_REFUSAL)}; }}
    }}

    # The run Job and operators: the Control API, with the control token.
    server {{
        listen {control_listen}{ssl};{server_tls}
        if ($request_uri !~ "^(/[a-z0-9-]+)+$") {{ return 400 {_json(BAD_TARGET)}; }}
        location {CONTROL_PREFIX} {{
            if ($http_authorization != "Bearer {token}") {{ return 403 {_json(CONTROL_REFUSAL)}; }}
            # The SuperLink's own (no-op) account authentication never sees the token.
            proxy_set_header Authorization "";
            {forward}
        }}
        location = {HEALTH_PATH} {{
            {forward}
        }}
        location / {{ return 404 {_json(CONTROL_NOT_FOUND)}; }}
    }}
}}
"""


def _listen(value: str) -> str:
    return value if ":" in value else f"0.0.0.0:{value}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedssl-superlink-proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", default="127.0.0.1:9091",
                    help="the SuperLink's host:port (it listens on loopback; default 127.0.0.1:9091)")
    ap.add_argument("--fleet-listen", default="9092", help="Fleet listener: port or address:port (default 9092)")
    ap.add_argument("--control-listen", default="9093",
                    help="Control listener: port or address:port (default 9093)")
    ap.add_argument("--control-token-file", type=Path, required=True,
                    help="file holding the control bearer token (a mounted Secret)")
    ap.add_argument("--ssl-certfile", help="TLS certificate of both listeners")
    ap.add_argument("--ssl-keyfile", help="its key")
    ap.add_argument("--ssl-ca-certfile", help="CA that signed the SuperLink's certificate")
    ap.add_argument("--upstream-server-name",
                    help="name the SuperLink's certificate is checked for (default: the upstream host)")
    ap.add_argument("--state-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "fedssl-proxy",
                    help="writable directory for the rendered configuration and nginx's files")
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx", help="the nginx binary")
    ap.add_argument("--print-config", action="store_true", help="print the configuration and exit")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        config = render(upstream=args.upstream, fleet_listen=_listen(args.fleet_listen),
                        control_listen=_listen(args.control_listen), token=read_token(args.control_token_file),
                        state_dir=args.state_dir, certfile=args.ssl_certfile, keyfile=args.ssl_keyfile,
                        cafile=args.ssl_ca_certfile, upstream_server_name=args.upstream_server_name)
    except ProxyConfigError as exc:
        raise SystemExit(f"fedssl-superlink-proxy: {exc}") from None
    if args.print_config:
        sys.stdout.write(config.replace(read_token(args.control_token_file), "<control token>"))
        return
    if not Path(args.nginx).exists():
        raise SystemExit(f"fedssl-superlink-proxy: no nginx at {args.nginx} (the superlink image has it; "
                         "elsewhere: apt-get install nginx-light)")
    args.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = args.state_dir / "nginx.conf"
    # The file holds the token: readable by this user only, replaced whole.
    tmp = args.state_dir / f".nginx.conf.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(config)
    os.replace(tmp, path)
    # -e: nginx opens its compile-time error log before reading the configuration; the root
    # filesystem is read-only, so errors go to stderr from the start.
    os.execv(args.nginx, [args.nginx, "-e", "stderr", "-p", str(args.state_dir), "-c", str(path),
                          "-g", "daemon off; error_log stderr notice;"])


if __name__ == "__main__":
    main()

"""`fedssl-submit`: submit a fedssl run to a SuperLink with the `flwr` CLI and follow it.

Prints the aggregator's progress lines while the run goes, and exits 0 only when Flower
reports the run `finished:completed`. `flwr run --stream` exits 0 even when a run fails,
so the final status comes from `flwr ls --run-id ID --format json`; on failure the
ServerApp's error is printed and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedssl_core import tokens
from fedssl_core.errors import ConfigError

CONNECTION = "fedssl"
PROGRESS_MARK = "[fedssl]"


def _flwr() -> str:
    exe = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    if not Path(exe).exists():
        raise SystemExit("fedssl-submit: the `flwr` CLI is not installed (pip install 'fedssl[flower]')")
    return exe


def write_cli_config(home: Path, superlink: str, root_certificates: str | None,
                     control_token: str | None = None) -> None:
    """The flwr CLI reads SuperLink connections from $FLWR_HOME/config.toml.

    `control_token`: the bearer token of the SuperLink's control listener
    (fedssl_flower.superlink_proxy). The flwr CLI sends `Authorization: Bearer <access token>`
    when its credential store ($FLWR_HOME/credentials.yaml) holds OIDC tokens for the
    connection's address, so the token is stored there as one (the CLI refreshes only on a 401
    that asks for it, which the proxy never sends).
    """
    home.mkdir(parents=True, exist_ok=True)
    if control_token:
        write_control_token(home, superlink, control_token)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{superlink}"']
    if root_certificates:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    else:
        lines.append("insecure = true")
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def write_control_token(home: Path, superlink: str, token: str) -> None:
    from flwr.cli.constant import ACCESS_TOKEN_STORE_KEY, AUTHN_TYPE_STORE_KEY, REFRESH_TOKEN_STORE_KEY
    from flwr.common.constant import AuthnType
    from flwr.supercore.credential_store.file_credential_store import FileCredentialStore

    store = FileCredentialStore(home / "credentials.yaml")
    store.set(AUTHN_TYPE_STORE_KEY % superlink, AuthnType.OIDC.encode())
    store.set(ACCESS_TOKEN_STORE_KEY % superlink, token.encode())
    # Never sent (the CLI only uses it to refresh); it must exist for the CLI to send the token.
    store.set(REFRESH_TOKEN_STORE_KEY % superlink, b"unused")
    (home / "credentials.yaml").chmod(0o600)


def read_token_file(path: str | None) -> str | None:
    """The control token in `path` (None without one); exits naming the file when it is unusable."""
    if not path:
        return None
    try:
        return tokens.read_token_file(path, "the control token file")
    except ConfigError as exc:
        raise SystemExit(f"fedssl-submit: {exc}") from None


def _run(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _json_out(proc: subprocess.CompletedProcess) -> dict:
    text = proc.stdout.strip()
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except ValueError:
        return {}


class Unreachable(Exception):
    """`flwr ls` got no answer from the SuperLink."""


def run_status(flwr: str, run_id: str, env: dict) -> str:
    """The run's status as the SuperLink reports it; `Unreachable` when it does not answer."""
    try:
        proc = _run([flwr, "ls", CONNECTION, "--run-id", run_id, "--format", "json"], env, timeout=60)
    except subprocess.TimeoutExpired:
        raise Unreachable("`flwr ls` got no answer within 60 s") from None
    out = _json_out(proc)
    if proc.returncode != 0 or not out.get("success", True):
        lines = [ln for ln in (out.get("error-message") or proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise Unreachable(lines[-1].strip() if lines else f"`flwr ls` exited {proc.returncode}")
    runs = out.get("runs") or []
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


def follow(flwr: str, run_id: str, env: dict, stop: threading.Event, ended: threading.Event,
           final: list[str] | None = None) -> None:
    """Print the aggregator's progress lines from the run's log stream until `stop`; set
    `ended` when the aggregator says the run is over (its line appended to `final`) or the
    stream ends."""
    proc = subprocess.Popen([flwr, "log", run_id, CONNECTION, "--stream"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if PROGRESS_MARK in line:
                print(line[line.index(PROGRESS_MARK):].rstrip(), flush=True)
                if _FINAL_LINE.search(line):
                    if final is not None:
                        final.append(line[line.index(PROGRESS_MARK):].rstrip())
                    ended.set()
            if stop.is_set():
                break
    finally:
        ended.set()
        proc.kill()


_FINAL_LINE = re.compile(r"\brun \S+ (succeeded|FAILED)\b")  # the aggregator's last progress line
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_KEY = re.compile(r"^[a-z][a-z0-9-]*$")


def run_config_override(kv: str) -> str:
    """`key=value` → the TOML `flwr run --run-config` expects: bare words become strings
    (`arch=resnet50` → `arch="resnet50"`); numbers, booleans and quoted values pass as they are."""
    key, sep, value = kv.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not _KEY.match(key):
        raise ValueError(f"run config override {kv!r} is not key=value with a kebab-case key (e.g. ssl-rounds=3)")
    if value[:1] in "\"'" or value in ("true", "false") or _NUMBER.match(value):
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedssl-submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--superlink", default=os.environ.get("FEDSSL_SUPERLINK", ""), help="SuperLink HOST:PORT (env FEDSSL_SUPERLINK)")
    p.add_argument("--root-certificates", default=os.environ.get("FEDSSL_SUPERLINK_CA"), help="CA certificate (PEM) for TLS; omit for an insecure SuperLink")
    p.add_argument("--control-token-file", default=os.environ.get("FEDSSL_CONTROL_TOKEN_FILE") or None,
                   help="file with the bearer token of the SuperLink's control listener (env FEDSSL_CONTROL_TOKEN_FILE)")
    p.add_argument("--app", default=os.environ.get("FEDSSL_APP_DIR", str(Path(__file__).resolve().parents[2])), help="Flower App directory (holds pyproject.toml)")
    p.add_argument("--run-config", "-c", action="append", default=[], help="run config override key=value (repeatable)")
    p.add_argument("--flwr-home", default=None, help="directory for the flwr CLI's config (default: a temporary one)")
    p.add_argument("--poll-seconds", type=float, default=30.0,
                   help="how often to ask the SuperLink for the run's status while its log stream is alive "
                        "(each ask starts a `flwr ls` process; the stream's end triggers an immediate check)")
    p.add_argument("--timeout", type=float, default=0, help="give up after this many seconds (0 = never)")
    p.add_argument("--superlink-grace", type=float, default=120.0,
                   help="exit 1 when the SuperLink has not answered for this many seconds")
    args = p.parse_args(argv)
    if not args.superlink:
        p.error("--superlink HOST:PORT is required (or set FEDSSL_SUPERLINK)")
    if not (Path(args.app) / "pyproject.toml").is_file():
        p.error(f"--app {args.app} has no pyproject.toml; point it at the fedssl project directory")

    flwr = _flwr()
    home = Path(args.flwr_home) if args.flwr_home else Path(tempfile.mkdtemp(prefix="fedssl-flwr-"))
    write_cli_config(home, args.superlink, args.root_certificates, read_token_file(args.control_token_file))
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

    cmd = [flwr, "run", args.app, CONNECTION, "--format", "json"]
    try:
        overrides = [run_config_override(kv) for kv in args.run_config]
    except ValueError as exc:
        p.error(str(exc))
    for kv in overrides:
        cmd += ["--run-config", kv]
    submitted = _run(cmd, env)
    out = _json_out(submitted)
    if not out.get("success"):
        msg = out.get("error-message") or (submitted.stderr or submitted.stdout).strip()
        print(f"fedssl-submit: submitting the run to {args.superlink} failed: {msg}", file=sys.stderr)
        return 1
    run_id = str(out["run-id"])
    print(f"[fedssl] submitted run {run_id} to SuperLink {args.superlink}", flush=True)

    stop, ended = threading.Event(), threading.Event()
    final: list[str] = []  # the aggregator's last line, once the stream brought it
    follower = threading.Thread(target=follow, args=(flwr, run_id, env, stop, ended, final), daemon=True)
    follower.start()
    started = time.monotonic()
    status = "unknown"
    ended_at = lost_since = None
    while True:
        try:
            status = run_status(flwr, run_id, env)
            lost_since = None
        except Unreachable as exc:
            lost_since = lost_since or time.monotonic()
            if final and "FAILED" in final[-1]:  # the aggregator said why before the SuperLink went away
                print(f"fedssl-submit: run {run_id} failed and the SuperLink at {args.superlink} stopped answering "
                      f"({exc})", file=sys.stderr)
                return 1
            if time.monotonic() - lost_since >= args.superlink_grace:
                print(f"fedssl-submit: lost the SuperLink at {args.superlink}: no answer for {args.superlink_grace:.0f}s "
                      f"(last: {exc}); run {run_id}'s fate is unknown here. If the aggregator was stopped it recorded "
                      "that in the registry; resubmit with -c resume-from-registry=true to continue after the newest "
                      "registered round", file=sys.stderr)
                return 1
            time.sleep(min(5.0, args.poll_seconds))
            continue
        if status.startswith("finished"):
            break
        if args.timeout and time.monotonic() - started > args.timeout:
            print(f"fedssl-submit: run {run_id} still '{status}' after {args.timeout:.0f}s; giving up (the run goes on)", file=sys.stderr)
            return 2
        # Polling spawns a process that competes with training for the CPU: ask rarely while
        # the run streams logs, every second for a while once it says it is over.
        if ended.is_set():
            ended_at = ended_at or time.monotonic()
            time.sleep(1.0 if time.monotonic() - ended_at < 120 else args.poll_seconds)
        else:
            ended.wait(args.poll_seconds)
    time.sleep(1.0)  # let the log stream flush the last lines
    stop.set()

    if status == "finished:completed":
        print(f"[fedssl] run {run_id} finished: completed", flush=True)
        return 0
    try:
        logs = _run([flwr, "log", run_id, CONNECTION, "--show"], env, timeout=60).stdout
    except subprocess.TimeoutExpired:
        logs = ""
    failure = [ln[ln.index(PROGRESS_MARK):] for ln in logs.splitlines() if PROGRESS_MARK in ln and "FAILED" in ln]
    tail = [ln for ln in logs.splitlines() if ln.strip()][-15:]
    print(f"fedssl-submit: run {run_id} ended with status {status}", file=sys.stderr)
    print("\n".join(failure or tail), file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())

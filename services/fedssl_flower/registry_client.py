"""HTTP client of the model registry, as the aggregator uses it (docs/architecture.md §2).

Transient failures (connection errors, 5xx) are retried with backoff; after that a
`RegistryUnavailable` fails the run: a round is never dropped silently.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
from collections.abc import Mapping
from typing import Any

import httpx

from fedssl_core import names
from fedssl_core.tokens import read_token_file

from .errors import FedSSLError

log = logging.getLogger("fedssl.registry_client")


class RegistryUnavailable(FedSSLError, RuntimeError):
    """The registry did not accept a write after retries."""


class RegistryConflict(FedSSLError, RuntimeError):
    """The registry already holds a model of that name that reads images differently."""


class RegistryClient:
    def __init__(self, url: str, token: str = "", *, retries: int = 5, backoff: float = 1.0, timeout: float = 120.0,
                 ca_file: str | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, verify=verify)
        self.retries, self.backoff = retries, backoff
        self._ensured: set[tuple[str, str]] = set()  # (name, body) already created or checked by this client

    @classmethod
    def from_environment(cls, url: str, environ: Mapping[str, str] = os.environ, **kwargs: Any) -> RegistryClient:
        """A client of `url` with the write token from the file `FEDSSL_REGISTRY_TOKEN_FILE` (a
        mounted Secret) or else `FEDSSL_REGISTRY_TOKEN`, trusting `FEDSSL_REGISTRY_CA` for HTTPS."""
        token = environ.get(names.ENV_REGISTRY_TOKEN, "")
        if path := environ.get(names.ENV_REGISTRY_TOKEN_FILE, ""):
            token = read_token_file(path, names.ENV_REGISTRY_TOKEN_FILE)
        return cls(url, token, ca_file=environ.get(names.ENV_REGISTRY_CA) or None, **kwargs)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201), **kwargs: Any) -> httpx.Response:
        last = ""
        for attempt in range(1, self.retries + 1):
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code in ok:
                    return resp
                if resp.status_code < 500:  # our request is wrong: retrying will not help
                    raise RegistryUnavailable(f"registry refused {method} {path}: HTTP {resp.status_code} {resp.text[:500]}")
                last = f"HTTP {resp.status_code} {resp.text[:200]}"
            if attempt < self.retries:
                delay = self.backoff * 2 ** (attempt - 1)
                log.warning("registry %s %s failed (%s); retry %d/%d in %.0fs", method, path, last, attempt, self.retries - 1, delay)
                time.sleep(delay)
        raise RegistryUnavailable(f"registry at {self.url} unavailable for {method} {path} after {self.retries} attempts: {last}")

    # --- models ------------------------------------------------------------------------
    def ensure_model(self, name: str, *, task: str, architecture: str, input_spec: dict, description: str = "") -> None:
        """Create model `name`, or check that the one already there reads images the way this
        run's versions need (task, architecture and every `input_spec` key given): a model's
        input_spec serves all its versions, so a version registered under a different one would
        be served on other pixels or views than it was scored on."""
        body = {"name": name, "task": task, "architecture": architecture, "input_spec": input_spec, "description": description}
        seen = (name, json.dumps(body, sort_keys=True))
        if seen in self._ensured:  # every round registers again; the answer cannot have changed
            return
        if self._request("POST", "/v1/models", json=body, ok=(201, 409)).status_code == 201:
            self._ensured.add(seen)
            return
        existing = self._request("GET", f"/v1/models/{name}").json()
        have = {"task": existing.get("task"), "architecture": existing.get("architecture"),
                **{k: existing.get("input_spec", {}).get(k) for k in input_spec}}
        if have.get("test_time_augmentation") is None and "test_time_augmentation" in input_spec:
            have["test_time_augmentation"] = names.TTA_NONE  # a model created before the field existed
        want = {"task": task, "architecture": architecture, **input_spec}
        differ = [f"{k} {have[k]!r} (this run: {want[k]!r})" for k in want if have[k] != want[k]]
        if differ:
            raise RegistryConflict(
                f"registry model {name!r} at {self.url} already exists with {'; '.join(differ)}: its versions are served that "
                "way, so this run's would be served differently from how they were scored. Use a registry without that model "
                "(./deploy-local.sh down, then remove $FEDSSL_HOME/registry), or run with the model's settings")
        self._ensured.add(seen)

    def upload_version(self, name: str, weights: bytes, metadata: dict) -> dict:
        files = {"file": ("weights.safetensors", weights, "application/octet-stream")}
        return self._request("POST", f"/v1/models/{name}/versions", files=files, data={"metadata": json.dumps(metadata)}).json()

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self._request("PUT", f"/v1/models/{name}/aliases/{alias}", json={"version": version})

    def versions(self, name: str) -> list[dict]:
        resp = self._request("GET", f"/v1/models/{name}/versions", ok=(200, 404))
        return resp.json().get("versions", []) if resp.status_code == 200 else []

    def download(self, name: str, version: int) -> bytes:
        return self._request("GET", f"/v1/models/{name}/versions/{version}/weights").content

    # --- runs --------------------------------------------------------------------------
    def put_run(self, run_id: str, body: dict) -> None:
        self._request("PUT", f"/v1/runs/{run_id}", json=body)

    def post_round(self, run_id: str, body: dict) -> None:
        self._request("POST", f"/v1/runs/{run_id}/rounds", json=body)

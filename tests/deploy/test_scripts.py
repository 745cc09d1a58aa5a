"""The shell scripts: shellcheck on every one of them; deploy-gke.sh --dry-run prints the
gcloud/docker/kubectl/helm commands for the given project, region and cluster (and the helm
command it prints really renders); deploy-kind.sh says which tools are missing."""

from __future__ import annotations

import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, require_tool
from tests.deploy.conftest import helm_path

GKE = REPO_ROOT / "deploy-gke.sh"
KIND = REPO_ROOT / "scripts" / "deploy-kind.sh"


def shell_scripts() -> list[Path]:
    found = set(REPO_ROOT.glob("*.sh")) | set((REPO_ROOT / "scripts").glob("*.sh")) | set((REPO_ROOT / "k8s").glob("*.sh"))
    found |= set((REPO_ROOT / "charts").rglob("*.sh"))
    ci = REPO_ROOT / ".ci" / "run"
    if ci.exists():
        found.add(ci)
    return sorted(found)


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_shellcheck(script):
    shellcheck = require_tool("shellcheck")
    proc = subprocess.run([shellcheck, "--external-sources", str(script)], capture_output=True, text=True, timeout=60,
                          cwd=script.parent, check=False)
    assert proc.returncode == 0, proc.stdout


def test_the_scripts_a_user_runs_are_executable():
    for script in (GKE, KIND, REPO_ROOT / "scripts" / "render-manifests.sh", REPO_ROOT / "k8s" / "create-secrets.sh"):
        assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"


def _env(tmp_path: Path, path: str, **extra: str) -> dict[str, str]:
    env = {"HOME": str(tmp_path), "PATH": path, "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def _kaggle_json(home: Path, user="alice", key="0123456789abcdef0123456789abcdef") -> str:
    (home / ".kaggle").mkdir(parents=True, exist_ok=True)
    (home / ".kaggle" / "kaggle.json").write_text(f'{{"username":"{user}","key":"{key}"}}')
    return key


def _run(script: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60,
                          cwd=REPO_ROOT, check=False)


def _commands(stdout: str) -> list[list[str]]:
    """The commands a --dry-run printed (lines `+ cmd args`), split as the shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _find(commands: list[list[str]], *words: str) -> list[list[str]]:
    return [c for c in commands if all(w in c for w in words)]


def _renders(helm_upgrade: list[str]) -> str:
    """Run a printed `helm upgrade --install REL CHART ...` as `helm template` (offline)."""
    args = helm_upgrade[1:]
    assert args[:2] == ["upgrade", "--install"]
    args = ["template", *args[2:]]
    if "--kube-context" in args:
        i = args.index("--kube-context")
        del args[i:i + 2]
    proc = subprocess.run([helm_path(), *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ------------------------------------------------------------------------------- deploy-gke

def test_gke_dry_run_prints_the_commands_for_the_given_project_region_and_cluster(tmp_path):
    key = _kaggle_json(tmp_path)
    proc = _run(GKE, ["--dry-run", "--project", "acme-fl-42", "--region", "europe-west4", "--cluster", "fl-cluster",
                      "--tag", "v7"], _env(tmp_path, "/usr/bin:/bin"))
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    registry = "europe-west4-docker.pkg.dev/acme-fl-42/fedssl"
    assert _find(cmds, "gcloud", "artifacts", "repositories", "describe", "fedssl", "acme-fl-42", "europe-west4")
    create = _find(cmds, "gcloud", "artifacts", "repositories", "create", "fedssl")
    assert create and "--repository-format" in create[0] and "europe-west4" in create[0]
    assert _find(cmds, "gcloud", "auth", "configure-docker", "europe-west4-docker.pkg.dev")
    for c in ("superlink", "supernode", "registry"):
        build = _find(cmds, "docker", "build", f"{registry}/fedssl-{c}:v7")
        assert build and str(REPO_ROOT / "docker" / f"{c}.Dockerfile") in build[0] and build[0][-1] == str(REPO_ROOT)
        assert _find(cmds, "docker", "push", f"{registry}/fedssl-{c}:v7")
    creds = _find(cmds, "gcloud", "container", "clusters", "get-credentials", "fl-cluster")
    assert creds and creds[0][creds[0].index("--region") + 1] == "europe-west4" and "acme-fl-42" in creds[0]
    context = "gke_acme-fl-42_europe-west4_fl-cluster"
    assert _find(cmds, "kubectl", "--context", context, "create", "secret", "generic", "fedssl-kaggle")
    helm = next(c for c in cmds if c[1:3] == ["upgrade", "--install"])
    assert helm[3:5] == ["fedssl", str(REPO_ROOT / "charts" / "fedssl")]
    assert str(REPO_ROOT / "charts" / "fedssl" / "values-gke.yaml") in helm
    assert f"image.registry={registry}" in helm and "image.tag=v7" in helm and context in helm
    # Order: the images exist before the chart points at them; credentials before kubectl.
    flat = [" ".join(c) for c in cmds]
    assert max(i for i, c in enumerate(flat) if "docker push" in c) < flat.index(" ".join(helm))
    assert next(i for i, c in enumerate(flat) if "get-credentials" in c) < next(i for i, c in enumerate(flat) if c.startswith("kubectl"))
    assert key not in proc.stdout + proc.stderr  # never print the Kaggle key
    rendered = _renders(helm)
    assert f"image: {registry}/fedssl-supernode:v7" in rendered and "storageClassName: standard-rwo" in rendered


def test_gke_takes_project_region_and_cluster_from_the_environment(tmp_path):
    _kaggle_json(tmp_path)
    env = _env(tmp_path, "/usr/bin:/bin", FEDSSL_GKE_PROJECT="env-proj-1", FEDSSL_GKE_REGION="us-central1",
               FEDSSL_GKE_CLUSTER="env-cluster")
    proc = _run(GKE, ["--dry-run", "--tag", "t"], env)
    assert proc.returncode == 0, proc.stderr
    assert _find(_commands(proc.stdout), "gcloud", "container", "clusters", "get-credentials", "env-cluster", "us-central1", "env-proj-1")


@pytest.mark.parametrize("args, message", [
    (["--region", "europe-west4", "--cluster", "c"], "--project is required"),
    (["--project", "acme-fl-42", "--cluster", "c"], "--region is required"),
    (["--project", "acme-fl-42", "--region", "europe-west4"], "--cluster is required"),
    (["--project", "acme-fl-42", "--region", "europe-west4-a", "--cluster", "c"], "not a region"),
    (["--project", "acme-fl-42", "--region", "europe-west4", "--cluster", "c", "--zone", "x"], "unknown option '--zone'"),
])
def test_gke_refuses_missing_or_wrong_flags_clearly(tmp_path, args, message):
    proc = _run(GKE, ["--dry-run", *args], _env(tmp_path, "/usr/bin:/bin"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not _commands(proc.stdout)  # nothing was (or would have been) run


def test_gke_needs_kaggle_credentials_unless_synthetic(tmp_path):
    args = ["--dry-run", "--project", "acme-fl-42", "--region", "europe-west4", "--cluster", "c", "--tag", "t"]
    proc = _run(GKE, args, _env(tmp_path, "/usr/bin:/bin"))
    assert proc.returncode == 1 and "Kaggle" in proc.stderr and "--synthetic" in proc.stderr
    assert not _commands(proc.stdout)
    synthetic = _run(GKE, [*args, "--synthetic"], _env(tmp_path, "/usr/bin:/bin"))
    assert synthetic.returncode == 0, synthetic.stderr
    cmds = _commands(synthetic.stdout)
    assert not _find(cmds, "create", "secret")
    rendered = _renders(next(c for c in cmds if c[1:3] == ["upgrade", "--install"]))
    assert "download-ham10000" not in rendered and 'data-source=\\"synthetic\\"' in rendered


def test_gke_without_dry_run_lists_the_missing_tools(tmp_path):
    _kaggle_json(tmp_path)
    proc = _run(GKE, ["--project", "acme-fl-42", "--region", "europe-west4", "--cluster", "c"], _env(tmp_path, str(tmp_path / "empty")))
    assert proc.returncode == 1
    for tool in ("gcloud", "docker", "kubectl"):
        assert tool in proc.stderr


# ------------------------------------------------------------------------------ deploy-kind

def _stubs(folder: Path, names: list[str]) -> Path:
    """Commands that only record that they were called."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        p = folder / name
        p.write_text(f'#!/bin/bash\necho "{name} $*" >> "{folder}/called"\nexit 1\n')
        p.chmod(0o755)
    return folder


@pytest.mark.parametrize("entry", [KIND, REPO_ROOT / "deploy-local.sh"], ids=["deploy-kind.sh", "deploy-local.sh --kind"])
def test_kind_says_which_tools_are_missing(tmp_path, entry):
    stubs = _stubs(tmp_path / "bin", ["docker", "kubectl", "helm"])
    # /usr/bin:/bin for the shell's own tools; no kind anywhere on this PATH.
    path = f"{stubs}:/usr/bin:/bin"
    if subprocess.run(["bash", "-c", "command -v kind"], env={"PATH": path}, capture_output=True, check=False).returncode == 0:
        pytest.skip("kind is installed in /usr/bin here")
    args = ["--kind"] if entry.name == "deploy-local.sh" else []
    proc = _run(entry, args, _env(tmp_path, path))
    assert proc.returncode == 1
    assert "missing tools: kind" in proc.stderr and "kind.sigs.k8s.io" in proc.stderr
    for present in ("docker", "kubectl", "helm"):
        assert f"{present}:" not in proc.stderr
    assert not (stubs / "called").exists(), "nothing may run before the tools are checked"


def test_kind_with_no_tools_names_them_all(tmp_path):
    proc = _run(KIND, [], _env(tmp_path, str(tmp_path / "empty")))
    assert proc.returncode == 1
    for tool in ("docker", "kind", "kubectl"):
        assert f"{tool}:" in proc.stderr


def test_kind_dry_run_creates_builds_loads_and_installs(tmp_path):
    key = _kaggle_json(tmp_path)
    proc = _run(KIND, ["--dry-run", "--hospitals", "4", "--rounds", "1", "--tag", "dev-x"], _env(tmp_path, "/usr/bin:/bin"))
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    create = _find(cmds, "kind", "create", "cluster")
    assert create and create[0][create[0].index("--config") + 1] == str(REPO_ROOT / "k8s" / "kind-cluster.yaml")
    for c in ("superlink", "supernode", "registry"):
        assert _find(cmds, "docker", "build", f"fedssl-{c}:dev-x")
        assert _find(cmds, "kind", "load", "docker-image", f"fedssl-{c}:dev-x")
    assert _find(cmds, "create", "secret", "generic", "fedssl-kaggle")  # credentials found in ~/.kaggle
    assert key not in proc.stdout + proc.stderr
    helm = next(c for c in cmds if c[1:3] == ["upgrade", "--install"])
    assert str(REPO_ROOT / "charts" / "fedssl" / "values-kind.yaml") in helm and "kaggle.existingSecret=fedssl-kaggle" in helm
    rendered = _renders(helm)
    assert rendered.count("name: download-ham10000") == 4
    assert "fedssl-hospital-4" in rendered and '"ssl-rounds=1"' in rendered and "image: fedssl-registry:dev-x" in rendered


def test_kind_without_kaggle_credentials_refuses_unless_synthetic_is_asked_for(tmp_path):
    env = _env(tmp_path, "/usr/bin:/bin")
    for data in ("auto", "kaggle"):
        proc = _run(KIND, ["--dry-run", "--tag", "t", "--data", data], env)
        assert proc.returncode == 1, proc.stdout
        assert f"--data {data} needs Kaggle credentials" in proc.stderr and "--data synthetic" in proc.stderr
        assert "SYNTHETIC" not in proc.stderr  # never fake images on its own
    asked = _run(KIND, ["--dry-run", "--tag", "t", "--data", "synthetic"], env)
    assert asked.returncode == 0 and "SYNTHETIC DATA (--data synthetic)" in asked.stderr
    assert not _find(_commands(asked.stdout), "create", "secret")


def test_kind_refuses_bad_options(tmp_path):
    proc = _run(KIND, ["--hospitals", "zero"], _env(tmp_path, "/usr/bin:/bin"))
    assert proc.returncode == 1 and "--hospitals must be a whole number" in proc.stderr

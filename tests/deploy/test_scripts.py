"""The shell scripts: shellcheck on every one of them; deploy-gke.sh --dry-run prints the
gcloud/docker/kubectl/helm commands for the given project, region and cluster (and the helm
command it prints really renders); deploy-kind.sh says which tools are missing. Both launchers
take --data kaggle:OWNER/DATASET[/SUB/PATH] with --partition/--dirichlet-alpha/--label-map/
--class-names: every hospital downloads that dataset and gets its own part of it."""

from __future__ import annotations

import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, require_tool
from tests.deploy.conftest import helm_path

GKE = REPO_ROOT / "deploy-gke.sh"
KIND = REPO_ROOT / "scripts" / "deploy-kind.sh"
GKE_FLAGS = ["--project", "acme-fl-42", "--region", "europe-west4", "--cluster", "fl-cluster", "--tag", "t"]
BRAIN = "masoudnickparvar/brain-tumor-mri-dataset"


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


def _supernodes(rendered: str) -> dict[str, dict]:
    """Each hospital's SuperNode: {hospital: {"init": [args of its download container] or None,
    "node_config": the --node-config text}}."""
    out = {}
    for obj in yaml.safe_load_all(rendered):
        if not obj or obj["kind"] != "Deployment" or obj["metadata"]["labels"].get("app.kubernetes.io/component") != "supernode":
            continue
        spec = obj["spec"]["template"]["spec"]
        container = next(c for c in spec["containers"] if c["name"] == "supernode")
        node_config = next(a for a in container["args"] if a.startswith("--node-config="))[len("--node-config="):]
        init = [c for c in spec.get("initContainers", []) if c["name"].startswith("download-")]
        hospital = node_config.split('hospital="', 1)[1].split('"', 1)[0]
        out[hospital] = {"init": init[0] if init else None, "node_config": node_config}
    return out


def _node_config(text: str) -> dict:
    """A --node-config as flower-supernode reads it (Flower's own parser)."""
    from flwr.common.config import parse_config_args

    return parse_config_args([text])


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


def test_gke_dry_run_federates_a_kaggle_class_folder_dataset_split_by_dirichlet(tmp_path):
    key = _kaggle_json(tmp_path)
    proc = _run(GKE, ["--dry-run", *GKE_FLAGS, "--data", f"kaggle:{BRAIN}/Training", "--partition", "dirichlet"],
                _env(tmp_path, "/usr/bin:/bin"))
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    assert _find(cmds, "create", "secret", "generic", "fedssl-kaggle")  # the Secret as for HAM10000
    assert key not in proc.stdout + proc.stderr
    helm = next(c for c in cmds if c[1:3] == ["upgrade", "--install"])
    assert "federation.partitionBy=dirichlet" in helm
    hospitals = _supernodes(_renders(helm))
    assert sorted(hospitals) == ["hospital-1", "hospital-2", "hospital-3"]  # values-gke.yaml's three
    for i, name in enumerate(sorted(hospitals)):
        init, cfg = hospitals[name]["init"], _node_config(hospitals[name]["node_config"])
        assert init["name"] == "download-kaggle"
        assert init["args"] == [f"/data/kaggle/{BRAIN}", f"--dataset={BRAIN}", "--format=imagefolder", "--path=Training"]
        assert cfg["data-source"] == "imagefolder" and cfg["data-path"] == f"/data/kaggle/{BRAIN}/Training"
        assert (cfg["partition-id"], cfg["num-partitions"]) == (i, 3)
        assert cfg["partition-by"] == "dirichlet" and cfg["dirichlet-alpha"] == 0.5
        assert cfg["ssl-task"] == ("simclr", "rotation")[i % 2] and cfg["download"] is False


def test_gke_kaggle_dataset_defaults_to_a_random_split_and_plain_kaggle_stays_ham10000(tmp_path):
    _kaggle_json(tmp_path)
    env = _env(tmp_path, "/usr/bin:/bin")
    proc = _run(GKE, ["--dry-run", *GKE_FLAGS, "--data", "kaggle:paultimothymooney/chest-xray-pneumonia/chest_xray//train/",
                      "--hospitals", "2"], env)
    assert proc.returncode == 0, proc.stderr
    hospitals = _supernodes(_renders(next(c for c in _commands(proc.stdout) if c[1:3] == ["upgrade", "--install"])))
    assert sorted(hospitals) == ["hospital-1", "hospital-2"]
    for name, h in hospitals.items():
        cfg = _node_config(h["node_config"])
        assert "--path=chest_xray/train" in h["init"]["args"]  # normalised as the download would
        assert cfg["partition-by"] == "random" and cfg["num-partitions"] == 2 and "dirichlet-alpha" not in cfg
    for data in ("kaggle", "kaggle:kmader/skin-cancer-mnist-ham10000"):
        proc = _run(GKE, ["--dry-run", *GKE_FLAGS, "--data", data, "--partition", "site"], env)
        assert proc.returncode == 0, proc.stderr
        helm = next(c for c in _commands(proc.stdout) if c[1:3] == ["upgrade", "--install"])
        assert not any(a.startswith("hospitals=") for a in helm)  # values-gke.yaml's HAM10000 hospitals
        hospitals = _supernodes(_renders(helm))
        assert len(hospitals) == 3
        for h in hospitals.values():
            cfg = _node_config(h["node_config"])
            assert h["init"]["name"] == "download-ham10000" and cfg["data-source"] == "ham10000"
            assert cfg["partition-by"] == "site"


@pytest.mark.parametrize("args, message", [
    (["--data", "kaggle:onlyowner"], "--data kaggle:onlyowner: expected kaggle:OWNER/DATASET[/SUB/PATH] as in the dataset's Kaggle URL"),
    (["--data", "kaggle:masoud nickparvar/x"], "expected kaggle:OWNER/DATASET[/SUB/PATH]"),
    (["--data", f"kaggle:{BRAIN}/../Training"], "'..' is not allowed in the sub-path"),
    (["--data", "kaggle:kmader/skin-cancer-mnist-ham10000/x"], "HAM10000 is used from the top of its download"),
    (["--data", "ham"], "--data must be auto, kaggle (both HAM10000), synthetic or kaggle:OWNER/DATASET[/SUB/PATH], got 'ham'"),
    (["--data", f"kaggle:{BRAIN}/Training", "--partition", "site"],
     f"--partition site: --data kaggle:{BRAIN}/Training is a class-per-folder tree, which has no lesion ids or acquisition sites"),
    (["--data", f"kaggle:{BRAIN}/Training", "--partition", "lesion"], "split it by random or dirichlet"),
    (["--data", "kaggle", "--partition", "random"], "--partition random: HAM10000 splits by site, lesion or dirichlet"),
    (["--partition", "site", "--hospitals", "5"], "HAM10000 has 4 acquisition sites, so at most 4 hospitals"),
    (["--data", f"kaggle:{BRAIN}/Training", "--partition", "iid"], "--partition iid: expected site, lesion or dirichlet"),
    (["--data", f"kaggle:{BRAIN}/Training", "--dirichlet-alpha", "0.3"], "--dirichlet-alpha needs --partition dirichlet"),
    (["--data", f"kaggle:{BRAIN}/Training", "--partition", "dirichlet", "--dirichlet-alpha", "0"], "--dirichlet-alpha must be a number > 0, got '0'"),
    (["--label-map", "no_tumor=notumor"], "HAM10000's 7 classes come from its metadata"),
    (["--synthetic", "--partition", "random"], "not to --data synthetic"),
    (["--data", f"kaggle:{BRAIN}/Training", "--label-map", '{"no_tumor": "notumor"}'], "write it as 'folder=class,...' entries"),
    (["--data", f"kaggle:{BRAIN}/Training", "--label-map", "hospital-1:no_tumor=notumor"], "they share one label map"),
    (["--data", f"kaggle:{BRAIN}/Training", "--class-names", "glioma,,notumor"], "none empty"),
    (["--hospitals", "0"], "--hospitals must be a whole number >= 1, got '0'"),
])
def test_gke_refuses_bad_data_options_before_running_anything(tmp_path, args, message):
    _kaggle_json(tmp_path)
    proc = _run(GKE, ["--dry-run", *GKE_FLAGS, *args], _env(tmp_path, "/usr/bin:/bin"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not _commands(proc.stdout)  # nothing was (or would have been) run


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


def test_kind_dry_run_federates_a_kaggle_dataset_with_its_label_options(tmp_path):
    _kaggle_json(tmp_path)
    label_file = tmp_path / "labels.txt"
    label_file.write_text("# the MRI folders\nno_tumor=notumor\r\nglioma_tumor=glioma\n\n")
    env = _env(tmp_path, "/usr/bin:/bin")
    proc = _run(KIND, ["--dry-run", "--tag", "t", "--hospitals", "4", "--data", f"kaggle:{BRAIN}/Training",
                       "--partition", "dirichlet", "--dirichlet-alpha", "0.3", "--label-map", str(label_file),
                       "--class-names", "glioma,meningioma,notumor,pituitary"], env)
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    assert _find(cmds, "create", "secret", "generic", "fedssl-kaggle")
    helm = next(c for c in cmds if c[1:3] == ["upgrade", "--install"])
    assert "kaggle.existingSecret=fedssl-kaggle" in helm and "federation.dirichletAlpha=0.3" in helm
    hospitals = _supernodes(_renders(helm))
    assert sorted(hospitals) == [f"hospital-{i}" for i in range(1, 5)]
    from fedssl_flower.data import HospitalDataConfig

    for i, name in enumerate(sorted(hospitals)):
        h = hospitals[name]
        assert f"--dataset={BRAIN}" in h["init"]["args"] and "--path=Training" in h["init"]["args"]
        cfg = _node_config(h["node_config"])
        assert cfg["label-map"] == "no_tumor=notumor,glioma_tumor=glioma"  # the file, read here
        data = HospitalDataConfig.from_node_config(cfg)  # what the hospital's ClientApp reads
        assert (data.data_source, data.data_path) == ("imagefolder", f"/data/kaggle/{BRAIN}/Training")
        assert (data.partition_id, data.num_partitions, data.partition_by, data.dirichlet_alpha) == (i, 4, "dirichlet", 0.3)
        assert data.class_names == "glioma,meningioma,notumor,pituitary" and data.max_images == 600  # values-kind.yaml


@pytest.mark.parametrize("entry", [KIND, REPO_ROOT / "deploy-local.sh"], ids=["deploy-kind.sh", "deploy-local.sh --kind"])
@pytest.mark.parametrize("args, message", [
    (["--data", "kaggle:onlyowner"], "--data kaggle:onlyowner: expected kaggle:OWNER/DATASET[/SUB/PATH]"),
    (["--data", f"kaggle:{BRAIN}/Training", "--partition", "site"], "has no lesion ids or acquisition sites"),
    (["--data", "auto", "--class-names", "a,b"], "they apply to class-per-folder data"),
])
def test_kind_refuses_bad_data_options_before_running_anything(tmp_path, entry, args, message):
    _kaggle_json(tmp_path)
    stubs = _stubs(tmp_path / "bin", ["docker", "kind", "kubectl", "helm"])
    prefix = ["--kind"] if entry.name == "deploy-local.sh" else []
    proc = _run(entry, [*prefix, *args], _env(tmp_path, f"{stubs}:/usr/bin:/bin"))
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert not (stubs / "called").exists()  # refused before any tool ran

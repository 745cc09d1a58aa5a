"""k8s/: the plain manifests are exactly a fresh render of the chart, the namespace and kind
cluster files are what the scripts expect, and create-secrets.sh makes the Secrets the
manifests use (a certificate the SuperNodes can verify, a token)."""

from __future__ import annotations

import difflib
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, require_tool
from tests.deploy.conftest import helm_path

K8S = REPO_ROOT / "k8s"
MANIFESTS = K8S / "fedssl.yaml"


def manifests() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]


def test_manifests_are_a_fresh_render_of_the_chart(tmp_path):
    out = tmp_path / "fedssl.yaml"
    proc = subprocess.run([str(REPO_ROOT / "scripts" / "render-manifests.sh"), str(out)], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "HELM": helm_path()}, check=False)
    assert proc.returncode == 0, proc.stderr
    fresh, committed = out.read_text(), MANIFESTS.read_text()
    if fresh != committed:
        diff = "".join(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True), "k8s/fedssl.yaml", "fresh render", n=1))
        pytest.fail(f"k8s/fedssl.yaml is out of date with the chart; run scripts/render-manifests.sh and commit it:\n{diff[:4000]}")


def test_manifests_live_in_the_namespace_file_and_meet_restricted_pod_security():
    ns = yaml.safe_load((K8S / "namespace.yaml").read_text())
    assert ns["kind"] == "Namespace" and ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    objs = manifests()
    assert objs and {o["metadata"]["namespace"] for o in objs} == {ns["metadata"]["name"]}
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "Job", "NetworkPolicy", "PersistentVolumeClaim", "ConfigMap"} <= kinds
    assert "Pod" not in kinds  # the helm test pod is Helm's, not kubectl's
    for o in objs:  # restricted forbids hostPath volumes
        spec = (o.get("spec") or {}).get("template", {}).get("spec", {})
        assert not any("hostPath" in v for v in spec.get("volumes", []))


def test_manifests_validate_against_the_kubernetes_schema():
    from kubernetes_validate import utils

    for o in manifests():
        utils.validate(o, "1.30.0", strict=True)


def test_kind_cluster_config_is_the_one_deploy_kind_uses():
    cfg = yaml.safe_load((K8S / "kind-cluster.yaml").read_text())
    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    script = (REPO_ROOT / "scripts" / "deploy-kind.sh").read_text()
    assert "k8s/kind-cluster.yaml" in script and f'CLUSTER="${{FEDSSL_KIND_CLUSTER:-{cfg["name"]}}}"' in script


def test_create_secrets_makes_what_the_manifests_use(tmp_path):
    """With a stand-in kubectl that stores what it is given: the TLS Secret verifies for the
    SuperLink Service's name and 127.0.0.1, the token is long, and a second run keeps both."""
    import ipaddress

    from cryptography import x509

    require_tool("openssl")
    store, bin_dir = tmp_path / "secrets", tmp_path / "bin"
    store.mkdir()
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(f"""#!/usr/bin/env bash
set -eu
store={store}
if [ "$1 $2" = "get secret" ]; then [ -d "$store/${{@: -1}}" ]; exit; fi
if [ "$1 $2 $3" = "create secret generic" ]; then
  name="$4"; mkdir -p "$store/$name"; shift 4
  for a in "$@"; do case "$a" in --from-file=*) kv="${{a#--from-file=}}"; cp "${{kv#*=}}" "$store/$name/${{kv%%=*}}" ;; esac; done
  echo "secret/$name created"; exit 0
fi
echo "unexpected kubectl $*" >&2; exit 2
""")
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    script = K8S / "create-secrets.sh"
    first = subprocess.run([str(script), "fedssl"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert first.returncode == 0, first.stderr

    used = {ref for o in manifests() for ref in _secret_names(o)}
    assert used == {p.name for p in store.iterdir()}, "create-secrets.sh must make exactly the Secrets the manifests use"
    tls = store / "fedssl-superlink-tls"
    cert = x509.load_pem_x509_certificate((tls / "tls.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes()))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fedssl-superlink.fedssl.svc", "fedssl-superlink-control.fedssl.svc"} <= set(sans.get_values_for_type(x509.DNSName))
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert (tls / "tls.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    # What the SuperLink (uvicorn) does with them.
    import ssl

    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls / "tls.crt", tls / "tls.key")
    token = (store / "fedssl-registry-token" / "token").read_text()
    assert len(token) == 64 and "\n" not in token

    assert len((store / "fedssl-control-token" / "token").read_text()) == 64
    from fedssl_flower import node_keys

    for hospital in ("hospital-1", "hospital-2", "hospital-3"):  # what fedssl-supernode and the run Job read
        keys = store / f"fedssl-{hospital}-auth"
        assert node_keys.openssh_private_key((keys / "private-key").read_bytes()).startswith(b"-----BEGIN OPENSSH")
        assert node_keys.openssh_public_key((keys / "public-key").read_bytes()).startswith(b"ecdsa-sha2-nistp256 ")

    second = subprocess.run([str(script), "fedssl"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 0 and second.stdout.count("keeping it") == len(used)
    assert (store / "fedssl-registry-token" / "token").read_text() == token


def _secret_names(obj: dict) -> set[str]:
    spec = (obj.get("spec") or {}).get("template", {}).get("spec")
    if not spec:
        return set()
    names = set()
    for c in spec.get("initContainers", []) + spec["containers"]:
        for e in c.get("env", []):
            if "secretKeyRef" in e.get("valueFrom", {}):
                names.add(e["valueFrom"]["secretKeyRef"]["name"])
    for v in spec.get("volumes", []):
        if "secret" in v:
            names.add(v["secret"]["secretName"])
    return names


def test_manifests_file_is_readable_by_everyone():
    assert MANIFESTS.stat().st_mode & stat.S_IROTH, "k8s/fedssl.yaml must be world-readable (it holds no secret)"
    assert Path(REPO_ROOT / "scripts" / "render-manifests.sh").stat().st_mode & stat.S_IXUSR

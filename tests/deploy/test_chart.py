"""charts/fedssl: helm lint and template for every value set, the objects checked offline
against the Kubernetes JSON schemas, and the contracts between the rendered objects and the
processes they run (docs/architecture.md): addresses, ports, probes, references, security,
secrets, node and run config, NetworkPolicies, the generated certificate."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.deploy.conftest import (
    CHART,
    NAMESPACE,
    RELEASE,
    SCENARIOS,
    arg_value,
    by_kind,
    component,
    containers,
    env_of,
    helm,
    named,
    pod_labels,
    pod_spec,
    render,
    render_scenario,
    scenario_values,
    workloads,
)

CHART_DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
APP_CONFIG = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
SUPERLINK = f"{RELEASE}-superlink"
CONTROL = f"{RELEASE}-superlink-control"
REGISTRY = f"{RELEASE}-registry"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion >= 1.27, GKE's oldest
# channel is newer) and the newest the bundled schemas know.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# A container `command` replaces the image's ENTRYPOINT, so the chart names tini itself:
# Flower leaves finished task processes behind, and PID 1 must reap them.
TINI = ["/usr/bin/tini", "--"]


def superlink_containers(objs: list[dict]) -> tuple[dict, dict]:
    """The SuperLink container and its proxy sidecar."""
    by_name = {c["name"]: c for c in pod_spec(named(objs, "Deployment", SUPERLINK))["containers"]}
    return by_name["superlink"], by_name["proxy"]


def values_of(name: str) -> dict:
    """The effective values of a scenario (maps merged, lists replaced, as helm does)."""
    def merge(base, over):
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for k, v in over.items():
                out[k] = merge(base.get(k), v) if k in base else v
            return out
        return copy.deepcopy(over)
    return merge(CHART_DEFAULTS, scenario_values(name))


def supernodes(objs: list[dict]) -> list[dict]:
    return [o for o in by_kind(objs, "Deployment") if component(o) == "supernode"]


def main_container(obj: dict) -> dict:
    return pod_spec(obj)["containers"][0]


def container_port(container: dict, port) -> int:
    """A probe's or Service's port (number or name) as the container's port number."""
    if isinstance(port, int):
        return port
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert port in ports, f"container {container['name']} has no port named {port!r} ({ports})"
    return ports[port]


# ------------------------------------------------------------------------------ helm itself

def test_the_issue_value_sets_are_all_there():
    assert {"defaults", "tls-existing-secret", "kaggle", "pvc-data", "gke", "servicemonitor",
            "networkpolicy-off"} <= set(SCENARIOS)


def test_helm_lint_strict(scenario):
    proc = helm("lint", "--strict", str(CHART), "-f", str(SCENARIOS[scenario]), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_objects_match_the_kubernetes_schemas(scenario, version):
    from kubernetes_validate import utils

    objs = render_scenario(scenario)
    assert objs
    for obj in objs:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":  # a CRD: no bundled schema
            assert obj["kind"] == "ServiceMonitor" and obj["spec"]["endpoints"] and obj["spec"]["selector"]["matchLabels"]
            continue
        try:
            utils.validate(obj, version, strict=True)
        except utils.ValidationError as exc:
            pytest.fail(f"{scenario}: {obj['kind']} {obj['metadata']['name']} is not valid Kubernetes {version}: "
                        f"{exc.message} at {'/'.join(map(str, exc.path))}")


def test_schema_refuses_typos_and_unknown_values(tmp_path):
    typo = helm("template", RELEASE, str(CHART), "--set", "superlink.tls.enabeld=true", check=False)
    assert typo.returncode != 0 and "enabeld" in typo.stderr
    run_key = helm("template", RELEASE, str(CHART), "--set", "run.config.ssl-round=3", check=False)
    assert run_key.returncode != 0 and "ssl-round" in run_key.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"hospitals": [{"name": "Hospital_1", "sslTask": "jigsaw", "partition": 0,
                                                  "data": {"source": "ftp"}}]}))
    proc = helm("template", RELEASE, str(CHART), "-f", str(bad), check=False)
    assert proc.returncode != 0
    for word in ("name", "sslTask", "source"):
        assert word in proc.stderr, proc.stderr
    managed = tmp_path / "managed.yaml"
    managed.write_text(yaml.safe_dump({"hospitals": [{"name": "h", "sslTask": "simclr", "data": {"source": "synthetic"},
                                                      "nodeConfig": {"data-path": "/elsewhere"}}]}))
    assert helm("template", RELEASE, str(CHART), "-f", str(managed), check=False).returncode != 0


@pytest.mark.parametrize("values, message", [
    ({"superlink": {"tls": {"enabled": False}}}, "needs superlink.tls.enabled"),  # auth is on by default
    ({"hospitals": [{"name": "a", "sslTask": "simclr", "data": {"source": "kaggle"}}]}, "kaggle.existingSecret"),
    ({"hospitals": [{"name": "a", "sslTask": "simclr", "data": {"source": "synthetic"}},
                    {"name": "a", "sslTask": "rotation", "data": {"source": "synthetic"}}]}, "appears twice"),
    ({"hospitals": [{"name": "a", "sslTask": "simclr", "partition": 3, "data": {"source": "synthetic"}}]}, "out of range"),
    ({"hospitals": [{"name": "a", "sslTask": "simclr", "data": {"source": "pvc"}}]}, "claimName"),
])
def test_impossible_combinations_fail_with_what_to_change(tmp_path, values, message):
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump(values))
    proc = helm("template", RELEASE, str(CHART), "-f", str(f), check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_notes_tell_how_to_follow_the_run_reach_the_registry_and_infer():
    proc = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    notes = proc.stdout[proc.stdout.index("NOTES:"):]
    assert f"kubectl logs -n {NAMESPACE} -f --pod-running-timeout=10m job/{RELEASE}-run-1" in notes
    assert f"kubectl port-forward -n {NAMESPACE} svc/{REGISTRY} 8080:8080" in notes
    assert f"kubectl get secret -n {NAMESPACE} {REGISTRY}-token -o jsonpath='{{.data.token}}'" in notes
    assert 'export FEDSSL_CURL="" FEDSSL_URL="http://127.0.0.1:8080"' in notes
    assert re.search(r'curl -s \$FEDSSL_CURL -H "Authorization: Bearer \$FEDSSL_TOKEN" -F "file=@\S+" '
                     r"\$FEDSSL_URL/v1/models/fedssl-classifier:predict", notes)
    assert "SYNTHETIC" in notes  # the defaults train on synthetic data and say so
    assert "helm test" in notes


def test_job_and_notes_name_a_new_run_for_each_revision():
    # helm template renders revision 1; the Job name carries it, so an upgrade replaces the Job.
    job = by_kind(render_scenario("defaults"), "Job")[0]
    assert job["metadata"]["name"] == f"{RELEASE}-run-1"


# ------------------------------------------------------------------------- shape of things

def test_one_superlink_and_one_supernode_per_hospital(scenario):
    objs, values = render_scenario(scenario), values_of(scenario)
    superlink = named(objs, "Deployment", SUPERLINK)
    assert superlink["spec"]["replicas"] == 1 and superlink["spec"]["strategy"]["type"] == "Recreate"
    nodes = supernodes(objs)
    assert sorted(pod_labels(d)["fedssl/hospital"] for d in nodes) == sorted(h["name"] for h in values["hospitals"])
    for d in nodes:
        assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate"
    registry = named(objs, "Deployment", REGISTRY)
    assert registry["spec"]["strategy"]["type"] == "Recreate"
    jobs = by_kind(objs, "Job")
    assert len(jobs) == (1 if values["run"]["enabled"] else 0)


def test_services_select_exactly_their_component(scenario):
    objs = render_scenario(scenario)
    for svc, comp in ((SUPERLINK, "superlink"), (REGISTRY, "registry")):
        selector = named(objs, "Service", svc)["spec"]["selector"]
        chosen = [w for w in workloads(objs) if selector.items() <= pod_labels(w).items()]
        assert [component(w) for w in chosen] == [comp], f"Service {svc} selects {[w['metadata']['name'] for w in chosen]}"


def test_every_supernode_dials_the_superlink_service(scenario):
    objs, values = render_scenario(scenario), values_of(scenario)
    svc, control_svc = named(objs, "Service", SUPERLINK), named(objs, "Service", CONTROL)
    (port,), (control_port,) = svc["spec"]["ports"], control_svc["spec"]["ports"]
    assert (port["name"], control_port["name"]) == ("fleet", "control")
    assert control_svc["spec"]["type"] == "ClusterIP"  # whatever type the hospitals' Service has
    address = f"{SUPERLINK}.{NAMESPACE}.svc:{port['port']}"
    control_address = f"{CONTROL}.{NAMESPACE}.svc:{control_port['port']}"
    sl, proxy = superlink_containers(objs)
    # The SuperLink listens on loopback only; the Services reach the proxy's two listeners,
    # and the proxy forwards to the SuperLink.
    assert arg_value(sl["args"], "--host") == "127.0.0.1" and not sl.get("ports")
    assert proxy["command"] == [*TINI, "fedssl-superlink-proxy"]
    assert container_port(proxy, port["targetPort"]) == int(arg_value(proxy["args"], "--fleet-listen"))
    assert container_port(proxy, control_port["targetPort"]) == int(arg_value(proxy["args"], "--control-listen"))
    assert arg_value(proxy["args"], "--upstream") == f"127.0.0.1:{arg_value(sl['args'], '--port')}"
    tls = values["superlink"]["tls"]["enabled"]
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile"):
        assert (arg_value(proxy["args"], flag) == arg_value(sl["args"], flag)) if tls else flag not in str(proxy["args"])
    if tls:  # nginx verifies the SuperLink's certificate for the name it carries
        assert arg_value(proxy["args"], "--upstream-server-name") == f"{SUPERLINK}.{NAMESPACE}.svc"
    assert ("--insecure" in sl["args"]) is (not tls)
    for d in supernodes(objs):
        c = main_container(d)
        assert c["command"] == [*TINI, "fedssl-supernode"]
        assert arg_value(c["args"], "--superlink") == address, d["metadata"]["name"]
        if tls:
            ca = arg_value(c["args"], "--root-certificates")
            assert ca and "--insecure" not in c["args"]
            _assert_ca_only(d, c, ca)
        else:
            assert "--insecure" in c["args"]
    for job in by_kind(objs, "Job"):
        env = env_of(main_container(job))
        # The run Job dials the control listener, with the token file.
        assert env["FEDSSL_SUPERLINK"]["value"] == control_address
        if tls:
            _assert_ca_only(job, main_container(job), env["FEDSSL_SUPERLINK_CA"]["value"])
        else:
            assert env["FEDSSL_SUPERLINK_CA"]["value"] == ""
    for test_pod in by_kind(objs, "Pod"):
        assert env_of(main_container(test_pod))["FEDSSL_SUPERLINK"]["value"] == address


def _assert_ca_only(obj: dict, container: dict, ca_file: str) -> None:
    """`ca_file` comes from a volume projecting only ca.crt (never the key) of the TLS Secret."""
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    folder = str(Path(ca_file).parent)
    assert folder in mounts, f"{obj['metadata']['name']}: {ca_file} is not on a mounted volume"
    volume = next(v for v in pod_spec(obj)["volumes"] if v["name"] == mounts[folder])
    assert volume["secret"]["items"] == [{"key": "ca.crt", "path": Path(ca_file).name}]


def test_probes_and_ports_match_what_the_processes_listen_on(scenario):
    objs, values = render_scenario(scenario), values_of(scenario)
    tls = values["superlink"]["tls"]["enabled"]

    sl, proxy = superlink_containers(objs)
    sl_port = int(arg_value(sl["args"], "--port"))
    # The kubelet probes the fleet listener; /health there is the SuperLink's, through nginx.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = proxy[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] == "fleet"
        assert get["scheme"] == ("HTTPS" if tls else "HTTP")
    # The SuperLink itself is on loopback, which the kubelet cannot reach: probed from inside.
    probe = sl["livenessProbe"]["exec"]["command"]
    assert probe[3] == f"{'https' if tls else 'http'}://127.0.0.1:{sl_port}/health"
    compile(probe[2], "probe", "exec")

    reg = main_container(named(objs, "Deployment", REGISTRY))
    env = env_of(reg)
    assert reg["command"] == [*TINI, "fedssl-registry"]
    assert env["FEDSSL_REGISTRY_HOST"]["value"] == "0.0.0.0"
    reg_port = int(env["FEDSSL_REGISTRY_PORT"]["value"])
    assert {reg[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")} == \
        {"/v2/health/live", "/v2/health/ready"}
    assert reg["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    for p in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container_port(reg, reg[p]["httpGet"]["port"]) == reg_port
    svc = named(objs, "Service", REGISTRY)["spec"]["ports"][0]
    assert container_port(reg, svc["targetPort"]) == reg_port
    # The aggregator uploads to the registry Service.
    scheme = "https" if values["registry"]["tls"]["enabled"] else "http"
    assert env_of(sl)["FEDSSL_REGISTRY_URL"]["value"] == f"{scheme}://{REGISTRY}.{NAMESPACE}.svc:{svc['port']}"
    assert {reg[p]["httpGet"].get("scheme", "HTTP") for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {scheme.upper()}

    for d in supernodes(objs):
        c = main_container(d)
        health = arg_value(c["args"], "--health-server-address")
        host, port = health.rsplit(":", 1)
        assert host == "0.0.0.0"
        for probe in ("startupProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == int(port)
        # The Runtime API (ClientApp processes) is not reachable from outside the pod.
        assert arg_value(c["args"], "--host") == "127.0.0.1"
        assert int(arg_value(c["args"], "--port")) != int(port)


def test_ports_agree_with_the_images(scenario):
    """The Dockerfiles' EXPOSE, when they exist, is what the chart uses by default."""
    objs = render_scenario(scenario)
    for name, port in (("superlink", int(arg_value(superlink_containers(objs)[1]["args"], "--fleet-listen"))),
                       ("registry", int(env_of(main_container(named(objs, "Deployment", REGISTRY)))["FEDSSL_REGISTRY_PORT"]["value"]))):
        dockerfile = REPO_ROOT / "docker" / f"{name}.Dockerfile"
        if not dockerfile.exists():
            continue
        exposed = {int(p) for p in re.findall(r"^EXPOSE\s+(\d+)", dockerfile.read_text(), re.MULTILINE)}
        assert not exposed or port in exposed, f"{dockerfile.name} exposes {exposed}, the chart uses {port}"


# -------------------------------------------------------------------------------- references

REFERENCE_KEYS = ("existingSecret", "existingClaim", "claimName", "authSecret")


def _named_in_values(values, found=None) -> set[str]:
    """Names of objects the user provides (existingSecret, claimName, ...) in a value set."""
    found = set() if found is None else found
    if isinstance(values, dict):
        for k, v in values.items():
            if k in REFERENCE_KEYS and isinstance(v, str) and v:
                found.add(v)
            else:
                _named_in_values(v, found)
    elif isinstance(values, list):
        for v in values:
            _named_in_values(v, found)
    return found


def _references(objs: list[dict]) -> dict[str, set]:
    """Secrets (with keys), ConfigMaps and PVCs the pod specs use."""
    refs = {"Secret": set(), "ConfigMap": set(), "PersistentVolumeClaim": set()}
    for w in workloads(objs):
        spec = pod_spec(w)
        for c in containers(spec):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    refs["Secret"].add((ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]))
                if "configMapKeyRef" in ref:
                    refs["ConfigMap"].add((ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]))
            for e in c.get("envFrom", []):
                if "secretRef" in e:
                    refs["Secret"].add((e["secretRef"]["name"], None))
                if "configMapRef" in e:
                    refs["ConfigMap"].add((e["configMapRef"]["name"], None))
        for v in spec.get("volumes", []):
            if "secret" in v:
                for item in v["secret"].get("items", [{"key": None}]):
                    refs["Secret"].add((v["secret"]["secretName"], item["key"]))
            if "configMap" in v:
                for item in v["configMap"].get("items", [{"key": None}]):
                    refs["ConfigMap"].add((v["configMap"]["name"], item["key"]))
            if "persistentVolumeClaim" in v:
                refs["PersistentVolumeClaim"].add((v["persistentVolumeClaim"]["claimName"], None))
            for src in v.get("projected", {}).get("sources", []):
                for kind, key in (("secret", "Secret"), ("configMap", "ConfigMap")):
                    if kind in src:
                        for item in src[kind].get("items", [{"key": None}]):
                            refs[key].add((src[kind]["name"], item["key"]))
        for s in spec.get("imagePullSecrets", []):
            refs["Secret"].add((s["name"], None))
    return refs


def test_every_secret_configmap_and_claim_used_exists(scenario):
    objs = render_scenario(scenario)
    external = _named_in_values(scenario_values(scenario))
    for kind, used in _references(objs).items():
        rendered = {o["metadata"]["name"]: o for o in by_kind(objs, kind)}
        for name, key in used:
            if name in rendered:
                if key is not None:
                    data = {**rendered[name].get("data", {}), **rendered[name].get("stringData", {})}
                    assert key in data, f"{scenario}: {kind} {name} has no key {key!r} (has {sorted(data)})"
            else:
                assert name in external, f"{scenario}: {kind} {name} is used but neither rendered nor named in the values"


def test_nothing_rendered_is_left_unused(scenario):
    """Every PVC and Secret the chart creates is mounted or read by some pod."""
    objs = render_scenario(scenario)
    used = {kind: {name for name, _ in refs} for kind, refs in _references(objs).items()}
    for kind in ("PersistentVolumeClaim", "Secret", "ConfigMap"):
        for o in by_kind(objs, kind):
            if kind == "ConfigMap" and "grafana_dashboard" in o["metadata"].get("labels", {}):
                continue  # read by Grafana's sidecar
            assert o["metadata"]["name"] in used[kind], f"{scenario}: {kind} {o['metadata']['name']} is never used"


# ---------------------------------------------------------------------------------- security

def test_pods_and_containers_are_locked_down(scenario):
    objs = render_scenario(scenario)
    assert workloads(objs)
    for w in workloads(objs):
        spec, where = pod_spec(w), f"{scenario}: {w['kind']} {w['metadata']['name']}"
        assert spec["automountServiceAccountToken"] is False, where
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001 and psc["runAsGroup"] == 10001, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, f"{where}/{c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, f"{where}/{c['name']}"
            assert sc["runAsNonRoot"] is True and sc.get("privileged") is not True, f"{where}/{c['name']}"
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), f"{where}/{c['name']}"
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", f"{where}/{c['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"].get(kind, {})), f"{where}/{c['name']}: no {kind}"
            # The root filesystem is read-only: the image's writable paths come from volumes.
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            for path in ("/tmp", "/var/lib/fedssl"):
                assert path in mounts and not mounts[path].get("readOnly"), f"{where}/{c['name']}: {path} not writable"


def test_images_and_commands_follow_the_image_contract(scenario):
    objs, values = render_scenario(scenario), values_of(scenario)
    tag = values["image"]["tag"] or yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    expected = {"superlink": "superlink", "supernode": "supernode", "registry": "registry", "run": "superlink", "test": "superlink"}
    for w in workloads(objs):
        for c in containers(pod_spec(w)):
            image = expected[component(w)]
            assert re.fullmatch(rf"(.+/)?fedssl-{image}:{re.escape(tag)}", c["image"]), c["image"]
            assert c.get("command"), f"{w['metadata']['name']}/{c['name']}: the chart always sets the command"


_SECRET_NAME = re.compile(r"(TOKEN|PASSWORD|SECRET|_KEY)$")


def test_no_secret_value_in_a_configmap_env_literal_or_argument(scenario):
    objs = render_scenario(scenario)
    secrets: set[str] = set()
    for s in by_kind(objs, "Secret"):
        for k, v in s.get("data", {}).items():
            if k not in ("ca.crt", "tls.crt"):  # certificates are public
                secrets.add(base64.b64decode(v).decode())
        secrets.update(v for k, v in s.get("stringData", {}).items())
    kaggle = values_of(scenario)["kaggle"]
    secrets.update(v for v in (kaggle["username"], kaggle["key"]) if v)
    secrets = {s for s in secrets if len(s) >= 6}
    places: list[tuple[str, str]] = []
    for cm in by_kind(objs, "ConfigMap"):
        places += [(f"ConfigMap {cm['metadata']['name']}/{k}", v) for k, v in cm.get("data", {}).items()]
    for w in workloads(objs):
        for c in containers(pod_spec(w)):
            where = f"{w['metadata']['name']}/{c['name']}"
            for e in c.get("env", []):
                if "value" in e:
                    places.append((f"{where} env {e['name']}", str(e["value"])))
                    assert not (_SECRET_NAME.search(e["name"]) and e["value"]), f"{where}: {e['name']} is a literal"
            places += [(f"{where} args", a) for a in c.get("args", []) + c.get("command", [])]
    for where, text in places:
        for s in secrets:
            assert s not in text, f"{scenario}: a Secret's value appears in {where}"


def test_only_the_kaggle_download_sees_the_kaggle_credentials(scenario):
    objs, values = render_scenario(scenario), values_of(scenario)
    secret = values["kaggle"]["existingSecret"] or f"{RELEASE}-kaggle"
    sources = {h["name"]: h["data"]["source"] for h in values["hospitals"]}
    for w in workloads(objs):
        spec = pod_spec(w)
        for c in containers(spec):
            reads = any(e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == secret for e in c.get("env", []))
            kaggle_pod = component(w) == "supernode" and sources[pod_labels(w)["fedssl/hospital"]] == "kaggle"
            assert reads == (kaggle_pod and c["name"] in ("download-ham10000", "download-kaggle")), f"{w['metadata']['name']}/{c['name']}"
        assert not any(v.get("secret", {}).get("secretName") == secret for v in spec.get("volumes", []))
    assert bool(by_kind(objs, "Secret") and any(s["metadata"]["name"] == f"{RELEASE}-kaggle" for s in by_kind(objs, "Secret"))) \
        == ("kaggle" in sources.values() and not values["kaggle"]["existingSecret"])


def test_kaggle_hospitals_download_once_into_their_own_volume():
    objs = render_scenario("kaggle")
    for d in supernodes(objs):
        spec = pod_spec(d)
        hospital = pod_labels(d)["fedssl/hospital"]
        if pod_labels(d)["fedssl/data-source"] != "kaggle":
            assert "initContainers" not in spec
            continue
        init, main = spec["initContainers"][0], spec["containers"][0]
        assert init["command"] == [*TINI, "python", "-m", "fedssl_flower.data.kaggle"]
        assert init["name"] == "download-ham10000"
        assert init["args"] == ["/data/ham10000", "--dataset=kmader/skin-cancer-mnist-ham10000", "--format=ham10000"]
        config = _node_config(main)
        assert config["data-path"] == "/data/ham10000" and config["data-source"] == "ham10000"
        assert config["download"] is False  # the SuperNode itself never downloads
        data_volume = next(v for v in spec["volumes"] if v["name"] == "data")
        claim = data_volume["persistentVolumeClaim"]["claimName"]
        assert claim == f"{RELEASE}-{hospital}-data"
        named(objs, "PersistentVolumeClaim", claim)
        for c in (init, main):  # the same volume, at the parent of the dataset (atomic rename)
            assert {"name": "data", "mountPath": "/data"} in [{k: m[k] for k in ("name", "mountPath")} for m in c["volumeMounts"]]


def test_a_hospital_with_a_kaggle_dataset_downloads_it_and_trains_on_its_sub_path():
    """Kaggle beyond HAM10000 (issue 15): the init container gets the slug and the sub-path, the
    node config points at that sub-path as class folders; the download lands where
    `KaggleDataset.target_in` puts it, on the volume the SuperNode mounts."""
    from fedssl_flower.data import HospitalDataConfig
    from fedssl_flower.data.kaggle import parse_dataset

    objs = render_scenario("kaggle-folders")
    dataset = "masoudnickparvar/brain-tumor-mri-dataset"
    target = str(parse_dataset(dataset, "Training").target_in(Path("/data")))
    assert target == f"/data/kaggle/{dataset}"
    for d in supernodes(objs):
        spec = pod_spec(d)
        init, main = spec["initContainers"][0], spec["containers"][0]
        assert init["name"] == "download-kaggle"
        assert init["command"] == [*TINI, "python", "-m", "fedssl_flower.data.kaggle"]
        assert init["args"] == [target, f"--dataset={dataset}", "--format=imagefolder", "--path=Training"]
        config = _node_config(main)
        assert config["data-source"] == "imagefolder" and config["data-path"] == f"{target}/Training"
        assert config["partition-by"] == "random" and config["download"] is False
        assert HospitalDataConfig.from_node_config(config).data_path == f"{target}/Training"
        for c in (init, main):
            assert {"name": "data", "mountPath": "/data"} in [{k: m[k] for k in ("name", "mountPath")} for m in c["volumeMounts"]]
        assert "subPath" not in next(m for m in main["volumeMounts"] if m["name"] == "data")


@pytest.mark.parametrize("data, words", [
    ({"source": "kaggle", "kaggle": {"dataset": "brain-tumor-mri-dataset"}}, ["/hospitals/0/data/kaggle/dataset", "does not match pattern"]),
    ({"source": "kaggle", "kaggle": {"dataset": "a/b", "path": "../Training"}}, ["/hospitals/0/data/kaggle/path", "does not match pattern"]),
    ({"source": "kaggle", "kaggle": {"dataset": "a/b", "path": "/Training"}}, ["/hospitals/0/data/kaggle/path"]),
    ({"source": "kaggle", "kaggle": {"path": "Training"}}, ["/hospitals/0/data/kaggle", "dataset"]),
    ({"source": "kaggle", "kaggle": {"dataset": "a/b", "subPath": "x"}}, ["/hospitals/0/data/kaggle", "subPath"]),
    ({"source": "synthetic", "kaggle": {"dataset": "a/b"}}, ["/hospitals/0/data/source", "value must be 'kaggle'"]),
])
def test_a_bad_kaggle_dataset_is_refused_at_install_naming_the_field(tmp_path, data, words):
    values = tmp_path / "v.yaml"
    values.write_text(yaml.safe_dump({"kaggle": {"existingSecret": "k"},
                                      "hospitals": [{"name": "a", "sslTask": "simclr", "data": data}]}))
    proc = helm("template", RELEASE, str(CHART), "-f", str(values), check=False)
    assert proc.returncode != 0
    for w in words:
        assert w in proc.stderr, proc.stderr


# ------------------------------------------------------------------------ node and run config

def _node_config(container: dict) -> dict:
    from flwr.common.config import parse_config_args

    return parse_config_args([arg_value(container["args"], "--node-config")])


def test_node_config_is_what_the_hospital_code_reads(scenario):
    from fedssl_core import names
    from fedssl_flower.data import HospitalDataConfig

    objs, values = render_scenario(scenario), values_of(scenario)
    # The data keys, and what the ClientApp itself reads (client_app.py's docstring).
    known = {f.replace("_", "-") for f in HospitalDataConfig.__dataclass_fields__} | {"hospital", "ssl-task", "threads", "state-dir"}
    hospitals = {h["name"]: h for h in values["hospitals"]}
    for d in supernodes(objs):
        c = main_container(d)
        config = _node_config(c)
        h = hospitals[config["hospital"]]
        assert set(config) <= known, f"unknown node config keys {set(config) - known}"
        assert config["ssl-task"] == h["sslTask"] and config["ssl-task"] in names.SSL_TASKS
        parsed = HospitalDataConfig.from_node_config(config)  # types and values the code accepts
        assert 0 <= parsed.partition_id < parsed.num_partitions
        writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
        for key in ("cache-dir", "state-dir"):  # on a writable volume (the root filesystem is read-only)
            assert any(config[key].startswith(m + "/") for m in writable), f"{key}={config[key]} is not writable"
        if parsed.data_source != names.DATA_SYNTHETIC:
            mounts = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == "data"]
            assert any(config["data-path"] == m or config["data-path"].startswith(m + "/") for m in mounts), \
                f"{config['hospital']}: data-path {config['data-path']} is not on the data volume {mounts}"
        threads = config.get("threads")
        limit = (h.get("resources") or values["supernode"]["resources"]).get("limits", {}).get("cpu")
        if limit is not None:
            cpus = float(str(limit)[:-1]) / 1000 if str(limit).endswith("m") else float(limit)
            assert threads == max(1, -(-cpus // 1)), f"{config['hospital']}: threads {threads} for a CPU limit of {limit}"


def _hospital_values(tmp_path, data: dict, **more) -> Path:
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump({"kaggle": {"existingSecret": "k"},
                                 "hospitals": [{"name": "mri-a", "sslTask": "simclr", "data": data, **more}]}))
    return f


LABEL_MAP = {"pituitary tumor": "pituitary", "Normal": "notumor", "it's <meningioma> & \"co\"": "meningioma"}
CLASS_NAMES = ["glioma", "meningioma", "notumor", "pituitary", "o'clock tumor"]


@pytest.mark.parametrize("data", [
    {"source": "hostPath", "path": "/srv/mri", "format": "imagefolder"},
    {"source": "pvc", "claimName": "mri", "format": "imagefolder"},
    {"source": "kaggle", "kaggle": {"dataset": "masoudnickparvar/brain-tumor-mri-dataset", "path": "Training"}},
])
def test_a_hospitals_label_map_and_class_names_reach_its_data_loader(tmp_path, data):
    """data.labelMap and data.classNames come out of --node-config, as Flower reads it, as the
    label map and class list the hospital's loader parses (folder names with spaces and quotes)."""
    from fedssl_flower.data import HospitalDataConfig
    from fedssl_flower.data.labels import parse_class_names, parse_label_map

    values = _hospital_values(tmp_path, {**data, "labelMap": LABEL_MAP, "classNames": CLASS_NAMES})
    [d] = supernodes(render([values]))
    config = _node_config(main_container(d))
    assert config["data-source"] == "imagefolder"
    parsed = HospitalDataConfig.from_node_config(config)
    label_map = parse_label_map(parsed.label_map)
    assert label_map.common == LABEL_MAP and not label_map.per_hospital
    assert label_map.for_hospital("mri-a")["pituitary tumor"] == "pituitary"
    assert parse_class_names(parsed.class_names) == CLASS_NAMES


def test_a_label_map_sorts_a_hospitals_folders_into_the_shared_classes(tmp_path):
    """The rendered node config, loaded by the hospital's own code on folders named its way."""
    from fedssl_flower.data import HospitalDataConfig, imagefolder
    from fedssl_flower.data.labels import parse_class_names

    values = _hospital_values(tmp_path, {"source": "pvc", "claimName": "mri", "format": "imagefolder",
                                         "labelMap": {"pituitary tumor": "pituitary", "Normal": "notumor"},
                                         "classNames": ["glioma", "notumor", "pituitary"]})
    [d] = supernodes(render([values]))
    parsed = HospitalDataConfig.from_node_config(_node_config(main_container(d)))
    for folder in ("pituitary tumor", "Normal", "glioma"):
        (tmp_path / "mri" / folder).mkdir(parents=True)
        (tmp_path / "mri" / folder / "a.png").write_bytes(b"")
    cat = imagefolder.load_catalog(tmp_path / "mri", parsed.label_map, parse_class_names(parsed.class_names), parsed.hospital)
    assert cat.class_names == ["glioma", "notumor", "pituitary"]
    assert cat.folder_classes == {"pituitary tumor": "pituitary", "Normal": "notumor", "glioma": "glioma"}


def test_node_config_strings_with_quotes_reach_the_hospital_as_written(tmp_path):
    """hospitals[].nodeConfig strings are TOML literals on --node-config: a JSON label map (double
    quotes, spaces) arrives as written; a value holding both quote kinds fails naming the key."""
    from fedssl_flower.data import HospitalDataConfig
    from fedssl_flower.data.labels import parse_label_map

    data = {"source": "pvc", "claimName": "mri", "format": "imagefolder"}
    text = '{"pituitary tumor": "pituitary", "Normal": "notumor"}'
    [d] = supernodes(render([_hospital_values(tmp_path, data, nodeConfig={"label-map": text, "test-fraction": 0.25})]))
    config = _node_config(main_container(d))
    assert config["label-map"] == text and config["test-fraction"] == 0.25
    assert parse_label_map(HospitalDataConfig.from_node_config(config).label_map).common == {"pituitary tumor": "pituitary", "Normal": "notumor"}
    bad = _hospital_values(tmp_path, data, nodeConfig={"label-map": '{"it\'s": "x"}'})
    proc = helm("template", RELEASE, str(CHART), "-f", str(bad), check=False)
    assert proc.returncode != 0 and "hospital mri-a: nodeConfig.label-map" in proc.stderr, proc.stderr


@pytest.mark.parametrize("data, field, what", [
    ({"source": "synthetic", "labelMap": {"pituitary tumor": "pituitary"}}, "labelMap", "synthetic"),
    ({"source": "kaggle", "classNames": ["mel", "nv"]}, "classNames", "HAM10000"),
    ({"source": "pvc", "claimName": "c", "labelMap": {"melanoma": "mel"}}, "labelMap", "format ham10000"),
    ({"source": "hostPath", "path": "/srv/ham", "format": "ham10000", "labelMap": {"melanoma": "mel"}}, "labelMap", "format ham10000"),
])
def test_a_label_map_on_data_with_fixed_classes_fails_naming_the_hospital(tmp_path, data, field, what):
    proc = helm("template", RELEASE, str(CHART), "-f", str(_hospital_values(tmp_path, data)), check=False)
    assert proc.returncode != 0
    assert f"hospital mri-a: data.{field} is for class-per-folder data" in proc.stderr, proc.stderr
    assert "imagefolder" in proc.stderr and what in proc.stderr, proc.stderr


@pytest.mark.parametrize("data, more, message", [
    ({"labelMap": {"a": "b"}}, {"nodeConfig": {"label-map": "a=b"}}, "both data.labelMap and nodeConfig.label-map"),
    ({"labelMap": {"Normal": "notumor", "astro": "astrocytoma"}, "classNames": ["glioma", "notumor"]}, {},
     "data.labelMap maps to astrocytoma, which data.classNames (glioma, notumor) does not list"),
    ({"classNames": ["it's", 'a "b"']}, {}, "data.classNames"),
])
def test_label_map_and_class_names_that_cannot_work_fail_naming_the_hospital(tmp_path, data, more, message):
    values = _hospital_values(tmp_path, {"source": "pvc", "claimName": "c", "format": "imagefolder", **data}, **more)
    proc = helm("template", RELEASE, str(CHART), "-f", str(values), check=False)
    assert proc.returncode != 0 and "hospital mri-a" in proc.stderr and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("data, words", [
    ({"classNames": ["glioma", 3]}, ["/hospitals/0/data/classNames/1", "want string"]),
    ({"classNames": ["glioma", "glioma"]}, ["/hospitals/0/data/classNames", "equal"]),
    ({"classNames": ["glioma,pituitary"]}, ["/hospitals/0/data/classNames/0", "does not match pattern"]),
    ({"classNames": [" "]}, ["/hospitals/0/data/classNames/0", "does not match pattern"]),
    ({"classNames": "glioma,pituitary"}, ["/hospitals/0/data/classNames", "want array"]),
    ({"labelMap": {"Normal": 1}}, ["/hospitals/0/data/labelMap/Normal", "want string"]),
    ({"labelMap": {"Normal": ""}}, ["/hospitals/0/data/labelMap/Normal", "does not match pattern"]),
    ({"labelMap": ["Normal=notumor"]}, ["/hospitals/0/data/labelMap", "want object"]),
])
def test_schema_refuses_label_maps_and_class_lists_of_the_wrong_shape(tmp_path, data, words):
    values = _hospital_values(tmp_path, {"source": "pvc", "claimName": "c", "format": "imagefolder", **data})
    proc = helm("template", RELEASE, str(CHART), "-f", str(values), check=False)
    assert proc.returncode != 0
    for w in words:
        assert w in proc.stderr, proc.stderr


def test_hospitals_share_one_dataset_in_disjoint_partitions():
    objs = render_scenario("defaults")
    configs = [_node_config(main_container(d)) for d in supernodes(objs)]
    assert sorted(c["partition-id"] for c in configs) == [0, 1, 2]
    assert {c["num-partitions"] for c in configs} == {3}
    assert {c["ssl-task"] for c in configs} == {"simclr", "rotation"}


def _run_overrides(job: dict) -> dict:
    from fedssl_flower.submit import run_config_override
    from flwr.common.config import parse_config_args

    args = main_container(job)["args"]
    assert args[::2] == ["-c"] * (len(args) // 2)
    # What fedssl-submit hands to `flwr run --run-config`, parsed as Flower parses it.
    return parse_config_args([run_config_override(kv) for kv in args[1::2]])


def test_run_config_is_the_apps_config(scenario):
    from fedssl_flower.config import RunConfig

    objs, values = render_scenario(scenario), values_of(scenario)
    for job in by_kind(objs, "Job"):
        overrides = _run_overrides(job)
        assert set(overrides) <= set(APP_CONFIG), f"not in [tool.flwr.app.config]: {set(overrides) - set(APP_CONFIG)}"
        cfg = RunConfig.from_mapping({**APP_CONFIG, **overrides})  # validates types and ranges
        for key, value in values["run"]["config"].items():
            assert overrides[key] == value
        assert cfg.min_hospitals == values["run"]["config"].get("min-hospitals", min(2, len(values["hospitals"])))
        synthetic = any(h["data"]["source"] == "synthetic" for h in values["hospitals"])
        assert cfg.data_warning.startswith("SYNTHETIC DATA") == synthetic


def test_schema_knows_exactly_the_apps_run_config():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]["run"]["properties"]["config"]["properties"]) == set(APP_CONFIG)


def test_run_job_submits_with_the_script_from_its_configmap(scenario):
    objs = render_scenario(scenario)
    for job in by_kind(objs, "Job"):
        spec = pod_spec(job)
        assert spec["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
        c = main_container(job)
        assert c["command"] == [*TINI, "bash", "/etc/fedssl/run/run.sh"]
        volume = next(v for v in spec["volumes"] if v["name"] == "script")
        cm = named(objs, "ConfigMap", volume["configMap"]["name"])
        assert cm["data"]["run.sh"] == (CHART / "files" / "run.sh").read_text()
        assert env_of(c)["FEDSSL_APP_DIR"]["value"] == "/opt/fedssl/app"


def test_superlink_state_and_run_folders_persist(scenario):
    objs, values = render_scenario(scenario), values_of(scenario)
    sl_dep = named(objs, "Deployment", SUPERLINK)
    c = main_container(sl_dep)
    assert arg_value(c["args"], "--database") == "/var/lib/fedssl/superlink.db"
    assert env_of(c)["FEDSSL_RUNS_DIR"]["value"].startswith("/var/lib/fedssl/")
    assert "--disable-runtime-dependency-installation" in c["args"]
    state = next(v for v in pod_spec(sl_dep)["volumes"] if v["name"] == "state")
    assert ("persistentVolumeClaim" in state) == values["superlink"]["persistence"]["enabled"]


def _token_file_source(obj: dict) -> tuple[str, str] | None:
    """(Secret name, key) behind the container's FEDSSL_REGISTRY_TOKEN_FILE, None without one."""
    c = main_container(obj)
    path = env_of(c).get("FEDSSL_REGISTRY_TOKEN_FILE", {}).get("value")
    if path is None:
        return None
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(Path(path).parent))
    assert mount.get("readOnly") is True
    secret = next(v for v in pod_spec(obj)["volumes"] if v["name"] == mount["name"])["secret"]
    item = next(i for i in secret["items"] if i["path"] == Path(path).name)
    return secret["secretName"], item["key"]


def test_registry_token_is_a_mounted_file_only_where_it_is_needed(scenario):
    objs, values = render_scenario(scenario), values_of(scenario)
    secret = values["registry"]["auth"]["existingSecret"] or f"{REGISTRY}-token"
    holders = {}
    for w in workloads(objs):
        for c in containers(pod_spec(w)):
            assert "FEDSSL_REGISTRY_TOKEN" not in env_of(c), f"{w['metadata']['name']}: the token is an env var"
        if (source := _token_file_source(w)) is not None:
            holders[w["metadata"]["name"]] = source
    # The registry checks it, the aggregator (SuperLink) writes with it; nobody else holds it.
    assert holders == {REGISTRY: (secret, "token"), SUPERLINK: (secret, "token")}


def test_registry_env_names_are_settings_the_registry_reads(scenario):
    from fedssl_registry.core.config import Settings

    env = env_of(main_container(named(render_scenario(scenario), "Deployment", REGISTRY)))
    prefix = Settings.model_config["env_prefix"].upper()
    names = {k.removeprefix(prefix).lower() for k in env if k.startswith(prefix)}
    assert {"token_file", "max_infer_batch", "decode_workers", "model_loads_per_minute"} <= names
    assert names <= set(Settings.model_fields), names - set(Settings.model_fields)


def test_pods_holding_the_token_roll_when_it_changes():
    # Two separate renders (`render` caches by arguments, so the second one differs in a harmless value).
    first, second = render([SCENARIOS["defaults"]]), render([SCENARIOS["defaults"]], ["podAnnotations.render=second"])
    sums = []
    for objs in (first, second):
        token = named(objs, "Secret", f"{REGISTRY}-token")["data"]["token"]
        checksum = hashlib.sha256(token.encode()).hexdigest()
        for name in (REGISTRY, SUPERLINK):
            assert named(objs, "Deployment", name)["spec"]["template"]["metadata"]["annotations"]["checksum/registry-token"] == checksum
        sums.append(checksum)
    # `helm template` cannot look the stored token up, so each render makes a new one (values.yaml
    # tells GitOps users to set existingSecret); the checksum follows it into both pods.
    assert sums[0] != sums[1]


def test_registry_tls_serves_https_that_every_client_trusts():
    from cryptography import x509

    objs = render_scenario("registry-tls")
    svc = named(objs, "Service", REGISTRY)["spec"]["ports"][0]
    url = f"https://{REGISTRY}.{NAMESPACE}.svc:{svc['port']}"
    secret = named(objs, "Secret", f"{REGISTRY}-tls")
    files = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    cert, ca = x509.load_pem_x509_certificate(files["tls.crt"]), x509.load_pem_x509_certificate(files["ca.crt"])
    cert.verify_directly_issued_by(ca)
    dns = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    assert {f"{REGISTRY}.{NAMESPACE}.svc", "registry.fedssl.example.org"} <= dns

    reg_dep = named(objs, "Deployment", REGISTRY)
    reg = main_container(reg_dep)
    env = env_of(reg)
    mounts = {m["mountPath"]: m["name"] for m in reg["volumeMounts"]}
    for var, key in (("FEDSSL_REGISTRY_SSL_CERTFILE", "tls.crt"), ("FEDSSL_REGISTRY_SSL_KEYFILE", "tls.key")):
        path = Path(env[var]["value"])
        volume = next(v for v in pod_spec(reg_dep)["volumes"] if v["name"] == mounts[str(path.parent)])
        assert volume["secret"]["secretName"] == f"{REGISTRY}-tls" and {"key": key, "path": path.name} in volume["secret"]["items"]
    assert {reg[p]["httpGet"]["scheme"] for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {"HTTPS"}
    assert "checksum/tls" in reg_dep["spec"]["template"]["metadata"]["annotations"]

    # The aggregator, the run Job and the helm test pod dial HTTPS and trust the CA only (no key).
    clients = [named(objs, "Deployment", SUPERLINK), *by_kind(objs, "Job"), *by_kind(objs, "Pod")]
    assert len(clients) == 3
    for obj in clients:
        env = env_of(main_container(obj))
        assert env["FEDSSL_REGISTRY_URL"]["value"] == url
        _assert_ca_only(obj, main_container(obj), env["FEDSSL_REGISTRY_CA"]["value"])

    # Prometheus scrapes over HTTPS with the CA and, as /metrics follows readAuth, with the token.
    endpoint = by_kind(objs, "ServiceMonitor")[0]["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["serverName"] == f"{REGISTRY}.{NAMESPACE}.svc"
    assert endpoint["tlsConfig"]["ca"]["secret"] == {"name": f"{REGISTRY}-tls", "key": "ca.crt"}
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": f"{REGISTRY}-token", "key": "token"}}


def test_without_registry_tls_clients_dial_http_and_metrics_are_open_unless_read_auth():
    objs = render_scenario("servicemonitor")
    assert not [s for s in by_kind(objs, "Secret") if s["metadata"]["name"] == f"{REGISTRY}-tls"]
    for obj in (named(objs, "Deployment", SUPERLINK), *by_kind(objs, "Job")):
        env = env_of(main_container(obj))
        assert env["FEDSSL_REGISTRY_URL"]["value"].startswith("http://") and "FEDSSL_REGISTRY_CA" not in env
    endpoint = by_kind(objs, "ServiceMonitor")[0]["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "http" and "tlsConfig" not in endpoint and "authorization" not in endpoint


def test_supernode_authentication_keys_come_from_each_hospitals_secret():
    objs, values = render_scenario("tls-existing-secret"), values_of("tls-existing-secret")
    assert "--enable-supernode-auth" in main_container(named(objs, "Deployment", SUPERLINK))["args"]
    for d in supernodes(objs):
        h = next(x for x in values["hospitals"] if x["name"] == pod_labels(d)["fedssl/hospital"])
        key = arg_value(main_container(d)["args"], "--auth-supernode-private-key")
        volume = next(v for v in pod_spec(d)["volumes"] if v["name"] == "supernode-auth")
        assert volume["secret"] == {"secretName": h["authSecret"], "defaultMode": 0o440,
                                    "items": [{"key": "private-key", "path": Path(key).name}]}
    job = by_kind(objs, "Job")[0]
    keys = next(v for v in pod_spec(job)["volumes"] if v["name"] == "supernode-keys")
    # The Job gets the public halves only.
    assert [s["secret"]["items"] for s in keys["projected"]["sources"]] == \
        [[{"key": "public-key", "path": f"{h['name']}.pub"}] for h in values["hospitals"]]
    mount = next(m for m in main_container(job)["volumeMounts"] if m["name"] == "supernode-keys")
    assert env_of(main_container(job))["FEDSSL_SUPERNODE_KEYS"]["value"] == mount["mountPath"]


def test_supernode_authentication_is_on_by_default_with_generated_keys():
    """Defaults: every hospital gets a key pair of its own (a Secret the chart generates), its
    private key reaches its own pod only, and the run Job gets the public halves, which
    fedssl_flower.node_keys turns into the OpenSSH keys Flower reads."""
    from fedssl_flower import node_keys

    objs, values = render_scenario("defaults"), values_of("defaults")
    assert values["superlink"]["supernodeAuth"]["enabled"] is True
    assert "--enable-supernode-auth" in superlink_containers(objs)[0]["args"]
    secrets = {o["metadata"]["name"]: o for o in by_kind(objs, "Secret")}
    for d in supernodes(objs):
        hospital = pod_labels(d)["fedssl/hospital"]
        name = f"{RELEASE}-{hospital}"
        data = {k: base64.b64decode(v) for k, v in secrets[name]["data"].items()}
        assert b"-----BEGIN OPENSSH PRIVATE KEY-----" in node_keys.openssh_private_key(data["private-key"])
        assert node_keys.openssh_public_key(data["public-key"]).startswith(b"ecdsa-sha2-nistp256 ")
        for w in workloads(objs):  # the private key is in this hospital's pod and nowhere else
            uses = any(v.get("secret", {}).get("secretName") == name for v in pod_spec(w).get("volumes", []))
            assert uses is (w is d), (name, w["metadata"]["name"])
    job = by_kind(objs, "Job")[0]
    projected = next(v for v in pod_spec(job)["volumes"] if v["name"] == "supernode-keys")["projected"]["sources"]
    assert {s["secret"]["name"] for s in projected} == {f"{RELEASE}-{h['name']}" for h in values["hospitals"]}
    assert all(s["secret"]["items"][0]["key"] == "public-key" for s in projected)


def test_the_control_token_reaches_the_proxy_and_the_run_job_only_as_a_file(scenario):
    objs = render_scenario(scenario)
    token = f"{RELEASE}-control-token"
    holders = []
    for w in workloads(objs):
        spec = pod_spec(w)
        volumes = {v["name"] for v in spec.get("volumes", []) if v.get("secret", {}).get("secretName") == token}
        for c in containers(spec):
            assert token not in json.dumps(c.get("env", [])), f"{w['metadata']['name']}/{c['name']}: token in env"
            mounts = [m for m in c.get("volumeMounts", []) if m["name"] in volumes]
            if mounts:
                assert all(m.get("readOnly") for m in mounts)
                holders.append(f"{component(w)}/{c['name']}")
    jobs = by_kind(objs, "Job")
    assert sorted(holders) == sorted(["superlink/proxy"] + ["run/run"] * len(jobs))
    _, proxy = superlink_containers(objs)
    assert arg_value(proxy["args"], "--control-token-file") == "/etc/fedssl/control-token/token"
    for job in jobs:
        assert env_of(main_container(job))["FEDSSL_CONTROL_TOKEN_FILE"]["value"] == "/etc/fedssl/control-token/token"


def test_helm_test_pod_checks_the_registry_and_the_superlink(scenario):
    objs = render_scenario(scenario)
    pods = by_kind(objs, "Pod")
    assert len(pods) == 1 and pods[0]["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = main_container(pods[0])
    script = c["args"][0]
    assert "/v2/health/ready" in script and "/health" in script
    compile(script, "helm-test", "exec")
    env = env_of(c)
    scheme = "https" if values_of(scenario)["registry"]["tls"]["enabled"] else "http"
    assert env["FEDSSL_REGISTRY_URL"]["value"] == f"{scheme}://{REGISTRY}.{NAMESPACE}.svc:8080"


def test_observability_toggles():
    default_kinds = {o["kind"] for o in render_scenario("defaults")}
    assert "ServiceMonitor" not in default_kinds
    objs = render_scenario("servicemonitor")
    sm = by_kind(objs, "ServiceMonitor")[0]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"] == named(objs, "Service", REGISTRY)["spec"]["selector"]
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["port"] == named(objs, "Service", REGISTRY)["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"
    dash = next(c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("grafana-dashboard"))
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(dash["data"]["fedssl.json"])
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    from fedssl_registry.core.observability import Metrics

    metric_names = {m.name for m in Metrics().registry.collect()}
    used = set(re.findall(r"\b(fedssl_[a-z_]+?)(?:_bucket|_sum|_count)?\{", exprs))
    assert used and used <= metric_names | {n + "_total" for n in metric_names}, used - metric_names


# ---------------------------------------------------------------------------- NetworkPolicy

def _selects(selector: dict, labels: dict) -> bool:
    if selector.get("matchExpressions"):
        raise NotImplementedError("matchExpressions")
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_matches(peer: dict, policy_ns: str, pod: tuple[str, dict]) -> bool:
    ns, labels = pod
    if "ipBlock" in peer:
        return False  # pod addresses are never in the chart's ipBlocks (private ranges excluded)
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": ns}):
            return False
    elif ns != policy_ns:
        return False
    return _selects(peer.get("podSelector", {}), labels)


def _port_ok(rule: dict, port: int) -> bool:
    return not rule.get("ports") or any(p.get("port") == port for p in rule["ports"])


def allowed(objs: list[dict], src: tuple[str, dict], dst: tuple[str, dict], port: int) -> bool:
    """Whether the rendered NetworkPolicies let `src` open a TCP connection to `dst`:`port`."""
    def applying(pod, direction):
        return [p for p in by_kind(objs, "NetworkPolicy") if p["metadata"]["namespace"] == pod[0]
                and _selects(p["spec"]["podSelector"], pod[1]) and direction in p["spec"]["policyTypes"]]
    egress = applying(src, "Egress")
    ok_out = not egress or any(_port_ok(r, port) and (not r.get("to") or any(_peer_matches(peer, p["metadata"]["namespace"], dst) for peer in r["to"]))
                               for p in egress for r in p["spec"].get("egress", []))
    ingress = applying(dst, "Ingress")
    ok_in = not ingress or any(_port_ok(r, port) and (not r.get("from") or any(_peer_matches(peer, p["metadata"]["namespace"], src) for peer in r["from"]))
                               for p in ingress for r in p["spec"].get("ingress", []))
    return ok_out and ok_in


def _pods(objs: list[dict]) -> dict[str, tuple[str, dict]]:
    pods = {}
    for w in workloads(objs):
        key = pod_labels(w).get("fedssl/hospital") or component(w)
        pods[key] = (w["metadata"]["namespace"], pod_labels(w))
    return pods


def test_network_policies_cover_every_pod(scenario):
    objs, values = render_scenario(scenario), values_of(scenario)
    policies = by_kind(objs, "NetworkPolicy")
    if not values["networkPolicy"]["enabled"]:
        assert not policies
        return
    for name, pod in _pods(objs).items():
        for direction in ("Ingress", "Egress"):
            assert any(_selects(p["spec"]["podSelector"], pod[1]) and direction in p["spec"]["policyTypes"] for p in policies), \
                f"{scenario}: no {direction} policy for {name}"
    for p in policies:  # no policy selects nothing (a typo in a selector)
        assert any(_selects(p["spec"]["podSelector"], pod[1]) for pod in _pods(objs).values()), p["metadata"]["name"]


@pytest.mark.parametrize("name", ["defaults", "kaggle", "servicemonitor", "tls-existing-secret", "gke"])
def test_who_may_talk_to_whom(name):
    objs, values = render_scenario(name), values_of(name)
    pods = _pods(objs)
    sl_port, reg_port, health = values["superlink"]["port"], values["registry"]["port"], values["supernode"]["healthPort"]
    control = values["superlink"]["controlPort"]
    hospitals = [h["name"] for h in values["hospitals"]]
    stranger = (NAMESPACE, {"app": "something-else"})
    elsewhere = ("other", pods["superlink"][1])  # a look-alike pod in another namespace
    superlink, registry = pods["superlink"], pods["registry"]
    for h in hospitals:
        assert allowed(objs, pods[h], superlink, sl_port), f"{h} cannot reach the SuperLink"
        assert not allowed(objs, pods[h], superlink, control), f"{h} reaches the control listener"
        assert not allowed(objs, pods[h], registry, reg_port), f"{h} reaches the registry"
        for other in hospitals:
            assert not allowed(objs, pods[h], pods[other], health), f"{h} reaches {other}"
        assert not allowed(objs, stranger, pods[h], health)
    assert allowed(objs, pods["run"], superlink, control) and allowed(objs, pods["run"], registry, reg_port)
    assert not allowed(objs, pods["run"], superlink, sl_port)  # the run Job needs the control listener only
    assert not allowed(objs, pods["test"], superlink, control)
    for port in (sl_port, control):  # the SuperLink's own port is on loopback: no policy names it
        assert values["superlink"]["internalPort"] != port
    assert allowed(objs, superlink, registry, reg_port)
    assert allowed(objs, pods["test"], superlink, sl_port) and allowed(objs, pods["test"], registry, reg_port)
    assert not allowed(objs, registry, superlink, sl_port)
    for outsider in (stranger, elsewhere):
        assert not allowed(objs, outsider, superlink, sl_port)
        assert not allowed(objs, outsider, superlink, control)
        assert not allowed(objs, outsider, registry, reg_port)
    prometheus = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    assert allowed(objs, prometheus, registry, reg_port) == values["metrics"]["serviceMonitor"]["enabled"]
    # Only Kaggle hospitals may leave the cluster, over HTTPS, for the download.
    for h in values["hospitals"]:
        leaves = [r for p in by_kind(objs, "NetworkPolicy") if _selects(p["spec"]["podSelector"], pods[h["name"]][1])
                  for r in p["spec"].get("egress", []) for peer in r.get("to", []) if "ipBlock" in peer]
        assert bool(leaves) == (h["data"]["source"] == "kaggle"), h["name"]
        assert all(r["ports"] == [{"port": 443, "protocol": "TCP"}] for r in leaves)


# ---------------------------------------------------------------------------- TLS certificate

def tls_files(objs: list[dict]) -> dict[str, bytes]:
    secret = named(objs, "Secret", f"{SUPERLINK}-tls")
    assert secret["type"] == "kubernetes.io/tls"
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def test_generated_certificate_names_the_service_and_loopback():
    import ipaddress

    from cryptography import x509

    objs = render([], ["superlink.tls.extraDnsNames={fedssl.example.org}"])
    files = tls_files(objs)
    cert = x509.load_pem_x509_certificate(files["tls.crt"])
    ca = x509.load_pem_x509_certificate(files["ca.crt"])
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns, ips = set(sans.get_values_for_type(x509.DNSName)), set(sans.get_values_for_type(x509.IPAddress))
    dialled = {arg_value(main_container(d)["args"], "--superlink").rsplit(":", 1)[0] for d in supernodes(objs)}
    assert dialled and dialled <= dns
    assert {SUPERLINK, f"{SUPERLINK}.{NAMESPACE}", f"{SUPERLINK}.{NAMESPACE}.svc.cluster.local", "fedssl.example.org"} <= dns
    # The SuperLink starts the ServerApp's SuperExec against 127.0.0.1 with this CA.
    assert ipaddress.ip_address("127.0.0.1") in ips
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 3600 <= days <= 3660


def test_long_release_names_still_give_valid_names(tmp_path):
    values = tmp_path / "v.yaml"
    values.write_text(yaml.safe_dump({"hospitals": [{"name": "h" * 20, "sslTask": "simclr", "partition": 0,
                                                     "data": {"source": "synthetic"}}]}))
    release = "a-very-long-release-name-for-a-federated-study-abcdef"  # 53 characters (helm's most), no "fedssl"
    objs = render([values], release=release)
    from kubernetes_validate import utils

    for o in objs:
        if o["apiVersion"] != "monitoring.coreos.com/v1":
            utils.validate(o, KUBERNETES_VERSIONS[0], strict=True)
        assert len(o["metadata"]["name"]) <= 63, o["metadata"]["name"]
        for value in list(o["metadata"].get("labels", {}).values()) + list(pod_labels(o).values() if pod_spec(o) else []):
            assert len(str(value)) <= 63, value


def test_no_service_links_in_any_pod(scenario):
    """Service links would put FEDSSL_REGISTRY_PORT=tcp://... (from the Service
    `fedssl-registry`) into every pod: the registry's own setting, with a value it cannot read."""
    for w in workloads(render_scenario(scenario)):
        assert pod_spec(w)["enableServiceLinks"] is False, w["metadata"]["name"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_container_runs_under_tini_as_pid_1(scenario):
    objs = render_scenario(scenario)
    for obj in objs:
        spec = pod_spec(obj)
        if spec is None:
            continue
        for c in containers(spec):
            if c.get("image", "").split("/")[-1].startswith("fedssl-"):
                assert c.get("command", [])[:2] == TINI, (obj["metadata"]["name"], c["name"], c.get("command"))

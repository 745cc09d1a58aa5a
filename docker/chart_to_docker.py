"""Turn the Helm chart's rendered manifests into `docker run` arguments, for the image smoke test.

Each container the chart would run becomes one `docker run` argument list with the same
image, command (Kubernetes `command` replaces the image ENTRYPOINT, `args` its CMD), arguments,
environment (Secret and ConfigMap references resolved from the rendered objects), volumes and
security context (user/group, read-only root, dropped capabilities, no privilege escalation,
CPU/memory limits). Services become network aliases (`svc`, `svc.ns`, `svc.ns.svc`,
`svc.ns.svc.<domain>`), so the containers find each other by the names the chart gives them.

    helm template smoke charts/fedssl -n fedssl -f values.yaml \\
      | python docker/chart_to_docker.py --prefix p --network n --out DIR [--publish registry=8080]

DIR receives:
  workloads.tsv   kind, workload, container, probe, args file; kinds: init (run to completion
                  before its pod's main container), deployment (detached), job, test (helm
                  test hooks), in start order. probe: "http|https PORT PATH", "tcp PORT" or "none".
  args/*.args     the `docker run` arguments, NUL-separated
  env/*.env       each container's environment (docker --env-file; mode 0600)
  files/          Secret and ConfigMap volumes, materialised for read-only bind mounts
  volumes.tsv     named volumes to create first: name, "tmpfs" (an emptyDir) or "disk" (a
                  PersistentVolumeClaim), size in bytes (0 = unbounded)

Kubernetes features a Docker network cannot imitate are refused with a message, not skipped:
multi-container pods, subPath on named volumes, unknown volume or env sources. NetworkPolicies,
probes' timing and restart policies are not imitated (the smoke test waits on the probes).
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys
from pathlib import Path

import yaml

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


class Unsupported(ValueError):
    """The manifests use something this translation cannot run faithfully."""


def quantity_bytes(q: str | int) -> int:
    text = str(q)
    for suffix, factor in sorted(_UNITS.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(float(text))


def quantity_cpus(q: str | float) -> str:
    text = str(q)
    value = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    return f"{value:g}"


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values, command and args ($$ escapes)."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text.replace("$$", "\0")).replace("\0", "$")


def pod_spec(obj: dict) -> dict | None:
    kind = obj.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    if kind == "Pod":
        return obj["spec"]
    return None


class Translator:
    def __init__(self, objs: list[dict], prefix: str, network: str, out: Path, domain: str, publish: dict[str, int]):
        self.objs, self.prefix, self.network, self.out, self.domain, self.publish = objs, prefix, network, out, domain, publish
        self.secrets: dict[str, dict[str, bytes]] = {}
        self.configmaps: dict[str, dict[str, bytes]] = {}
        for o in objs:
            name = o["metadata"]["name"]
            if o["kind"] == "Secret":
                data = {k: base64.b64decode(v) for k, v in (o.get("data") or {}).items()}
                data |= {k: str(v).encode() for k, v in (o.get("stringData") or {}).items()}
                self.secrets[name] = data
            elif o["kind"] == "ConfigMap":
                data = {k: str(v).encode() for k, v in (o.get("data") or {}).items()}
                data |= {k: base64.b64decode(v) for k, v in (o.get("binaryData") or {}).items()}
                self.configmaps[name] = data
        self.services = [o for o in objs if o["kind"] == "Service"]
        self.volumes: dict[str, tuple[str, int]] = {}
        self.rows: list[tuple[str, str, str, str, str]] = []

    # ------------------------------------------------------------------ lookups
    def secret_key(self, name: str, key: str) -> bytes:
        if name not in self.secrets:
            raise Unsupported(f"Secret {name!r} is not among the rendered objects (an existingSecret?); "
                              "the smoke test needs the chart to generate it")
        if key not in self.secrets[name]:
            raise Unsupported(f"Secret {name!r} has no key {key!r}")
        return self.secrets[name][key]

    def configmap_key(self, name: str, key: str) -> bytes:
        if name not in self.configmaps or key not in self.configmaps[name]:
            raise Unsupported(f"ConfigMap {name!r} key {key!r} is not among the rendered objects")
        return self.configmaps[name][key]

    def aliases(self, obj: dict, pod_labels: dict, container: dict) -> list[str]:
        # Every container of the pod shares its network (a sidecar's ports are the pod's).
        ports = {p.get("name"): p["containerPort"] for c in pod_spec(obj)["containers"] for p in c.get("ports") or []}
        names = []
        for svc in self.services:
            selector = svc["spec"].get("selector") or {}
            if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
                continue
            for p in svc["spec"].get("ports") or []:
                target = p.get("targetPort", p["port"])
                target = ports.get(target, target) if isinstance(target, str) else target
                if target != p["port"]:
                    raise Unsupported(f"Service {svc['metadata']['name']} maps port {p['port']} to {target}; "
                                      "a Docker network alias cannot remap ports")
            name = svc["metadata"]["name"]
            ns = svc["metadata"].get("namespace") or obj["metadata"].get("namespace") or "default"
            names += [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.{self.domain}"]
        return names

    # ------------------------------------------------------------------ pieces of docker run
    def env(self, obj: dict, container: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for src in container.get("envFrom") or []:
            pre = src.get("prefix", "")
            if "secretRef" in src:
                env |= {pre + k: v.decode() for k, v in self.secrets.get(src["secretRef"]["name"], {}).items()}
            elif "configMapRef" in src:
                env |= {pre + k: v.decode() for k, v in self.configmaps.get(src["configMapRef"]["name"], {}).items()}
            else:
                raise Unsupported(f"envFrom source {src}")
        for e in container.get("env") or []:
            if "value" in e or "valueFrom" not in e:
                env[e["name"]] = expand(str(e.get("value", "")), env)
                continue
            ref = e["valueFrom"]
            if "secretKeyRef" in ref:
                env[e["name"]] = self.secret_key(ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]).decode()
            elif "configMapKeyRef" in ref:
                env[e["name"]] = self.configmap_key(ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]).decode()
            elif "fieldRef" in ref:
                field = ref["fieldRef"]["fieldPath"]
                known = {"metadata.name": obj["metadata"]["name"], "metadata.namespace": obj["metadata"].get("namespace", "default"),
                         "spec.nodeName": "docker", "status.podIP": "", "spec.serviceAccountName": ""}
                if field not in known:
                    raise Unsupported(f"env {e['name']}: fieldRef {field}")
                env[e["name"]] = known[field]
            else:
                raise Unsupported(f"env {e['name']}: valueFrom {list(ref)}")
        for k, v in env.items():
            if "\n" in v:
                raise Unsupported(f"env {k} holds a newline, which docker --env-file cannot pass")
        return env

    def materialise(self, where: str, kind: str, name: str, data: dict[str, bytes], items: list | None, mode: int) -> Path:
        """The files one volume of one pod sees (only its `items`, when it names them)."""
        root = self.out / "files" / where
        if root.exists():
            return root
        root.mkdir(parents=True)
        for d in (root, *root.parents):
            if d == self.out:
                break
            os.chmod(d, 0o755)
        chosen = [(i["key"], i["path"], i.get("mode", mode)) for i in items] if items else [(k, k, mode) for k in data]
        for key, rel, file_mode in chosen:
            if key not in data:
                raise Unsupported(f"{kind} {name} has no key {key!r}")
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[key])
            # Kubernetes gives the files to the pod's fsGroup; here: readable by the container user.
            os.chmod(path, file_mode | 0o444)
        return root

    def mounts(self, obj: dict, spec: dict, container: dict) -> list[str]:
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        wname = obj["metadata"]["name"]
        args: list[str] = []
        for m in container.get("volumeMounts") or []:
            v = volumes.get(m["name"])
            if v is None:
                raise Unsupported(f"{wname}: volumeMount {m['name']} has no volume")
            ro = ",readonly" if m.get("readOnly") else ""
            sub = m.get("subPath", "")
            if "emptyDir" in v or "persistentVolumeClaim" in v:
                if sub:
                    raise Unsupported(f"{wname}: subPath {sub!r} on a {list(v)[1]} volume")
                if "emptyDir" in v:  # pod-local scratch: a tmpfs volume shared by the pod's containers, mode 1777 like emptyDir
                    vol = f"{self.prefix}-{wname}-{m['name']}"[:200]
                    size = (v["emptyDir"] or {}).get("sizeLimit")
                    self.volumes[vol] = ("tmpfs", quantity_bytes(size) if size else 0)
                else:
                    vol = f"{self.prefix}-pvc-{v['persistentVolumeClaim']['claimName']}"[:200]
                    self.volumes[vol] = ("disk", 0)
                    ro = ",readonly" if (m.get("readOnly") or v["persistentVolumeClaim"].get("readOnly")) else ""
                args += ["--mount", f"type=volume,src={vol},dst={m['mountPath']}{ro}"]
                continue
            if "hostPath" in v:
                src = Path(v["hostPath"]["path"])
            elif "secret" in v:
                s = v["secret"]
                data = self.secrets.get(s["secretName"])
                if data is None:
                    raise Unsupported(f"{wname}: Secret {s['secretName']!r} is not among the rendered objects")
                src = self.materialise(f"{wname}/{m['name']}", "Secret", s["secretName"], data, s.get("items"), s.get("defaultMode", 0o644))
            elif "projected" in v and all(set(src) == {"secret"} for src in v["projected"]["sources"]):
                # Secrets projected into one folder (the run Job's hospital public keys).
                merged: dict[str, bytes] = {}
                items = []
                for i, src in enumerate(v["projected"]["sources"]):
                    sec = src["secret"]
                    data = self.secrets.get(sec["name"])
                    if data is None:
                        raise Unsupported(f"{wname}: Secret {sec['name']!r} is not among the rendered objects")
                    for it in sec.get("items") or [{"key": k, "path": k} for k in data]:
                        if it["key"] not in data:
                            raise Unsupported(f"Secret {sec['name']} has no key {it['key']!r}")
                        merged[f"{i}/{it['key']}"] = data[it["key"]]
                        items.append({"key": f"{i}/{it['key']}", "path": it["path"]})
                src = self.materialise(f"{wname}/{m['name']}", "projected Secrets", m["name"], merged, items,
                                       v["projected"].get("defaultMode", 0o644))
            elif "configMap" in v:
                c = v["configMap"]
                data = self.configmaps.get(c["name"])
                if data is None:
                    raise Unsupported(f"{wname}: ConfigMap {c['name']!r} is not among the rendered objects")
                src = self.materialise(f"{wname}/{m['name']}", "ConfigMap", c["name"], data, c.get("items"), c.get("defaultMode", 0o644))
            else:
                raise Unsupported(f"{wname}: volume {m['name']} of kind {[k for k in v if k != 'name']}")
            if sub:
                src = src / sub
            if not src.exists():
                raise Unsupported(f"{wname}: {src} (volume {m['name']}) does not exist on this host")
            args += ["--mount", f"type=bind,src={src},dst={m['mountPath']}{ro}"]
        return args

    @staticmethod
    def security(spec: dict, container: dict) -> list[str]:
        psc, csc = spec.get("securityContext") or {}, container.get("securityContext") or {}
        merged = {**psc, **csc}
        args: list[str] = []
        if merged.get("privileged"):
            raise Unsupported("privileged containers")
        user, group = merged.get("runAsUser"), merged.get("runAsGroup")
        if user is not None:
            args += ["--user", f"{user}:{group}" if group is not None else str(user)]
        if psc.get("fsGroup") is not None and psc.get("fsGroup") != group:
            args += ["--group-add", str(psc["fsGroup"])]
        for g in psc.get("supplementalGroups") or []:
            args += ["--group-add", str(g)]
        if merged.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        caps = merged.get("capabilities") or {}
        args += [a for c in caps.get("drop") or [] for a in ("--cap-drop", c)]
        args += [a for c in caps.get("add") or [] for a in ("--cap-add", c)]
        if merged.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        return args

    @staticmethod
    def limits(container: dict) -> list[str]:
        lim = (container.get("resources") or {}).get("limits") or {}
        args = []
        if "cpu" in lim:
            args += ["--cpus", quantity_cpus(lim["cpu"])]
        if "memory" in lim:
            mem = str(quantity_bytes(lim["memory"]))
            args += ["--memory", mem, "--memory-swap", mem]
        return args

    @staticmethod
    def probe(container: dict) -> str:
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
        p = container.get("readinessProbe") or container.get("startupProbe") or container.get("livenessProbe")
        if not p:
            return "none"
        if "httpGet" in p:
            port = p["httpGet"]["port"]
            port = ports.get(port, port)
            return f"{p['httpGet'].get('scheme', 'HTTP').lower()} {port} {p['httpGet'].get('path', '/')}"
        for kind in ("tcpSocket", "grpc"):
            if kind in p:
                port = p[kind]["port"]
                return f"tcp {ports.get(port, port)}"
        return "none"

    # ------------------------------------------------------------------ one container
    def container(self, obj: dict, spec: dict, c: dict, kind: str, labels: dict, pod: str | None = None) -> None:
        """`pod`: the Docker container whose network this one joins (a sidecar of a Deployment)."""
        wname = obj["metadata"]["name"]
        cname = f"{self.prefix}-{wname}" if kind != "init" and not pod else f"{self.prefix}-{wname}-{c['name']}"
        env = self.env(obj, c)
        env_file = self.out / "env" / f"{cname}.env"
        env_file.parent.mkdir(parents=True, exist_ok=True)
        env_file.touch(mode=0o600)
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        if pod:  # a sidecar: the pod's network namespace (127.0.0.1 is shared), no names of its own
            args = ["--name", cname, "--network", f"container:{pod}", "--label", f"fedssl-smoke={self.prefix}", "--detach"]
        else:
            args = ["--name", cname, "--hostname", wname[:63], "--network", self.network, "--label", f"fedssl-smoke={self.prefix}"]
        if kind == "deployment" and not pod:
            args.append("--detach")
            args += [a for alias in self.aliases(obj, labels, c) for a in ("--network-alias", alias)]
            for suffix, port in self.publish.items():
                if wname.endswith(suffix) and any(p["containerPort"] == port for p in c.get("ports") or []):
                    args += ["-p", f"127.0.0.1::{port}"]
        args += self.security(spec, c) + self.limits(c) + self.mounts(obj, spec, c) + ["--env-file", str(env_file)]
        if c.get("workingDir"):
            args += ["--workdir", c["workingDir"]]
        command = [expand(str(a), env) for a in c.get("command") or []]
        rest = [expand(str(a), env) for a in c.get("args") or []]
        if command:  # Kubernetes `command` replaces the image's ENTRYPOINT
            args += ["--entrypoint", command[0]]
            rest = command[1:] + rest
        args += [c["image"], *rest]
        args_file = self.out / "args" / f"{cname}.args"
        args_file.parent.mkdir(parents=True, exist_ok=True)
        args_file.write_bytes(b"\0".join(a.encode() for a in args) + b"\0")
        workload = f"{wname}/{c['name']}" if pod else wname
        self.rows.append((kind, workload, cname, self.probe(c) if kind == "deployment" else "none", str(args_file)))

    def run(self) -> None:
        groups: dict[str, list[tuple[dict, dict]]] = {"deployment": [], "job": [], "test": []}
        for o in self.objs:
            spec = pod_spec(o)
            if spec is None:
                continue
            hooks = (o["metadata"].get("annotations") or {}).get("helm.sh/hook", "")
            kind = "test" if "test" in hooks else ("job" if o["kind"] in ("Job", "Pod") else "deployment")
            if o["kind"] == "Deployment" and o["spec"].get("replicas", 1) == 0:
                continue
            groups[kind].append((o, spec))
        for kind, items in groups.items():
            for o, spec in items:
                if len(spec["containers"]) != 1 and kind != "deployment":
                    raise Unsupported(f"{o['metadata']['name']}: {len(spec['containers'])} containers in one pod")
                labels = (o["spec"].get("template") or {}).get("metadata", {}).get("labels") or o["metadata"].get("labels") or {}
                for init in spec.get("initContainers") or []:
                    self.container(o, spec, init, "init", labels)
                first, *sidecars = spec["containers"]
                self.container(o, spec, first, kind, labels)
                for c in sidecars:  # started after the first, in its network namespace
                    self.container(o, spec, c, kind, labels, pod=f"{self.prefix}-{o['metadata']['name']}")
        (self.out / "workloads.tsv").write_text("".join("\t".join(r) + "\n" for r in self.rows))
        (self.out / "volumes.tsv").write_text("".join(f"{n}\t{k}\t{s}\n" for n, (k, s) in self.volumes.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifests", nargs="?", default="-", help="rendered manifests (default: stdin)")
    p.add_argument("--prefix", required=True, help="prefix of container and volume names")
    p.add_argument("--network", required=True, help="the Docker network")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--cluster-domain", default="cluster.local")
    p.add_argument("--publish", action="append", default=[], metavar="SUFFIX=PORT",
                   help="publish PORT on 127.0.0.1 for the Deployment whose name ends with SUFFIX")
    args = p.parse_args(argv)
    text = sys.stdin.read() if args.manifests == "-" else Path(args.manifests).read_text()
    objs = [o for o in yaml.safe_load_all(text) if isinstance(o, dict) and o.get("kind")]
    publish = {}
    for item in args.publish:
        suffix, _, port = item.partition("=")
        publish[suffix] = int(port)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        Translator(objs, args.prefix, args.network, args.out, args.cluster_domain, publish).run()
    except Unsupported as exc:
        print(f"chart_to_docker.py: cannot run this chart on Docker: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

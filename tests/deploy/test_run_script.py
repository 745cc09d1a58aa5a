"""The chart's processes run for real, as their pods would run them: the run Job's script
(charts/fedssl/files/run.sh, from the rendered ConfigMap and with the Job's environment),
and the SuperLink and a SuperNode started with the rendered arguments and the chart's
generated certificate. Only paths and addresses are mapped onto this machine."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port
from tests.deploy.conftest import arg_value, by_kind, env_of, named, pod_spec, render
from tests.support.http import QuietHandler, serve
from tests.support.processes import Cluster, base_env

VENV_BIN = Path(sys.executable).parent
SUPERLINK = "fedssl-superlink"


class _Ok(QuietHandler):
    def do_GET(self):
        self.reply(200, b'{"ready": true}')


@pytest.fixture
def http_ok():
    """A server answering 200 to every GET (stands in for a healthy registry)."""
    with serve(_Ok) as url:
        yield url


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def job_parts(objs: list[dict], tmp: Path) -> tuple[Path, list[str], dict[str, str]]:
    """The Job's script (from its ConfigMap), arguments and literal environment."""
    job = by_kind(objs, "Job")[0]
    c = pod_spec(job)["containers"][0]
    script = tmp / "run.sh"
    script.write_text(named(objs, "ConfigMap", "fedssl-run")["data"]["run.sh"])
    env = {k: e["value"] for k, e in env_of(c).items() if "value" in e}
    return script, c["args"], env


def run_script(script: Path, args: list[str], env: dict[str, str], path_prefix: Path, timeout=120):
    full = base_env(**env)
    full["PATH"] = f"{path_prefix}:{VENV_BIN}:/usr/bin:/bin"
    full["TMPDIR"] = str(script.parent)
    return subprocess.run(["bash", str(script), *args], env=full, capture_output=True, text=True, timeout=timeout, check=False)


def test_run_script_waits_stops_old_runs_and_hands_over_to_fedssl_submit(tmp_path, http_ok):
    script, args, env = job_parts(render(), tmp_path)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls"
    # flwr: two runs on the SuperLink, one still going; fedssl-submit: records and fails like a failed run.
    _stub(stubs, "flwr", f'''echo "flwr $*" >> {calls}
if [ "$1" = ls ]; then echo '{{"success": true, "runs": [{{"run-id": "7", "status": "running"}}, {{"run-id": "6", "status": "finished:completed"}}]}}'; fi
''')
    _stub(stubs, "fedssl-submit", f'echo "fedssl-submit $*" >> {calls}; exit 3\n')
    token = tmp_path / "control-token"
    token.write_text("t" * 40)
    env.update(FEDSSL_SUPERLINK=http_ok.removeprefix("http://"), FEDSSL_SUPERLINK_CA="", FEDSSL_REGISTRY_URL=http_ok,
               FEDSSL_CONTROL_TOKEN_FILE=str(token))
    proc = run_script(script, args, env, stubs)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # the run's failure is the Job's
    lines = calls.read_text().splitlines()
    assert "flwr stop 7 fedssl" in lines and not any(" 6 " in ln for ln in lines if ln.startswith("flwr stop"))
    submit = next(ln for ln in lines if ln.startswith("fedssl-submit"))
    assert f"--superlink {env['FEDSSL_SUPERLINK']} --app /opt/fedssl/app" in submit
    assert "--root-certificates" not in submit
    assert submit.endswith(" ".join(args))
    config = (tmp_path / "flwr-cli" / "config.toml").read_text()
    assert f'address = "{env["FEDSSL_SUPERLINK"]}"' in config and "insecure = true" in config
    assert "[fedssl] stopping run 7" in proc.stdout


def test_run_script_gives_up_when_a_service_never_answers(tmp_path, http_ok):
    script, args, env = job_parts(render(), tmp_path)
    env.update(FEDSSL_SUPERLINK=http_ok.removeprefix("http://"), FEDSSL_SUPERLINK_CA="",
               FEDSSL_REGISTRY_URL=f"http://127.0.0.1:{free_port()}", FEDSSL_WAIT_SECONDS="1")
    proc = run_script(script, args, env, tmp_path)
    assert proc.returncode != 0
    assert "/v2/health/ready did not answer within 1s" in proc.stderr


# ------------------------------------------------------------- real SuperLink and SuperNode

def _ecdsa_ssh_keys(folder: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = folder / f"{name}.key"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public = folder / f"{name}.pub"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


def _remap(args: list[str], mapping: dict[str, str]) -> list[str]:
    out = []
    for a in args:
        for old, new in mapping.items():
            a = a.replace(old, new)
        out.append(a)
    return out


def _wait_health(url: str, ctx, proc, timeout=90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with __import__("urllib.request").request.urlopen(url, timeout=2, context=ctx) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.popen.poll() is not None:
            break
        time.sleep(0.3)
    pytest.fail(f"{url} never answered:\n{proc.text()[-3000:]}")


@pytest.mark.integration
def test_rendered_superlink_supernode_and_run_job_work_together(tmp_path, http_ok):
    """TLS from the chart's generated certificate, SuperNode authentication with keys the Job
    registers, the SuperNode's gRPC health probe: with the real Flower 1.41 processes."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({
        "superlink": {"supernodeAuth": {"enabled": True}},
        "hospitals": [{"name": n, "sslTask": "simclr", "partition": i, "authSecret": f"{n}-auth", "data": {"source": "synthetic"}}
                      for i, n in enumerate(("hospital-1", "hospital-2"))],
    }))
    objs = render([values])
    secret = named(objs, "Secret", f"{SUPERLINK}-tls")
    tls = tmp_path / "tls"
    tls.mkdir()
    for k, v in secret["data"].items():
        (tls / k).write_bytes(base64.b64decode(v))
    internal, fleet, control, sl_state = free_port(), free_port(), free_port(), tmp_path / "superlink"
    sl_state.mkdir()
    token_dir = tmp_path / "control-token"
    token_dir.mkdir()
    token = named(objs, "Secret", f"fedssl-control-token")["data"]["token"]
    (token_dir / "token").write_bytes(base64.b64decode(token))
    cluster = Cluster(tmp_path)
    try:
        # SuperLink: the Deployment's command and arguments (it listens on loopback).
        pod = pod_spec(named(objs, "Deployment", SUPERLINK))
        sl, proxy = pod["containers"]
        internal_port = arg_value(sl["args"], "--port")
        sl_args = _remap(sl["args"], {"/etc/fedssl/superlink-tls": str(tls), "/var/lib/fedssl": str(sl_state),
                                      f"--port={internal_port}": f"--port={internal}"})
        assert "--enable-supernode-auth" in sl_args and "--host=127.0.0.1" in sl_args
        sl_env = {k: e["value"].replace("/var/lib/fedssl", str(sl_state)) for k, e in env_of(sl).items() if "value" in e}
        superlink = cluster.spawn("superlink", sl["command"][2:] + sl_args, base_env(**sl_env, FEDSSL_REGISTRY_TOKEN="t"))
        ctx = ssl.create_default_context(cafile=str(tls / "ca.crt"))
        _wait_health(f"https://127.0.0.1:{internal}/health", ctx, superlink)
        # The proxy sidecar: its command and arguments, listeners on loopback here.
        proxy_args = _remap(proxy["args"], {
            "/etc/fedssl/superlink-tls": str(tls), "/etc/fedssl/control-token": str(token_dir),
            "/tmp/fedssl-proxy": str(tmp_path / "proxy"), f"127.0.0.1:{internal_port}": f"127.0.0.1:{internal}",
            f"--fleet-listen={arg_value(proxy['args'], '--fleet-listen')}": f"--fleet-listen=127.0.0.1:{fleet}",
            f"--control-listen={arg_value(proxy['args'], '--control-listen')}": f"--control-listen=127.0.0.1:{control}"})
        sidecar = cluster.spawn("proxy", [sys.executable, "-m", "fedssl_flower.superlink_proxy", *proxy_args], base_env())
        _wait_health(f"https://127.0.0.1:{fleet}/health", ctx, sidecar)
        _wait_health(f"https://127.0.0.1:{control}/health", ctx, sidecar)
        # The certificate is valid for both Service names: the hospitals' and the run Job's.
        for host, port in ((f"{SUPERLINK}.fedssl.svc", fleet), (f"{SUPERLINK}-control.fedssl.svc", control)):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname=host) as s:
                assert s.version()

        # The run Job: registers both hospitals' public keys (hospital-2 re-uses hospital-1's,
        # so the second registration meets "already in use"), then hands over to fedssl-submit.
        script, args, env = job_parts(objs, tmp_path)
        keys, stubs = tmp_path / "keys", tmp_path / "bin"
        keys.mkdir()
        stubs.mkdir()
        private, public = _ecdsa_ssh_keys(tmp_path, "hospital-1")
        shutil.copy(public, keys / "hospital-1.pub")
        shutil.copy(public, keys / "hospital-2.pub")
        _stub(stubs, "fedssl-submit", f'echo "$*" > {tmp_path / "submit"}\n')
        env.update(FEDSSL_SUPERLINK=f"127.0.0.1:{control}", FEDSSL_SUPERLINK_CA=str(tls / "ca.crt"),
                   FEDSSL_REGISTRY_URL=http_ok, FEDSSL_SUPERNODE_KEYS=str(keys),
                   FEDSSL_CONTROL_TOKEN_FILE=str(token_dir / "token"))
        proc = run_script(script, args, env, stubs)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "registered the public key of hospital-1" in proc.stdout
        assert "the public key of hospital-2 is already registered" in proc.stdout
        assert f"--root-certificates {tls / 'ca.crt'}" in (tmp_path / "submit").read_text()

        # A SuperNode: the hospital-1 Deployment's arguments, with its private key.
        sn = pod_spec(named(objs, "Deployment", "fedssl-hospital-1"))["containers"][0]
        health, runtime, sn_state = free_port(), free_port(), tmp_path / "hospital-1"
        sn_state.mkdir()
        sn_args = _remap(sn["args"], {
            "/etc/fedssl/superlink-ca": str(tls), "/etc/fedssl/supernode-auth/private-key": str(private),
            f"{SUPERLINK}.fedssl.svc:{arg_value(proxy['args'], '--fleet-listen')}": f"127.0.0.1:{fleet}",
            f"--port={arg_value(sn['args'], '--port')}": f"--port={runtime}",
            f"0.0.0.0:{arg_value(sn['args'], '--health-server-address').rsplit(':', 1)[1]}": f"127.0.0.1:{health}",
            "/var/lib/fedssl": str(sn_state)})
        sn_env = {k: e["value"].replace("/var/lib/fedssl", str(sn_state)) for k, e in env_of(sn).items() if "value" in e}
        supernode = cluster.spawn("supernode", sn["command"][2:] + sn_args, base_env(**sn_env))

        # The kubelet's probe: gRPC health on the probe's port says SERVING.
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and supernode.popen.poll() is None:
            try:
                with grpc.insecure_channel(f"127.0.0.1:{health}") as ch:
                    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                break
            except grpc.RpcError:
                time.sleep(0.3)
        assert status == health_pb2.HealthCheckResponse.SERVING, supernode.text()[-3000:]

        # The SuperLink accepts it: its registered key turns online.
        cli = base_env(FLWR_HOME=str(tmp_path / "flwr-cli"))
        deadline, nodes = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            out = subprocess.run([str(VENV_BIN / "flwr"), "supernode", "list", "fedssl", "--format", "json"],
                                 env=cli, capture_output=True, text=True, timeout=60, check=False).stdout
            nodes = json.loads(out[out.find("{"):]).get("nodes", []) if "{" in out else []
            if any(n["status"] == "online" for n in nodes):
                break
            time.sleep(1)
        assert [n["status"] for n in nodes] == ["online"], f"{nodes}\n{cluster.logs()}"
    finally:
        cluster.close()


def test_the_flags_the_chart_passes_exist(capsys):
    """fedssl-submit (the run Job) and the Kaggle download (the init container) accept every
    flag the chart hands them; fedssl-superlink and fedssl-supernode are started with theirs
    in the test above."""
    from fedssl_flower import submit
    from fedssl_flower.data import kaggle

    script = (Path(__file__).resolve().parents[2] / "charts" / "fedssl" / "files" / "run.sh").read_text()
    submit_flags = {"--superlink", "--app", "--flwr-home", "--timeout", "--root-certificates"}
    assert all(f in script for f in submit_flags)
    with pytest.raises(SystemExit):
        submit.main(["--help"])
    help_text = capsys.readouterr().out
    assert all(f in help_text for f in submit_flags), help_text

    objs = render([Path(__file__).resolve().parents[2] / "charts" / "fedssl" / "ci" / "kaggle-values.yaml"])
    init = next(c for d in by_kind(objs, "Deployment") for c in pod_spec(d).get("initContainers", []))
    assert init["command"][2:5] == ["python", "-m", "fedssl_flower.data.kaggle"]
    with pytest.raises(SystemExit):
        kaggle.main(["--help"])
    help_text = capsys.readouterr().out
    assert all(a.split("=", 1)[0] in help_text for a in init["args"] if a.startswith("--")), help_text

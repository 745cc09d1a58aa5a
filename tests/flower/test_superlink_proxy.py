"""The SuperLink behind fedssl-superlink-proxy (real nginx, real Flower processes).

The layout the chart runs: the SuperLink with TLS and SuperNode authentication on 127.0.0.1,
nginx in front with a fleet listener (hospitals) and a control listener (run Job, operators;
bearer token). A hospital's position (the fleet listener) cannot list or submit runs; the run
Job's (control listener with the token) registers the hospital's key and submits a run that
this hospital, connected through the fleet listener with that key, trains to the end.
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedssl_flower import superlink_proxy
from fedssl_flower.submit import write_cli_config
from tests.conftest import REPO_ROOT, free_port
from tests.support import processes as P

pytestmark = pytest.mark.skipif(not shutil.which("nginx"), reason="needs nginx (apt-get install nginx-light)")

SUPERLINK_NAME = "superlink.fedssl.test"  # the name the SuperLink's certificate carries (the chart: its Service)
TOKEN = "0123456789abcdef0123456789abcdef-control"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_tls(directory: Path) -> dict[str, Path]:
    """A CA and a server certificate for the SuperLink's name, localhost and 127.0.0.1."""
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fedssl-test-ca")).issuer_name(_name("fedssl-test-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(SUPERLINK_NAME), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder().subject_name(_name(SUPERLINK_NAME)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = {"ca": directory / "ca.crt", "cert": directory / "tls.crt", "key": directory / "tls.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                               serialization.NoEncryption()))
    return files


def make_hospital_key(directory: Path) -> tuple[Path, Path]:
    """A hospital key pair as the chart generates it: PEM EC private key, and the public key
    inside a self-signed certificate (Helm's genPrivateKey / genSelfSignedCertWithKey)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("hospital-a")).issuer_name(_name("hospital-a"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    private, public = directory / "private-key", directory / "public-key"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()))
    public.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return private, public


class Federation:
    def __init__(self, c: P.Cluster, work: Path, tls: dict[str, Path], fleet: int, control: int):
        self.c, self.work, self.tls, self.fleet, self.control = c, work, tls, fleet, control

    def flwr(self, *args: str, listener: int, token: str | None, home: str, timeout: float = 120,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
        """The flwr CLI with a connection `fedssl` to one listener (and the token, if any)."""
        flwr_home = self.work / home
        write_cli_config(flwr_home, f"127.0.0.1:{listener}", str(self.tls["ca"]), token)
        return subprocess.run([str(P.VENV_BIN / "flwr"), *args], env=P.base_env(FLWR_HOME=str(flwr_home)),
                              capture_output=True, text=True, timeout=timeout, cwd=str(cwd or self.work))


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("proxied")
    tls = make_tls(work)
    (work / "token").write_text(TOKEN + "\n")
    upstream, fleet, control = free_port(), free_port(), free_port()
    with P.cluster(work) as c:
        link = c.spawn("superlink", [
            str(P.VENV_BIN / "fedssl-superlink"), "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["key"]),
            "--ssl-ca-certfile", str(tls["ca"]), "--enable-supernode-auth", "--host", "127.0.0.1",
            "--port", str(upstream), "--database", str(work / "superlink.db"),
            "--disable-runtime-dependency-installation"],
            P.base_env(FLWR_HOME=str(work / "flwr-superlink"), FEDSSL_RUNS_DIR=str(work / "runs")))
        P.wait_port(upstream, link)
        proxy = c.spawn("proxy", [
            sys.executable, "-m", "fedssl_flower.superlink_proxy", "--upstream", f"127.0.0.1:{upstream}",
            "--fleet-listen", f"127.0.0.1:{fleet}", "--control-listen", f"127.0.0.1:{control}",
            "--control-token-file", str(work / "token"), "--ssl-certfile", str(tls["cert"]),
            "--ssl-keyfile", str(tls["key"]), "--ssl-ca-certfile", str(tls["ca"]),
            "--upstream-server-name", SUPERLINK_NAME, "--state-dir", str(work / "proxy")], P.base_env())
        P.wait_port(fleet, proxy)
        P.wait_port(control, proxy)
        yield Federation(c, work, tls, fleet, control)


def _get(fed: Federation, port: int, path: str, **headers: str) -> httpx.Response:
    return httpx.post(f"https://127.0.0.1:{port}{path}", headers=headers, content=b"",
                      verify=str(fed.tls["ca"]), timeout=30)


def test_flwr_ls_from_a_hospitals_position_is_refused(federation):
    out = federation.flwr("ls", "fedssl", listener=federation.fleet, token=None, home="hospital-ls")
    assert out.returncode != 0, out.stdout
    assert "Fleet API listener (SuperNodes only)" in out.stdout + out.stderr


def test_flwr_ls_through_the_fleet_listener_is_refused_even_with_the_token(federation):
    out = federation.flwr("ls", "fedssl", listener=federation.fleet, token=TOKEN, home="hospital-ls-token")
    assert out.returncode != 0, out.stdout
    assert "Fleet API listener (SuperNodes only)" in out.stdout + out.stderr


def test_flwr_run_from_a_hospitals_position_is_refused(federation):
    out = federation.flwr("run", str(REPO_ROOT), "fedssl", listener=federation.fleet, token=None, home="hospital-run",
                          timeout=300)
    assert out.returncode != 0, out.stdout
    assert "Fleet API listener (SuperNodes only)" in out.stdout + out.stderr
    assert "start-run" not in federation.c.procs[0].text()  # the SuperLink never saw it


def test_the_control_listener_refuses_without_the_right_token(federation):
    for token, home in ((None, "no-token"), ("f" * 40, "wrong-token")):
        out = federation.flwr("ls", "fedssl", listener=federation.control, token=token, home=home)
        assert out.returncode != 0, out.stdout
        assert "needs the control token" in out.stdout + out.stderr


def test_the_runtime_api_is_on_no_listener(federation):
    for port in (federation.fleet, federation.control):
        res = _get(federation, port, "/v1/runtime/acquire-task", Authorization=f"Bearer {TOKEN}")
        assert res.status_code in (403, 404), res.text
        assert "detail" in res.json()


def _raw_status(fed: Federation, port: int, target: str) -> int:
    """POST with the request target exactly as given (httpx would normalise the dots)."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(fed.tls["ca"]))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(f"POST {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
                  f"Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n".encode())
        return int(s.recv(64).split()[1])


@pytest.mark.parametrize("target", ["/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
                                    "/v1/fleet//../control/list-runs", "/v1/fleet/./../control/list-runs",
                                    "/v1/fleet/get-run?x=/v1/control/", "/v1/fleet/..%2fcontrol/list-runs",
                                    "/v1/control/list-runs/../../fleet/get-run"])
def test_paths_that_could_be_read_two_ways_are_refused(federation, target):
    assert _raw_status(federation, federation.fleet, target) in (400, 403), target
    if target.startswith("/v1/control/"):
        assert _raw_status(federation, federation.control, target) == 400, target


def test_health_answers_on_both_listeners(federation):
    for port in (federation.fleet, federation.control):
        res = httpx.get(f"https://127.0.0.1:{port}/health", verify=str(federation.tls["ca"]), timeout=30)
        assert res.status_code == 200


def test_the_run_job_registers_a_hospital_and_runs_through_the_proxy(federation):
    """Through the control listener with the token: register the hospital's key (the chart's
    generated format), list runs, submit; the hospital connects through the fleet listener with
    its key, and the run finishes."""
    fed = federation
    keys = fed.work / "hospital-a-keys"
    keys.mkdir()
    private, public = make_hospital_key(keys)
    subprocess.run([sys.executable, "-m", "fedssl_flower.node_keys", "public", str(public), str(keys / "a.pub")],
                   check=True, env=P.base_env())
    registered = fed.flwr("supernode", "register", str(keys / "a.pub"), "fedssl", listener=fed.control, token=TOKEN,
                          home="run-job")
    assert registered.returncode == 0, registered.stdout + registered.stderr

    listed = fed.flwr("ls", "fedssl", "--format", "json", listener=fed.control, token=TOKEN, home="run-job")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert json.loads(listed.stdout[listed.stdout.find("{"):])["success"] is True

    hospital = fed.c.spawn("hospital-a", [
        str(P.VENV_BIN / "fedssl-supernode"), "--root-certificates", str(fed.tls["ca"]),
        "--superlink", f"localhost:{fed.fleet}", "--auth-supernode-private-key", str(private),
        "--port", str(free_port()), "--node-config",
        P.node_config(hospital="hospital-a", **{"ssl-task": "rotation", "data-source": "synthetic", "max-images": 48,
                                                "cache-dir": str(fed.work / "cache")})],
        P.base_env(FLWR_HOME=str(fed.work / "flwr-hospital-a"), TMPDIR=str(fed.work)))

    submit = subprocess.run([
        str(P.VENV_BIN / "fedssl-submit"), "--superlink", f"127.0.0.1:{fed.control}", "--root-certificates",
        str(fed.tls["ca"]), "--control-token-file", str(fed.work / "token"), "--app", str(REPO_ROOT),
        "--flwr-home", str(fed.work / "submit"), "--poll-seconds", "5",
        "-c", "ssl-rounds=1", "-c", "finetune-rounds=0", "-c", "image-size=32", "-c", "min-hospitals=1",
        "-c", "round-timeout=300.0", "-c", "local-baseline=false", "-c", "probe-epochs=1", "-c", "local-steps=2",
        "-c", "batch-size=16", "-c", 'arch="resnet18"', "-c", "pretrained=false"],
        env=P.base_env(), capture_output=True, text=True, timeout=600, cwd=str(REPO_ROOT))
    assert submit.returncode == 0, submit.stdout + submit.stderr + fed.c.logs()
    assert "Received successfully" in hospital.text() or "Sent successfully" in hospital.text(), hospital.text()[-3000:]
    proxy_log = fed.c.procs[1].text()
    assert f'{fed.fleet} "POST /v1/fleet/pull-messages" 200' in proxy_log
    assert f'{fed.control} "POST /v1/control/start-run" 200' in proxy_log
    assert f'{fed.control} "POST /v1/control/stream-logs" 200' in proxy_log


def test_a_hospital_with_an_unregistered_key_is_turned_away(federation, tmp_path):
    private, _ = make_hospital_key(tmp_path)
    stranger = federation.c.spawn("stranger", [
        str(P.VENV_BIN / "fedssl-supernode"), "--root-certificates", str(federation.tls["ca"]),
        "--superlink", f"localhost:{federation.fleet}", "--auth-supernode-private-key", str(private),
        "--port", str(free_port()), "--max-retries", "0", "--node-config", 'hospital="stranger"'],
        P.base_env(FLWR_HOME=str(tmp_path / "flwr"), TMPDIR=str(tmp_path), FEDSSL_WARM_CLIENTAPP="false"))
    stranger.popen.wait(timeout=120)
    assert stranger.popen.returncode != 0, stranger.text()[-3000:]
    assert "Failed to activate SuperNode" in stranger.text(), stranger.text()[-3000:]
    assert f'{federation.fleet} "POST /v1/fleet/activate-node" 412' in federation.c.procs[1].text()


def test_a_hospital_started_before_its_key_is_registered_waits_and_joins(federation, tmp_path):
    """In a fresh install the hospitals start with the SuperLink and the run Job registers their
    keys a little later (an operator, much later, for a hospital outside the cluster): the
    SuperNode is refused first, says why, and is accepted once its key is registered."""
    from tests.support.waiting import wait_for

    fed = federation
    private, public = make_hospital_key(tmp_path)
    late = fed.c.spawn("late-hospital", [
        str(P.VENV_BIN / "fedssl-supernode"), "--root-certificates", str(fed.tls["ca"]),
        "--superlink", f"localhost:{fed.fleet}", "--auth-supernode-private-key", str(private),
        "--port", str(free_port()), "--node-config", 'hospital="late-hospital"'],
        P.base_env(FLWR_HOME=str(tmp_path / "flwr"), TMPDIR=str(tmp_path), FEDSSL_WARM_CLIENTAPP="false"))
    wait_for(lambda: "starting it again in" in late.text() or late.popen.poll() is not None, 120, "the first refusal")
    assert late.popen.poll() is None, late.text()[-3000:]
    assert "Failed to activate SuperNode" in late.text() and "is not registered yet" in late.text()
    assert f'{fed.fleet} "POST /v1/fleet/activate-node" 412' in fed.c.procs[1].text()

    subprocess.run([sys.executable, "-m", "fedssl_flower.node_keys", "public", str(public), str(tmp_path / "late.pub")],
                   check=True, env=P.base_env())
    registered = fed.flwr("supernode", "register", str(tmp_path / "late.pub"), "fedssl", "--name", "late-hospital",
                          listener=fed.control, token=TOKEN, home="operator")
    assert registered.returncode == 0, registered.stdout + registered.stderr

    # Flower logs the node id once the SuperLink activated it; the proxy saw the activation succeed.
    wait_for(lambda: "SuperNode ID:" in late.text(), 120, "the late hospital activated", interval=0.5)
    assert f'{fed.fleet} "POST /v1/fleet/activate-node" 200' in fed.c.procs[1].text()
    assert late.popen.poll() is None, late.text()[-3000:]
    late.popen.terminate()
    assert late.popen.wait(timeout=60) is not None


def test_the_rendered_configuration_never_prints_the_token(tmp_path, capsys):
    (tmp_path / "token").write_text(TOKEN)
    superlink_proxy.main(["--control-token-file", str(tmp_path / "token"), "--state-dir", str(tmp_path), "--print-config"])
    out = capsys.readouterr().out
    assert TOKEN not in out and "<control token>" in out


@pytest.mark.parametrize("token", ["short", 'has"quote' * 8, "has space" + "x" * 40, "x" * 600])
def test_a_token_nginx_cannot_be_given_safely_is_refused(tmp_path, token):
    (tmp_path / "token").write_text(token)
    with pytest.raises(SystemExit, match="control token"):
        superlink_proxy.main(["--control-token-file", str(tmp_path / "token"), "--print-config"])

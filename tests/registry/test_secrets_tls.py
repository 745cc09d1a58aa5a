"""The registry's token from a mounted file, HTTPS, and /metrics behind read auth (issue 17 item 2)."""

import datetime as dt
import ipaddress
import ssl
import time

import httpx

from tests.support import processes as P


def test_token_from_a_file_guards_writes(cluster, tmp_path):
    secret = tmp_path / "secret" / "token"
    secret.parent.mkdir()
    secret.write_text("from-the-secret\n")  # a trailing newline, as `kubectl create secret --from-file` keeps it
    reg = P.start_registry(cluster, tmp_path / "reg", token="", token_file=str(secret))
    body = {"name": "clf", "task": "classification", "architecture": "resnet18",
            "input_spec": {"image_size": 32, "class_names": ["a", "b"]}}
    with reg.client(token="from-the-secret") as http, reg.client(token="test-token") as wrong:
        assert wrong.post("/v1/models", json=body).status_code == 401
        assert http.post("/v1/models", json=body).status_code == 201


def test_token_file_mistakes_are_refused_at_start(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = [({"token_file": str(tmp_path / "missing")}, f"FEDSSL_REGISTRY_TOKEN_FILE {tmp_path / 'missing'} cannot be read"),
             ({"token_file": str(empty)}, f"FEDSSL_REGISTRY_TOKEN_FILE {empty} is empty; expected the token"),
             ({"token_file": str(empty), "token": "t"}, "set FEDSSL_REGISTRY_TOKEN or FEDSSL_REGISTRY_TOKEN_FILE, not both"),
             ({"token": "t", "ssl_certfile": str(empty)}, "FEDSSL_REGISTRY_SSL_CERTFILE and FEDSSL_REGISTRY_SSL_KEYFILE go together")]
    for settings, message in cases:
        r = P.registry_start_refused(tmp_path / "data", timeout=60, **settings)
        assert r.returncode == 2 and message in r.stderr, (settings, r.stderr)


def _certificate(folder):
    """A CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def build(subject, issuer, key, signer, *, ca):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
             .not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedssl-test-ca")])
    ca = build(ca_name, ca_name, ca_key, ca_key, ca=True)
    cert = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "registry")]), ca_name, key, ca_key, ca=False)
    paths = {n: folder / f"{n}.pem" for n in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def test_https_with_read_auth_covers_metrics(cluster, tmp_path):
    pem = _certificate(tmp_path)
    port = P.free_port()
    env = P.registry_env(tmp_path / "reg", port, token="t0k", read_auth="true",
                         ssl_certfile=str(pem["cert"]), ssl_keyfile=str(pem["key"]))
    proc = cluster.spawn("registry-tls", [str(P.VENV_BIN / "fedssl-registry")], env)
    P.wait_port(port, proc)
    url = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(pem["ca"]))
    with httpx.Client(base_url=url, verify=trust, timeout=30) as anon, \
            httpx.Client(base_url=url, verify=trust, timeout=30, headers={"Authorization": "Bearer t0k"}) as http:
        deadline = time.monotonic() + 60
        while True:  # listening is not ready: wait for the first answer over TLS
            try:
                if anon.get("/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.popen.poll() is None, proc.text()[-3000:]
            time.sleep(0.2)
        assert anon.get("/metrics").status_code == 401  # metrics are a read like any other
        metrics = http.get("/metrics")
        assert metrics.status_code == 200 and "fedssl_http_requests_total" in metrics.text
    # The aggregator's client, as the chart configures it: token file and CA from the environment.
    from fedssl_flower.registry_client import RegistryClient

    (tmp_path / "token").write_text("t0k")
    aggregator = RegistryClient.from_environment(url, {"FEDSSL_REGISTRY_TOKEN_FILE": str(tmp_path / "token"),
                                                       "FEDSSL_REGISTRY_CA": str(pem["ca"])}, retries=1)
    aggregator.put_run("run-1", {"status": "running"})
    aggregator.close()
    with httpx.Client(base_url=url, verify=trust, headers={"Authorization": "Bearer t0k"}) as http:
        assert http.get("/v1/runs/run-1").json()["status"] == "running"
    try:  # plain HTTP on the TLS port is refused, not served
        httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10)
        raise AssertionError("the registry answered plain HTTP on its TLS port")
    except httpx.HTTPError:
        pass

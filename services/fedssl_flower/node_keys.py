"""SuperNode authentication keys in the formats Flower reads.

Flower 1.41 reads a SuperNode's private key and, in `flwr supernode register`, its public key
only in OpenSSH format (ECDSA on a NIST curve). Helm can generate an EC key but writes it as PEM,
and has no function that writes a public key on its own; it can write a self-signed certificate
holding that key. So the chart's generated keys are a PEM private key and a certificate, and
fedssl converts: `fedssl-supernode` converts its private key, the run Job the public halves.
Keys made with `ssh-keygen -t ecdsa -b 384 -N ""` pass through unchanged.

    python -m fedssl_flower.node_keys public  IN OUT   # OpenSSH, PEM public key or PEM certificate
    python -m fedssl_flower.node_keys private IN OUT   # OpenSSH or PEM private key (mode 0600)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

OPENSSH_PRIVATE_MARK = b"-----BEGIN OPENSSH PRIVATE KEY-----"


class NodeKeyError(ValueError):
    """A file is not an ECDSA key (or certificate) Flower can use; the message names it."""


def _ec(key, source: str):
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        raise NodeKeyError(f"{source}: not an ECDSA key (Flower's SuperNode authentication needs ECDSA, "
                           "e.g. `ssh-keygen -t ecdsa -b 384 -N \"\"`)")
    return key


def openssh_public_key(data: bytes, source: str = "public key") -> bytes:
    """The OpenSSH public key line of an OpenSSH or PEM public key, or of a PEM certificate."""
    text = data.strip()
    try:
        if text.startswith(b"ecdsa-") or text.startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(text)
        elif b"-----BEGIN CERTIFICATE-----" in text:
            key = x509.load_pem_x509_certificate(text).public_key()
        else:
            key = serialization.load_pem_public_key(text)
    except (ValueError, TypeError) as exc:
        raise NodeKeyError(f"{source}: not an OpenSSH or PEM public key, nor a PEM certificate ({exc})") from None
    return _ec(key, source).public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"


def openssh_private_key(data: bytes, source: str = "private key") -> bytes:
    """An OpenSSH or PEM (unencrypted) ECDSA private key, in OpenSSH format."""
    if OPENSSH_PRIVATE_MARK in data:
        return data
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise NodeKeyError(f"{source}: not an unencrypted OpenSSH or PEM private key ({exc})") from None
    return _ec(key, source).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption())


def write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in ("public", "private"):
        raise SystemExit(__doc__.split("\n\n")[-1])
    kind, src, dst = argv[0], Path(argv[1]), Path(argv[2])
    try:
        if kind == "public":
            Path(dst).write_bytes(openssh_public_key(src.read_bytes(), str(src)))
        else:
            write_private(dst, openssh_private_key(src.read_bytes(), str(src)))
    except (NodeKeyError, OSError) as exc:
        raise SystemExit(f"fedssl node keys: {exc}") from None


if __name__ == "__main__":
    main()

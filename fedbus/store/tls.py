"""A development certificate authority and a server certificate for TLS broker listeners.

Enough to turn on Mosquitto's 8883 listener or a Kafka SSL listener in a test or staging
deployment without a public CA: ``ca.crt`` goes to every client (``tls_ca_certs`` /
``ssl_cafile``), ``server.crt`` and ``server.key`` to the broker. Production deployments use
their organisation's CA; nothing here rotates or revokes. Keys are ECDSA P-256 (small, and
accepted by every TLS stack the brokers and clients use), private keys written mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedbus.store.files import atomic_write

__all__ = ["DEFAULT_HOSTS", "DevCA", "create_dev_ca"]

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "mosquitto", "kafka")
"""Names the server certificate is valid for unless told otherwise: the compose services'
host names and loopback."""


@dataclass(frozen=True)
class DevCA:
    """Where :func:`create_dev_ca` wrote each file."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


_CA_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)  # fmt: skip


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: tuple[str, ...] | list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def create_dev_ca(
    directory: str | Path, hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS, days: int = 365
) -> DevCA:
    """Write ``ca.crt``, ``ca.key``, ``server.crt`` (valid for ``hosts``) and ``server.key``
    into ``directory``. Refuses to overwrite any of them: replacing a CA silently would
    make every client that trusts the old one fail."""
    if not hosts:
        raise ValueError("the server certificate needs at least one host name")
    root = Path(directory)
    out = DevCA(root / "ca.crt", root / "ca.key", root / "server.crt", root / "server.key")
    existing = [p for p in (out.ca_cert, out.ca_key, out.server_cert, out.server_key) if p.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]} exists: refusing to replace a CA or server key")
    root.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=days)
    ca_key, server_key = _key(), _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedbus development CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    atomic_write(out.ca_key, _pem_key(ca_key), mode=0o600)
    atomic_write(out.server_key, _pem_key(server_key), mode=0o600)
    atomic_write(out.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    atomic_write(out.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return out

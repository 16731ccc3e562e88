"""The development CA (``fedbus keys ca``) and the broker security options reaching the
client libraries: what a TLS handshake and SASL login depend on, checked without a broker
(the TLS listener itself is exercised on Mosquitto in tests/integration/test_broker_security)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedbus.store.tls import create_dev_ca
from workers.main import make_transport
from workers.settings import load


def test_ca_signs_a_server_certificate_for_the_hosts(tmp_path: Path) -> None:
    made = create_dev_ca(tmp_path / "certs", ["broker.example.org", "10.0.0.7"], days=30)
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 30 * 86400 <= lifetime.total_seconds() <= 30 * 86400 + 600
    for key in (made.ca_key, made.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        create_dev_ca(tmp_path / "certs")


def test_kafka_sasl_and_tls_settings_reach_aiokafka(tmp_path: Path) -> None:
    """What the worker hands aiokafka for SASL_SSL: mechanism, principal, password, and an
    SSL context that trusts the configured CA (and verifies host names)."""
    made = create_dev_ca(tmp_path, ["kafka"])
    settings = load(
        None,
        transport="kafka",
        kafka={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": "fedbus-worker",
            "sasl_plain_password": "s3cret",
            "ssl_cafile": str(made.ca_cert),
        },
    )
    transport = make_transport(settings)
    kwargs = transport._common()  # type: ignore[attr-defined]
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert (kwargs["sasl_mechanism"], kwargs["sasl_plain_username"]) == (
        "SCRAM-SHA-512",
        "fedbus-worker",
    )
    assert kwargs["sasl_plain_password"] == "s3cret"
    ctx = kwargs["ssl_context"]
    assert ctx.check_hostname
    subjects = [dict(x[0] for x in c["subject"]) for c in ctx.get_ca_certs()]
    assert {"commonName": "fedbus development CA"} in subjects
    assert "s3cret" not in repr(settings)  # a SecretStr: masked in logs

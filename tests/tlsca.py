"""A test certificate authority, made fresh for each test with the `cryptography` package.

``make_ca(tmp_path)`` writes a CA and a server certificate for "localhost" and 127.0.0.1;
``make_server_cert(tmp_path, names)`` signs more server certificates with that CA (a wrong
host name, say). A second ``make_ca`` in another directory is an untrusted CA.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _new_key(key_type: str) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: PrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _directory(tmp_path: Path) -> Path:
    return tmp_path / "tlsca"


def make_ca(tmp_path: Path, *, key_type: str = "ec") -> tuple[Path, Path, Path]:
    """Write a CA and a server certificate for localhost and 127.0.0.1 signed by it.

    Returns (ca_cert_path, server_cert_path, server_key_path). ``key_type`` is "ec" (P-256,
    for the ECDHE-ECDSA suites) or "rsa" (2048 bits, for the ECDHE-RSA suites).
    """
    directory = _directory(tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key(key_type)
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"tradebalancer test CA {tmp_path.name}")]
    )
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca_cert = directory / "ca.pem"
    ca_cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_key(key, directory / "ca.key")
    (directory / "key_type").write_text(key_type)
    server_cert, server_key = make_server_cert(tmp_path, ["localhost", "127.0.0.1"])
    return ca_cert, server_cert, server_key


def make_server_cert(
    tmp_path: Path, names: Sequence[str], *, name: str = "server"
) -> tuple[Path, Path]:
    """A server certificate for ``names`` (DNS names or IP addresses), signed by the CA that
    ``make_ca(tmp_path)`` wrote; returns (cert_path, key_path)."""
    directory = _directory(tmp_path)
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = _new_key((directory / "key_type").read_text())
    alternative_names: list[x509.GeneralName] = []
    for entry in names:
        try:
            alternative_names.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            alternative_names.append(x509.DNSName(entry))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, _write_key(key, directory / f"{name}.key")


def make_wrong_host_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate from the test CA that is valid, but only for "wrong.example"."""
    return make_server_cert(tmp_path, ["wrong.example"], name="wrong-host")

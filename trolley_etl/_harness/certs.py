"""A private certificate authority for TLS tests: a CA, a server and a client certificate.

Made with the `cryptography` package (in the `test` extra). The server certificate names
`localhost` and `127.0.0.1`, so loopback servers verify with host name checks on.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LocalPKI:
    """PEM files in one folder (keys are owner-only)."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def server_combined(self) -> Path:
        """Certificate and key in one file (Orthanc's `SslCertificate`)."""
        return self.folder / "server-combined.pem"

    @property
    def client_cert(self) -> Path:
        return self.folder / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / "client.key"

    @property
    def stranger_ca(self) -> Path:
        """A CA that signed nothing here: trusting only it must fail verification."""
        return self.folder / "stranger-ca.pem"


def make_pki(folder: Path, *, days: int = 30) -> LocalPKI:
    """Write a CA, a server certificate (localhost, 127.0.0.1) and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def key_pem(key: Any) -> bytes:
        return bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )

    def cert_pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def authority(common: str) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(name(common))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    ca_key, ca_cert = authority("trolley-etl test CA")
    _, stranger = authority("somebody else's CA")

    def leaf(common: str, usages: list[Any], san: list[Any]) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    loopback = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    # DICOM nodes are servers and clients alike (an archive's C-STORE to a C-MOVE destination
    # uses its certificate as a client's), so both certificates may do both
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    server_key, server_cert = leaf("localhost", both, loopback)
    client_key, client_cert = leaf("trolley-etl test client", both, loopback)
    pki = LocalPKI(folder)
    pki.ca.write_bytes(cert_pem(ca_cert))
    pki.stranger_ca.write_bytes(cert_pem(stranger))
    pki.server_cert.write_bytes(cert_pem(server_cert))
    pki.client_cert.write_bytes(cert_pem(client_cert))
    for path, data in (
        (pki.server_key, key_pem(server_key)),
        (pki.client_key, key_pem(client_key)),
        (pki.server_combined, cert_pem(server_cert) + key_pem(server_key)),
    ):
        path.touch(mode=0o600)
        path.write_bytes(data)
    return pki

"""TLS for tests: a throwaway certificate authority that lives in one
directory and issues server certificates for loopback names.

    ca = CertificateAuthority(tmp_path / "tls")
    files = ca.server_files()           # for 127.0.0.1 and localhost
    files.ca_cert                       # what a client trusts (--ca-file, certs.d/.../ca.crt)
    files.cert, files.key               # what the server presents (PEM)
    files.server_context()              # an ssl.SSLContext for aiohttp or asyncio

Keys are EC P-256 (fast to make). Certificates carry the extensions strict
verifiers expect (key identifiers, key usage, serverAuth), so Go peers
(docker, skopeo, Distribution) accept them as well as Python's ssl.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _subject_names(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


@dataclass(frozen=True)
class ServerFiles:
    ca_cert: Path       # the authority's certificate: what clients trust
    cert: Path          # the server's certificate followed by the authority's (a chain)
    key: Path           # the server's private key
    names: tuple[str, ...]

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_cert))


class CertificateAuthority:
    """A certificate authority made on the spot, valid for two days, kept in
    `directory` as ca.crt and ca.key."""

    def __init__(self, directory: str | Path, name: str = "dockyard test CA"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        public = self._key.public_key()
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256()))
        self.cert_path = self.dir / "ca.crt"
        self.cert_path.write_bytes(_cert_pem(self.cert))
        (self.dir / "ca.key").write_bytes(_key_pem(self._key))

    def issue(self, names: Sequence[str] = LOOPBACK_NAMES, *, stem: str = "server",
              client: bool = False) -> ServerFiles:
        """A server certificate for these host names and IP addresses (a
        client certificate with client=True), written as <stem>.crt (leaf,
        then this authority) and <stem>.key."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(_subject_names(names)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                  else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(self._key, hashes.SHA256()))
        cert_path, key_path = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
        cert_path.write_bytes(_cert_pem(cert) + _cert_pem(self.cert))
        key_path.write_bytes(_key_pem(key))
        key_path.chmod(0o600)
        return ServerFiles(self.cert_path, cert_path, key_path, tuple(names))


def server_files(directory: str | Path, names: Sequence[str] = LOOPBACK_NAMES) -> ServerFiles:
    """A fresh authority in directory and one server certificate from it."""
    return CertificateAuthority(directory).issue(names)

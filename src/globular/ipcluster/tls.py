"""Self-signed TLS certificates for the notebook server, made with ``cryptography``.

A cluster's certificate is kept in ``~/.globular/tls/<cluster>-<region>/`` and
reused by later starts of the same cluster (so a browser that was told to trust
it keeps trusting it), as long as it names the master's address and is not
about to expire.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from globular.paths import private_dir, write_private

VALID_DAYS = 825
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True)
class CertPair:
    cert: bytes  # PEM
    key: bytes  # PEM, unencrypted
    reused: bool = False
    note: str = ""  # why a kept certificate was not reused

    @property
    def fingerprint(self) -> str:
        der = x509.load_pem_x509_certificate(self.cert).public_bytes(serialization.Encoding.DER)
        return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def make_certificate(host: str) -> CertPair:
    """A new self-signed certificate for ``host`` (an address or a name), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, host), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "globular")]
    )
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        alt_names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return CertPair(
        cert=cert.public_bytes(serialization.Encoding.PEM),
        key=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def _covers(cert: x509.Certificate, host: str) -> bool:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host) in names.get_values_for_type(x509.IPAddress)
    except ValueError:
        return host in names.get_values_for_type(x509.DNSName)


def kept_certificate(folder: Path, host: str) -> CertPair:
    """The certificate kept in ``folder`` if it still fits ``host``, else a new one (kept there)."""
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    note = ""
    if cert_path.exists() or key_path.exists():
        try:
            cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
            if key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ) != (
                cert.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            ):
                note = "its key does not belong to it"
            elif not _covers(cert, host):
                note = f"it does not name {host}"
            elif cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < RENEW_BEFORE:
                note = "it expires within 30 days"
            else:
                return CertPair(cert_pem, key_pem, reused=True)
        except FileNotFoundError as exc:
            note = f"{Path(exc.filename).name} is missing"
        except ValueError as exc:
            note = f"it cannot be read ({exc})"
    pair = make_certificate(host)
    private_dir(folder)
    write_private(key_path, pair.key)
    write_private(cert_path, pair.cert)
    if note:
        pair = CertPair(
            pair.cert, pair.key, reused=False, note=f"the kept certificate in {folder} was replaced: {note}"
        )
    return pair


def load_certificate(cert_file: Path, key_file: Path) -> CertPair:
    """A certificate the user supplies; errors say which file and why."""
    for label, path in (("notebook_certfile", cert_file), ("notebook_keyfile", key_file)):
        if not path.is_file():
            raise FileNotFoundError(f"{label} {path}: no such file")
    cert_pem, key_pem = cert_file.read_bytes(), key_file.read_bytes()
    try:
        x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ValueError(f"notebook_certfile {cert_file}: not a PEM certificate") from None
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"notebook_keyfile {key_file}: not an unencrypted PEM private key") from None
    return CertPair(cert_pem, key_pem, reused=True)

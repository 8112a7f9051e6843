"""TLS for the API on TCP: the daemon's certificate (given, or self-signed in HOME), its
SHA-256 fingerprint, and the contexts of both ends.

A daemon started with ``--api-tcp`` and no ``--tls-cert``/``--tls-key`` uses
``HOME/tls/cert.pem`` and ``HOME/tls/key.pem``, generating them on first use (an ECDSA P-256
key, mode 0600, and a self-signed certificate valid ten years for ``localhost``, the
loopback addresses, the host name and the address it listens on). Generating needs the
``cryptography`` package (the ``remote`` extra). A client trusts the daemon either through a
CA file (``--ca-file``: the self-signed certificate itself works as one) or by pinning the
certificate's SHA-256 fingerprint (``--fingerprint``), the form the daemon prints at start.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from storvisor.errors import InvalidArgument, LocalFailure

TLS_DIR = "tls"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
_VALID_DAYS = 3650


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A PEM certificate (chain) and its private key."""

    cert: Path
    key: Path


def format_fingerprint(digest: bytes) -> str:
    """``AB:CD:...``: how ``openssl x509 -fingerprint -sha256`` prints a digest."""
    return ":".join(f"{b:02X}" for b in digest)


def parse_fingerprint(text: str) -> bytes:
    """A SHA-256 fingerprint given as 64 hex digits, with or without colons and an optional
    ``sha256:`` prefix. Raises ``InvalidArgument``."""
    hexdigits = text.strip().lower().removeprefix("sha256:").replace(":", "")
    try:
        digest = bytes.fromhex(hexdigits)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise InvalidArgument(
            f"invalid SHA-256 fingerprint {text!r}: expected 64 hex digits (AB:CD:... or abcd...)"
        )
    return digest


def cert_fingerprint(der: bytes) -> bytes:
    """The SHA-256 digest of a certificate in DER form."""
    return hashlib.sha256(der).digest()


def file_fingerprint(cert: Path) -> bytes:
    """The SHA-256 digest of the first certificate of a PEM file. Raises ``InvalidArgument``."""
    try:
        pem = cert.read_text()
        first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
        return cert_fingerprint(ssl.PEM_cert_to_DER_cert(first[first.index("-----BEGIN") :]))
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"cannot read the certificate {cert}: {e}") from e


def fingerprints_match(got: bytes, pinned: bytes) -> bool:
    return hmac.compare_digest(got, pinned)


def self_signed(home: Path, host: str) -> TlsFiles:
    """``HOME/tls/{cert,key}.pem``, generated if either is missing. Raises
    ``InvalidArgument`` if the ``cryptography`` package is not installed, ``LocalFailure``
    if the files cannot be written."""
    files = TlsFiles(home / TLS_DIR / CERT_FILE, home / TLS_DIR / KEY_FILE)
    if files.cert.exists() and files.key.exists():
        return files
    key_pem, cert_pem = _generate(host)
    try:
        files.cert.parent.mkdir(mode=0o700, exist_ok=True)
        _write_private(files.key, key_pem)
        _write_private(files.cert, cert_pem)
    except OSError as e:
        raise LocalFailure(f"cannot write the TLS certificate in {files.cert.parent}: {e}") from e
    return files


def _generate(host: str) -> tuple[bytes, bytes]:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise InvalidArgument(
            "generating a self-signed TLS certificate needs the 'cryptography' package "
            "(pip install 'storvisor[remote]'); or give --tls-cert and --tls-key"
        ) from None
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for text in ("127.0.0.1", "::1", host):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if not address.is_unspecified and x509.IPAddress(address) not in names:
            names.append(x509.IPAddress(address))
    for dns in (socket.gethostname(), host):
        if dns and not _is_ip(dns) and x509.DNSName(dns) not in names:
            names.append(x509.DNSName(dns))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "storvisor")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _write_private(path: Path, data: bytes) -> None:
    """Write ``path`` (mode 0600) atomically: a temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The daemon's context (TLS 1.2 at least). Raises ``InvalidArgument`` if the files do
    not load or do not match."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as e:
        raise InvalidArgument(
            f"cannot load the TLS certificate {files.cert} with key {files.key}: {e}"
        ) from e
    return ctx


def client_context(ca_file: Path | None, pinned: bytes | None) -> ssl.SSLContext:
    """A client's context: the system's CAs, or those of ``ca_file``; with ``pinned`` no CA
    is checked, the caller compares the peer's fingerprint instead (``fingerprints_match``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if pinned is not None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        if ca_file is not None:
            ctx.load_verify_locations(cafile=ca_file)
        else:
            ctx.load_default_certs()
    except (OSError, ssl.SSLError) as e:
        raise InvalidArgument(f"cannot load the CA file {ca_file}: {e}") from e
    return ctx

"""A throw-away PKI for TLS tests, made with the ``openssl`` binary: a CA and a server
certificate for ``localhost`` and 127.0.0.1 signed by it.

Files are named as QEMU's ``tls-creds-x509`` and libnbd's ``tls-certificates`` expect them
in a client directory (``ca-cert.pem``); the server's certificate and key stay beside it.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from prereq import require


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_dir: Path
    """Holds only ``ca-cert.pem``: what a client needs to check the server."""


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"openssl {' '.join(args)}: {done.stderr}"


def make_pki(directory: Path) -> Pki:
    """Create the CA and the server's certificate under ``directory``."""
    require(shutil.which("openssl"), "the openssl command (Debian package openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
        "-subj", "/CN=storvisor test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", *ec, "-keyout", "server-key.pem", "-out", "server.csr", "-subj", "/CN=localhost",
        cwd=directory,
    )  # fmt: skip
    (directory / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-out", "server-cert.pem", "-days", "2", "-extfile", "server.ext",
        cwd=directory,
    )  # fmt: skip
    client = directory / "client"
    client.mkdir(exist_ok=True)
    shutil.copy(directory / "ca-cert.pem", client / "ca-cert.pem")
    return Pki(
        ca_cert=directory / "ca-cert.pem",
        server_cert=directory / "server-cert.pem",
        server_key=directory / "server-key.pem",
        client_dir=client,
    )

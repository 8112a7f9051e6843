"""``storvisor serve --nbd-tcp ... --nbd-tls-cert ... --nbd-tls-key ...``: NBD over TCP only
with TLS (nbdinfo, qemu-img and qemu-io through TLS), the Unix socket plain and sharing the
volume with the data planes; bad flags and certificates are one line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_harness import CLI, Daemon

from prereq import require
from tls_pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _run(*argv: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert (done.returncode == 0) == ok, f"{argv}: {done.returncode} {done.stderr or done.stdout}"
    return done


def test_nbd_over_tcp_requires_tls(home: Path, cli: CLI, pki: Pki) -> None:
    for tool in ("nbdinfo", "qemu-img", "qemu-io"):
        require(shutil.which(tool), f"{tool} (Debian packages libnbd-bin and qemu-utils)")
    d = Daemon(
        home, "--demo", "--nbd-tcp", "127.0.0.1:0",
        "--nbd-tls-cert", str(pki.server_cert), "--nbd-tls-key", str(pki.server_key),
    ).start()  # fmt: skip
    try:
        assert "(TLS required)" in d.banner
        match = re.search(r"nbds://127\.0\.0\.1:(\d+)/demo", d.banner)
        assert match, d.banner
        port = match.group(1)
        exports = cli("export", "list", "--json").json()
        assert isinstance(exports, list)
        assert [e["uris"][1] for e in exports] == [f"nbds://127.0.0.1:{port}/demo"]

        tls_uri = f"{match.group(0)}?tls-certificates={pki.client_dir}"
        info = json.loads(_run("nbdinfo", "--json", tls_uri).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == 1 << 30
        obj = f"tls-creds-x509,id=tls0,dir={pki.client_dir},endpoint=client"
        opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port}"
        opts += ",export=demo,tls-creds=tls0"
        out = _run(
            "qemu-io", "--object", obj, "--image-opts", opts,
            "-c", "write -P 0x6b 1M 2M", "-c", "read -P 0x6b 1M 2M",
        ).stdout  # fmt: skip
        assert "wrote 2097152/2097152" in out and "read 2097152/2097152" in out
        assert "Pattern verification failed" not in out
        info_out = _run("qemu-img", "info", "--object", obj, "--image-opts", opts).stdout
        assert "virtual size: 1 GiB" in info_out

        # the Unix socket stays plain (served by the data planes), same volume
        unix = f"nbd+unix:///demo?socket={home}/nbd.sock"
        out = _run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x6b 1M 2M", unix).stdout
        assert "read 2097152/2097152" in out and "Pattern verification failed" not in out

        # plain TCP is refused; TLS goes on working
        plain = opts.removesuffix(",tls-creds=tls0")
        assert "TLS" in _run("qemu-img", "info", "--image-opts", plain, ok=False).stderr
        _run("nbdinfo", f"nbd://127.0.0.1:{port}/demo", ok=False)
        _run("nbdinfo", tls_uri)
    finally:
        rc, err = d.stop()
    assert rc == 0, err
    assert "Traceback" not in err


def test_tls_flags_are_checked(cli: CLI, pki: Pki, tmp_path: Path) -> None:
    cert, key = str(pki.server_cert), str(pki.server_key)
    line = cli.fails("serve", "--nbd-tcp", "0", "--nbd-tls-cert", cert, rc=2)
    assert "--nbd-tls-cert and --nbd-tls-key go together" in line
    line = cli.fails("serve", "--nbd-tcp", "0", "--nbd-tls-key", key, rc=2)
    assert "go together" in line
    line = cli.fails("serve", "--nbd-tls-cert", cert, "--nbd-tls-key", key, rc=2)
    assert "needs --nbd-tcp" in line
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    line = cli.fails("serve", "--nbd-tcp", "0", "--nbd-tls-cert", str(junk), "--nbd-tls-key", key)
    assert "not a PEM certificate and its private key" in line
    line = cli.fails(
        "serve", "--nbd-tcp", "0", "--nbd-tls-cert", str(tmp_path / "none"), "--nbd-tls-key", key
    )
    assert "cannot read TLS certificate" in line


def test_nbd_tls_shares_the_api_certificate(home: Path, cli: CLI, tmp_path: Path) -> None:
    """``--nbd-tls``: NBD on TCP takes the API's certificate; without ``--tls-cert`` that is
    the self-signed one of HOME, which a client trusts as its CA, for NBD and the API alike."""
    for tool in ("nbdinfo", "qemu-io"):
        require(shutil.which(tool), f"{tool} (Debian packages libnbd-bin and qemu-utils)")
    d = Daemon(home, "--demo", "--nbd-tcp", "127.0.0.1:0", "--nbd-tls", "--api-tcp", "0").start()
    try:
        assert "(TLS required)" in d.banner
        match = re.search(r"nbds://127\.0\.0\.1:(\d+)/demo", d.banner)
        assert match, d.banner
        fingerprint = re.search(r"fingerprint: (\S+)", d.banner)
        assert fingerprint, d.banner
        cert = home / "tls" / "cert.pem"
        creds = tmp_path / "creds"
        creds.mkdir()
        shutil.copy(cert, creds / "ca-cert.pem")  # the self-signed certificate is its own CA
        obj = f"tls-creds-x509,id=tls0,dir={creds},endpoint=client"
        opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={match.group(1)}"
        opts += ",export=demo,tls-creds=tls0"
        out = _run(
            "qemu-io", "--object", obj, "--image-opts", opts,
            "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M",
        ).stdout  # fmt: skip
        assert "read 1048576/1048576" in out and "Pattern verification failed" not in out
        info = json.loads(
            _run("nbdinfo", "--json", f"{match.group(0)}?tls-certificates={creds}").stdout
        )
        assert info["TLS"] is True
        # a certificate other than HOME's is refused by the same client
        other = tmp_path / "other"
        other.mkdir()
        (other / "ca-cert.pem").write_text(make_pki(tmp_path / "pki").ca_cert.read_text())
        obj_other = f"tls-creds-x509,id=tls0,dir={other},endpoint=client"
        _run("qemu-io", "--object", obj_other, "--image-opts", opts, "-c", "read 0 4k", ok=False)
    finally:
        rc, err = d.stop()
    assert rc == 0, err
    line = cli.fails("serve", "--nbd-tls", rc=2)
    assert "--nbd-tls needs --nbd-tcp" in line

"""The CLI against a remote daemon: ``serve --api-tcp`` with its self-signed certificate (or a
given one), ``token create|list|revoke``, and commands run with ``--api --token-file``
(or the environment) pinning the printed fingerprint or trusting a CA file."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from cli_harness import CLI, STORVISOR, Daemon, Result

from storvisor.api.tls import file_fingerprint, format_fingerprint, self_signed


def _endpoint(d: Daemon) -> tuple[str, str]:
    url = re.search(r"API: (https://127\.0\.0\.1:\d+) ", d.banner)
    fp = re.search(r"TLS certificate SHA-256 fingerprint: ([0-9A-F:]{95})$", d.banner, re.M)
    assert url and fp, d.banner
    return url.group(1), fp.group(1)


def _remote(args: list[str], env: dict[str, str] | None = None, rc: int = 0) -> Result:
    """``storvisor`` with no usable local HOME: only the remote daemon can answer."""
    proc = subprocess.run(
        [STORVISOR, "--home", "/nonexistent/home", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "STORVISOR_HOME": "/nonexistent-do-not-use", **(env or {})},
    )
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    assert proc.returncode == rc, f"storvisor {' '.join(args)} -> {result}"
    if rc:
        assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    return result


def _token(cli: CLI, tmp_path: Path, name: str, *flags: str) -> Path:
    result = cli("token", "create", name, *flags)
    token = result.out.strip()
    assert re.fullmatch(r"svt_[A-Za-z0-9_-]{43}", token), result
    assert "only this once" in result.err
    path = tmp_path / f"{name}.token"
    path.write_text(token + "\n")
    return path


def test_remote_cli_with_pinned_self_signed_certificate(cli, home, tmp_path):
    admin = _token(cli, tmp_path, "admin")
    reader = _token(cli, tmp_path, "reader", "--read-only")
    listing = cli("token", "list").out
    assert re.search(r"^admin\s+read-write", listing, re.M)
    assert re.search(r"^reader\s+read-only", listing, re.M)
    assert admin.read_text().strip() not in listing
    assert admin.read_text().strip() not in (home / "tokens.json").read_text()

    d = Daemon(home, "--api-tcp", "0").start()
    try:
        url, fp = _endpoint(d)
        assert fp == format_fingerprint(file_fingerprint(home / "tls" / "cert.pem"))
        pin = ["--api", url, "--fingerprint", fp]
        _remote(
            [
                *pin,
                "--token-file",
                str(admin),
                "pool",
                "create",
                "p",
                "--backing",
                f"{tmp_path}/d.img:1G",
            ]
        )
        _remote([*pin, "--token-file", str(admin), "volume", "create", "p/v", "--size", "1M"])
        out = _remote(
            ["volume", "list", "--json"],
            env={
                "STORVISOR_API": url,
                "STORVISOR_TOKEN_FILE": str(reader),
                "STORVISOR_FINGERPRINT": fp,
            },
        ).json()
        assert [v["name"] for v in out] == ["v"]
        by_ca = ["--api", url, "--ca-file", str(home / "tls" / "cert.pem")]
        assert _remote([*by_ca, "--token-file", str(reader), "pool", "list", "--json"]).json()

        err = _remote([*pin, "--token-file", str(reader), "volume", "delete", "p/v"], rc=1).err
        assert "read-only" in err
        err = _remote(["--api", url, "--token-file", str(reader), "pool", "list"], rc=1).err
        assert "cannot verify the certificate" in err and "--fingerprint" in err
        wrong = fp[:-1] + ("0" if fp[-1] != "0" else "1")
        err = _remote(
            [
                "--api",
                url,
                "--fingerprint",
                wrong,
                "--token-file",
                str(admin),
                "volume",
                "delete",
                "p/v",
            ],
            rc=1,
        ).err
        assert "not the pinned" in err

        cli("token", "revoke", "admin")  # while the daemon runs
        err = _remote([*pin, "--token-file", str(admin), "volume", "delete", "p/v"], rc=1).err
        assert "unknown or revoked token" in err
        assert [v["name"] for v in cli("volume", "list", "--json").json()] == ["v"]
    finally:
        rc, err = d.stop()
    assert rc == 0 and "Traceback" not in err


def test_serve_with_a_given_certificate(cli, home, tmp_path):
    (tmp_path / "pki").mkdir()
    given = self_signed(tmp_path / "pki", "127.0.0.1")
    reader = _token(cli, tmp_path, "reader", "--read-only")
    d = Daemon(
        home, "--api-tcp", "127.0.0.1:0", "--tls-cert", str(given.cert), "--tls-key", str(given.key)
    ).start()
    try:
        url, fp = _endpoint(d)
        assert fp == format_fingerprint(file_fingerprint(given.cert))
        assert not (home / "tls").exists()
        _remote(
            [
                "--api",
                url,
                "--ca-file",
                str(given.cert),
                "--token-file",
                str(reader),
                "pool",
                "list",
            ]
        )
    finally:
        assert d.stop()[0] == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["serve", "--api-tcp", "0", "--tls-cert", "/x.pem"], "go together"),
        (["serve", "--tls-cert", "/x.pem", "--tls-key", "/y.pem"], "need --api-tcp"),
        (["--api", "https://127.0.0.1:1", "pool", "list"], "--token-file"),
        (["--token-file", "/t", "pool", "list"], "needs --api"),
        (["--api", "https://127.0.0.1:1", "token", "list"], "takes no --api"),
        (
            [
                "--api",
                "https://127.0.0.1:1",
                "--token-file",
                "/t",
                "--ca-file",
                "/c",
                "--fingerprint",
                "00",
                "pool",
                "list",
            ],
            "not both",
        ),
    ],
)
def test_usage_errors(cli, args, words):
    assert words in cli.fails(*args, rc=2)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--api", "http://127.0.0.1:1", "--token-file", "{tok}", "pool", "list"], "https://"),
        (
            ["--api", "https://127.0.0.1:1", "--token-file", "/nonexistent/t", "pool", "list"],
            "cannot read the token file",
        ),
        (
            [
                "--api",
                "https://127.0.0.1:1",
                "--token-file",
                "{tok}",
                "--fingerprint",
                "AB",
                "pool",
                "list",
            ],
            "fingerprint",
        ),
        (
            [
                "--api",
                "https://127.0.0.1:1",
                "--token-file",
                "{tok}",
                "--fingerprint",
                "AB" * 32,
                "pool",
                "list",
            ],
            "no answer",
        ),
        (
            [
                "serve",
                "--api-tcp",
                "0",
                "--tls-cert",
                "/nonexistent/c.pem",
                "--tls-key",
                "/nonexistent/k.pem",
            ],
            "cannot load the TLS certificate",
        ),
    ],
)
def test_bad_remote_options_get_one_line(cli, tmp_path, args, words):
    tok = tmp_path / "t"
    tok.write_text("svt_x\n")
    assert words in cli.fails(*(a.replace("{tok}", str(tok)) for a in args))


def test_token_commands(cli, home):
    assert "invalid token name" in cli.fails("token", "create", "a/b")
    cli("token", "create", "t")
    assert "exists" in cli.fails("token", "create", "t")
    assert cli("token", "revoke", "t").out == "revoked token t\n"
    assert "no token named t" in cli.fails("token", "revoke", "t")
    assert cli("token", "list", "--json").json() == []

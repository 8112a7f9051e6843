"""The Cinder driver against the daemon's remote API: TCP with TLS and a bearer token, the
server certificate pinned by its fingerprint or trusted through a CA file; a wrong token or
certificate is a ``VolumeBackendAPIException`` and nothing is made. Image copies reach the
volume's NBD export by its TCP URI, as a cinder-volume on another host does."""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prereq import require_module

require_module("cinder", "the OpenStack virtualenv (make openstack-venv) is not in use")

from cinder import exception  # noqa: E402
from cinder_kit import (  # noqa: E402
    ImageStore,
    load_driver,
    make_image,
    nbd_uri,
    new_snapshot,
    new_volume,
    pread,
    pwrite,
    qemu_img,
)

from cli.cli_harness import CLI, Daemon  # noqa: E402
from storvisor.api.client import Client  # noqa: E402

pytestmark = pytest.mark.requires(
    hasattr(Client, "remote"), "this tree's API client has no remote API (https://)"
)

GIB = 1 << 30
MIB = 1 << 20
CONNECTOR = {"host": "compute-1"}


class Remote:
    def __init__(self, home: Path, url: str, fingerprint: str, token: Path) -> None:
        self.home, self.url, self.fingerprint, self.token = home, url, fingerprint, token

    def options(self, **extra: str) -> dict[str, str]:
        return {
            "storvisor_api_url": self.url,
            "storvisor_token_file": str(self.token),
            "storvisor_tls_fingerprint": self.fingerprint,
            "storvisor_pool": "p",
            **extra,
        }


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    """A daemon serving its API on TCP (TLS, self-signed certificate), NBD on TCP, and a token
    for the API."""
    tmp = tmp_path_factory.mktemp("remote")
    home = tmp / "home"
    cli = CLI(home)
    cli("pool", "create", "p", "--backing", f"{tmp}/disk.img:4G")
    token = tmp / "cinder.token"
    token.write_text(cli("token", "create", "cinder").out.strip() + "\n")
    daemon = Daemon(home, "--api-tcp", "127.0.0.1:0", "--nbd-tcp", "127.0.0.1:0").start()
    try:
        url = re.search(r"API: (https://127\.0\.0\.1:\d+) ", daemon.banner)
        fp = re.search(
            r"TLS certificate SHA-256 fingerprint: ([0-9A-F:]{95})$", daemon.banner, re.M
        )
        assert url and fp, daemon.banner
        yield Remote(home, url.group(1), fp.group(1), token)
    finally:
        daemon.stop()


def test_minimum_features_over_tls_with_a_token(remote: Remote, tmp_path: Path, ctx: Any) -> None:
    driver = load_driver(tmp_path, remote.options())
    driver.check_for_setup_error()
    assert driver.get_volume_stats(refresh=True)["pools"][0]["total_capacity_gb"] == 4.0
    volume = new_volume(ctx)
    driver.create_volume(volume)
    uri = nbd_uri(driver.initialize_connection(volume, CONNECTOR))
    pwrite(uri, b"\x61" * MIB, 0)
    driver.extend_volume(volume, 2)
    snapshot = new_snapshot(ctx, volume)
    driver.create_snapshot(snapshot)
    copy = new_volume(ctx, size=3)
    driver.create_volume_from_snapshot(copy, snapshot)
    clone = new_volume(ctx, size=2)
    driver.create_cloned_volume(clone, volume)
    driver.terminate_connection(volume, CONNECTOR)
    for made in (copy, clone):
        curi = nbd_uri(driver.initialize_connection(made, CONNECTOR))
        assert pread(curi, MIB, 0) == b"\x61" * MIB
        driver.terminate_connection(made, None)
        driver.delete_volume(made)
    driver.delete_snapshot(snapshot)
    driver.delete_volume(volume)
    driver.delete_volume(volume)


def test_image_round_trip_over_tcp(remote: Remote, tmp_path: Path, ctx: Any, tools: None) -> None:
    driver = load_driver(tmp_path, remote.options())
    images = ImageStore(tmp_path)
    image_id, raw = make_image(images, 16 * MIB)
    volume = new_volume(ctx)
    driver.create_volume(volume)
    try:
        driver.copy_image_to_volume(ctx, volume, images, image_id)
        out = str(uuid.uuid4())
        meta = {"id": out, "disk_format": "qcow2", "container_format": "bare"}
        driver.copy_volume_to_image(ctx, volume, images, meta)
        with open(raw, "r+b") as f:
            f.truncate(GIB)  # what the volume holds: the image, then zeros
        compared = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(images.path(out)), str(raw))
        assert compared.returncode == 0, compared.stdout + compared.stderr
        local = Client(remote.home / "api.sock")
        assert [e for e in local.exports() if e.spec.volume == volume.name] == []
    finally:
        driver.delete_volume(volume)


def test_ca_file_instead_of_a_fingerprint(remote: Remote, tmp_path: Path) -> None:
    options = remote.options(storvisor_ca_file=str(remote.home / "tls" / "cert.pem"))
    del options["storvisor_tls_fingerprint"]
    load_driver(tmp_path, options).check_for_setup_error()


def test_wrong_token_is_a_backend_api_exception(remote: Remote, tmp_path: Path, ctx: Any) -> None:
    wrong = tmp_path / "wrong.token"
    wrong.write_text("svt_" + "A" * 43 + "\n")
    driver = load_driver(tmp_path, remote.options(storvisor_token_file=str(wrong)))
    with pytest.raises(exception.VolumeBackendAPIException, match="token"):
        driver.check_for_setup_error()
    volume = new_volume(ctx)
    with pytest.raises(exception.VolumeBackendAPIException, match="token"):
        driver.create_volume(volume)
    assert volume.name not in CLI(remote.home)("volume", "list", "p").out


def test_unreachable_remote_daemon_is_a_backend_api_exception(
    remote: Remote, tmp_path: Path, ctx: Any
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once it is closed
    driver = load_driver(tmp_path, remote.options(storvisor_api_url=f"https://127.0.0.1:{port}"))
    with pytest.raises(exception.VolumeBackendAPIException, match="no answer from the daemon"):
        driver.check_for_setup_error()
    with pytest.raises(exception.VolumeBackendAPIException, match="no answer from the daemon"):
        driver.create_volume(new_volume(ctx))


def test_wrong_fingerprint_is_a_backend_api_exception(remote: Remote, tmp_path: Path) -> None:
    other = ":".join(["AB"] * 32)
    driver = load_driver(tmp_path, remote.options(storvisor_tls_fingerprint=other))
    with pytest.raises(exception.VolumeBackendAPIException, match="not the pinned"):
        driver.check_for_setup_error()

"""A vhost-user-blk export made with the CLI, driven by the Python vhost-user front-end: the
guest sees the volume's serial, an online ``volume extend`` reaches it as a config change,
and what it writes reads back through the volume's NBD export."""

from __future__ import annotations

import subprocess

from storvisor.protocols.vhost_user.messages import BackendRequest
from storvisor.protocols.virtio.blk import Status
from storvisor.testing.vhost_frontend import VhostUserFrontend

MiB = 1 << 20


def test_vhost_export_extend_and_nbd_view(cli, daemon, tmp_path):
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G")
    serial = cli("volume", "create", "p/v", "--size", "64M", "--json").json()["serial"]
    sock = tmp_path / "run" / "v.sock"
    assert cli("export", "vhost-user-blk", "p/v", "--socket", str(sock)).out.strip() == str(sock)

    with VhostUserFrontend(str(sock), queue_size=16) as fe:
        fe.setup()
        assert fe.capacity == 64 * MiB
        status, got = fe.blk.get_id()
        assert status == Status.OK and got == serial.encode()[:20]
        assert fe.blk.write(0, b"\xc3" * 65536) == Status.OK

        # Rolling back a volume a guest has open is refused; nothing changes.
        cli("snapshot", "create", "p/v@s")
        assert "open" in cli.fails("snapshot", "rollback", "p/v@s")

        cli("volume", "extend", "p/v", "--size", "128M")
        request, _ = fe.wait_backend_message()
        assert request == BackendRequest.CONFIG_CHANGE_MSG
        fe.config = fe.get_config(0, 60)
        assert fe.capacity == 128 * MiB
        assert fe.blk.write(128 * MiB - 4096, b"\x3c" * 4096) == Status.OK
        assert fe.blk.flush() == Status.OK

    uri = cli("export", "nbd", "p/v").out.strip()
    out = subprocess.run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0xc3 0 64k",
            "-c",
            f"read -P 0x3c {128 * MiB - 4096} 4k",
            uri,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert out.count("read ") == 2 and "Pattern verification failed" not in out

"""``storvisor pool set-cache`` / ``flush-cache``: bad input, ``pool show``, and data through
the NBD and vhost-user-blk exports of a cached pool (their data planes send every read and
write to the daemon, whose cache serves it), with the cache attached, switched and detached
while the volume is exported."""

from __future__ import annotations

import random
import shutil
import subprocess

from prereq import require, require_module
from storvisor.api.client import Client
from storvisor.protocols.virtio.blk import Status
from storvisor.testing.vhost_frontend import VhostUserFrontend

nbd = require_module("nbd", "python3-libnbd is not installed")

MiB = 1 << 20


def test_set_cache_bad_input_is_one_error_and_changes_nothing(cli, tmp_path):
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:64M")
    cli("pool", "create", "q", "--backing", f"{tmp_path}/other.img:64M")
    err = cli.fails("pool", "set-cache", "p", "--device", f"{tmp_path}/c.img:4M", "--mode", "wb")
    assert "unknown cache mode 'wb'" in err
    err = cli.fails("pool", "set-cache", "p", "--device", f"{tmp_path}/nothere", "--mode",
                    "writeback")  # fmt: skip
    assert "no such cache device" in err
    err = cli.fails("pool", "set-cache", "p", "--device", f"{tmp_path}/c.img:100K", "--mode",
                    "writeback")  # fmt: skip
    assert "too small" in err
    err = cli.fails("pool", "set-cache", "p", "--device", f"{tmp_path}/other.img", "--mode",
                    "writethrough")  # fmt: skip
    assert "other.img" in err and "'q'" in err
    err = cli.fails("pool", "set-cache", "p", "--mode", "none")
    assert "no cache to detach" in err
    err = cli.fails("pool", "flush-cache", "p")
    assert "has no cache" in err
    assert not (tmp_path / "c.img").exists() and not (tmp_path / "nothere").exists()
    assert cli("pool", "show", "p", "--json").json()["cache"] is None
    cli("pool", "set-cache", "q", "--device", f"{tmp_path}/c.img:4M", "--mode", "writeback")
    err = cli.fails("pool", "set-cache", "p", "--device", f"{tmp_path}/c.img", "--mode",
                    "writeback")  # fmt: skip
    assert "c.img" in err
    assert cli("pool", "show", "p", "--json").json()["cache"] is None


def test_pool_show_reports_the_cache(cli, tmp_path):
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:64M")
    cli("volume", "create", "p/v", "--size", "8M")
    shown = cli("pool", "set-cache", "p", "--device", f"{tmp_path}/c.img:4M", "--mode",
                "writeback").out  # fmt: skip
    for label in ("cache", "mode", "dirty", "hit ratio", "destage rate"):
        assert f"\n{label}" in "\n" + shown, label
    cache = cli("pool", "show", "p", "--json").json()["cache"]
    assert cache["mode"] == "writeback" and cache["state"] == "ok"
    assert cache["device"] == f"{tmp_path}/c.img" and cache["dirty"] == 0
    cache = cli("pool", "flush-cache", "p", "--json").json()["cache"]
    assert cache["dirty"] == 0
    assert cli("pool", "set-cache", "p", "--mode", "none", "--json").json()["cache"] is None
    # the device is free again: the same pool (or another) may take it
    cli("pool", "set-cache", "p", "--device", f"{tmp_path}/c.img", "--mode", "writethrough")


def test_data_through_nbd_and_vhost_user_exports_of_a_cached_pool(cli, daemon, tmp_path):
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:256M")
    cli("volume", "create", "p/v", "--size", "16M")
    cli("pool", "set-cache", "p", "--device", f"{tmp_path}/c.img:2M", "--mode", "writeback")
    uri = cli("export", "nbd", "p/v").out.strip()
    sock = str(tmp_path / "v.sock")
    cli("export", "vhost-user-blk", "p/v", "--socket", sock, "--queues", "2")
    rng = random.Random(5)
    model = bytearray(16 * MiB)
    h = nbd.NBD()
    h.connect_uri(uri)
    with VhostUserFrontend(sock, queue_size=16, num_queues=2) as fe:
        fe.setup()

        def write_some(count: int) -> None:
            for i in range(count):
                offset = rng.randrange(0, 16 * MiB // 4096 - 16) * 4096
                data = rng.randbytes(rng.choice([4096, 8192, 65536]))
                if i % 2:
                    h.pwrite(data, offset)
                else:
                    assert fe.blk.write(offset, data, queue=i % 4 // 2) == Status.OK
                model[offset : offset + len(data)] = data

        def check() -> None:
            for offset in range(0, 16 * MiB, MiB):
                assert h.pread(MiB, offset) == model[offset : offset + MiB], offset
                status, data = fe.blk.read(offset, 256 << 10)
                assert status == Status.OK and data == model[offset : offset + (256 << 10)]

        write_some(300)  # in place and allocating, over more lines than the cache holds
        check()
        h.flush()
        cache = cli("pool", "show", "p", "--json").json()["cache"]
        assert cache["hits"] > 0 and cache["misses"] > 0
        metrics = Client(tmp_path / "home" / "api.sock", timeout=30).metrics()
        assert 'storvisor_pool_cache_lookups_total{pool="p",result="hit"}' in metrics
        assert 'storvisor_pool_cache_dirty_bytes{pool="p"}' in metrics
        promtool = shutil.which("promtool")
        require(promtool, "promtool is not installed (Debian package prometheus)")
        assert promtool is not None
        lint = subprocess.run([promtool, "check", "metrics"], input=metrics,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert lint.returncode == 0, lint.stdout + lint.stderr
        write_some(100)
        cli("pool", "set-cache", "p", "--mode", "writethrough")  # destages first, online
        write_some(100)
        check()
        cli("pool", "set-cache", "p", "--mode", "none")  # the planes write directly again
        write_some(100)
        check()
        cli("pool", "set-cache", "p", "--device", f"{tmp_path}/c.img", "--mode", "writeback")
        write_some(100)
        assert fe.blk.flush() == Status.OK
        cli("pool", "flush-cache", "p")
        check()
    h.shutdown()
    cli("pool", "set-cache", "p", "--mode", "none")
    fsck = cli("fsck", "p", "--json").json()
    assert not fsck["leaked"] and not fsck["doubly_owned"] and not fsck["dangling"]

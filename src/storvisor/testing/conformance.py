"""The block-device conformance suite: the executable form of ``engine.device``'s contract.

Every ``BlockDevice`` implementation (raw file, thin volume, snapshot, clone, cached,
throttled, S3-backed) must pass ``check_block_device``::

    def test_thin_volume_conforms(tmp_path):
        check_block_device(lambda size: make_thin_volume(tmp_path, size))

``make_device(size)`` returns a new, writable device of exactly ``size`` bytes that reads as
zeros. Each check raises ``AssertionError`` naming what broke.
"""

from __future__ import annotations

import errno
import random
import threading
from collections.abc import Callable

from storvisor.engine.device import BlockDevice
from storvisor.errors import IOFailure

MakeDevice = Callable[[int], BlockDevice]

SIZE = 4 << 20  # 4 MiB: several clusters at any sane cluster size


def check_block_device(make_device: MakeDevice, *, seed: int = 0) -> None:
    """Run every check against fresh devices from ``make_device``."""
    for check in CHECKS:
        device = make_device(SIZE)
        try:
            check(device, random.Random(seed))
        finally:
            device.close()


def _read(device: BlockDevice, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    device.read_into(offset, memoryview(buf))
    return bytes(buf)


def _expect_errno(code: int, func: Callable[[], object], what: str) -> None:
    try:
        func()
    except IOFailure as e:
        assert e.errno == code, f"{what}: errno {e.errno}, expected {code}"
    else:
        raise AssertionError(f"{what}: no error raised")


def check_starts_zeroed(device: BlockDevice, rng: random.Random) -> None:
    assert device.size == SIZE, f"size {device.size}, expected {SIZE}"
    assert not device.read_only
    assert device.block_size >= 512 and device.block_size & (device.block_size - 1) == 0
    assert _read(device, 0, SIZE) == bytes(SIZE), "a new device must read as zeros"


def check_write_read_unaligned(device: BlockDevice, rng: random.Random) -> None:
    model = bytearray(SIZE)
    for _ in range(200):
        offset = rng.randrange(SIZE)
        length = rng.randrange(1, min(SIZE - offset, 300_000) + 1)
        data = rng.randbytes(length)
        device.write(offset, data)
        model[offset : offset + length] = data
        probe = rng.randrange(SIZE)
        probe_len = rng.randrange(0, min(SIZE - probe, 200_000) + 1)
        got = _read(device, probe, probe_len)
        assert got == model[probe : probe + probe_len], f"read [{probe}, +{probe_len}) differs"
    assert _read(device, 0, SIZE) == model, "full read differs from the model"


def check_write_memoryview_and_fua(device: BlockDevice, rng: random.Random) -> None:
    data = bytearray(rng.randbytes(8192))
    device.write(4096, memoryview(data)[100:5000], fua=True)
    assert _read(device, 4096, 4900) == data[100:5000]
    device.flush()
    assert _read(device, 4096, 4900) == data[100:5000]


def check_bounds(device: BlockDevice, rng: random.Random) -> None:
    _expect_errno(errno.EINVAL, lambda: _read(device, SIZE - 10, 11), "read past end")
    _expect_errno(errno.ENOSPC, lambda: device.write(SIZE - 10, bytes(11)), "write past end")
    _expect_errno(errno.ENOSPC, lambda: device.write_zeroes(SIZE, 1), "write_zeroes past end")
    _expect_errno(errno.EINVAL, lambda: device.block_status(SIZE, 1), "block_status past end")
    assert _read(device, SIZE, 0) == b"", "an empty read at the end is valid"
    # the device still works after errors
    device.write(SIZE - 10, b"x" * 10)
    assert _read(device, SIZE - 10, 10) == b"x" * 10


def check_zeroes_and_discard(device: BlockDevice, rng: random.Random) -> None:
    pattern = rng.randbytes(SIZE)
    device.write(0, pattern)
    model = bytearray(pattern)
    for op in ("zero", "discard", "zero-keep") * 10:
        offset = rng.randrange(SIZE)
        length = rng.randrange(1, min(SIZE - offset, 1 << 20) + 1)
        if op == "discard":
            device.discard(offset, length)
        else:
            device.write_zeroes(offset, length, may_unmap=(op == "zero"))
        model[offset : offset + length] = bytes(length)
        check = rng.randrange(SIZE - length)
        assert _read(device, check, length) == model[check : check + length], f"after {op}"
    assert _read(device, 0, SIZE) == model


def check_block_status(device: BlockDevice, rng: random.Random) -> None:
    device.write(1 << 20, rng.randbytes(65536))
    for _ in range(50):
        offset = rng.randrange(SIZE)
        length = rng.randrange(1, SIZE - offset + 1)
        extents = device.block_status(offset, length)
        assert extents, "block_status returned no extent"
        pos = offset
        for extent in extents:
            assert extent.offset == pos, f"gap or overlap at {pos}: {extent}"
            assert extent.length > 0, f"empty extent {extent}"
            pos += extent.length
        assert pos == offset + length, f"extents end at {pos}, not {offset + length}"
        for extent in extents:
            if extent.zero:
                got = _read(device, extent.offset, extent.length)
                assert got == bytes(extent.length), f"extent {extent} claims zero but has data"
    covering = device.block_status(1 << 20, 65536)
    assert all(e.allocated for e in covering), "written data must be reported as allocated"


def check_concurrent_writers(device: BlockDevice, rng: random.Random) -> None:
    chunk = SIZE // 8
    payloads = [rng.randbytes(chunk) for _ in range(8)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(0, chunk, 4096 * 3):
                n = min(4096 * 3, chunk - j)
                device.write(i * chunk + j, payloads[i][j : j + n])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"concurrent writer failed: {errors[0]!r}"
    assert _read(device, 0, SIZE) == b"".join(payloads), "concurrent writes were lost"


CHECKS: tuple[Callable[[BlockDevice, random.Random], None], ...] = (
    check_starts_zeroed,
    check_write_read_unaligned,
    check_write_memoryview_and_fua,
    check_bounds,
    check_zeroes_and_discard,
    check_block_status,
    check_concurrent_writers,
)

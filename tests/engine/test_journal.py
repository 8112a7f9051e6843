"""The journal of map changes (engine/journal.py): a crash of the process alone loses no
acknowledged write, a reboot makes the journal worthless, and stale records never replay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from storvisor.engine import journal as journal_mod
from storvisor.engine.home import Home
from storvisor.engine.journal import UNMAPPED, Journal
from storvisor.engine.types import BackingSpec

CS = 64 << 10
MiB = 1 << 20


def test_records_replay_in_order_up_to_the_first_torn_one(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal")
    j.start()
    for seq in range(1, 6):
        j.append(seq, 7, seq * 10, seq + 100)
    assert list(j.pending(0)) == [(s, 7, s * 10, s + 100) for s in range(1, 6)]
    assert list(j.pending(3)) == [(4, 7, 40, 104), (5, 7, 50, 105)]
    assert j.newest() == 5
    # a record whose sequence number was never stored (the crash came first) ends the replay
    j.append(6, 7, 60, UNMAPPED)
    base = (6 % journal_mod.RECORDS) * journal_mod.RECORD_WORDS
    j._w[base + 3] = 0
    j.append(7, 7, 70, 170)  # cannot exist after a torn 6, but must not replay if it did
    assert [r[0] for r in j.pending(0)] == [1, 2, 3, 4, 5]
    j.close()
    again = Journal(tmp_path / "journal")
    assert [r[0] for r in again.pending(2)] == [3, 4, 5], "the records outlive the mapping"
    again.close()


def test_a_journal_of_another_boot_replays_nothing(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal")
    j.start()
    j.append(1, 1, 1, 1)
    j.close()
    with open(tmp_path / "journal", "r+b") as f:
        f.seek(16)
        f.write(bytes(16))  # another boot id
    again = Journal(tmp_path / "journal")
    assert list(again.pending(0)) == []
    assert again.newest() == 1, "numbering must still go on above the stale record"
    again.close()


# A process that writes through the engine with the background commit switched off (so
# nothing is committed unless the test asks), prints one JSON line per acknowledged
# operation and waits to be killed. argv: home, then the operations as JSON.
_WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from storvisor.engine import pool as pool_mod
    pool_mod.COMMIT_INTERVAL = 3600.0
    from storvisor.engine.home import Home

    home = Home(Path(sys.argv[1]))
    pool = home.pool("p")
    vols = {}
    for op in json.loads(sys.argv[2]):
        kind = op["op"]
        if kind == "write":
            vol = vols.get(op["vol"]) or vols.setdefault(op["vol"], pool.open_volume(op["vol"]))
            vol.write(op["off"], bytes([op["byte"]]) * op["len"])
        elif kind == "discard":
            vols[op["vol"]].discard(op["off"], op["len"])
        elif kind == "flush":
            pool.flush()
        elif kind == "snapshot":
            pool.create_snapshot(op["vol"], op["name"])
        print(json.dumps(op), flush=True)
    print("done", flush=True)
    time.sleep(3600)
    """
)


def _run_and_kill(home: Path, ops: list[dict[str, object]]) -> None:
    """Run ``ops`` in a worker process, and SIGKILL it once every one was acknowledged."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(home), json.dumps(ops)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        for op in ops:
            line = proc.stdout.readline()
            assert line, (
                f"the worker died before {op}: {proc.stderr.read() if proc.stderr else ''!r}"
            )
            assert json.loads(line) == op
        assert proc.stdout.readline() == b"done\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)


def _read(home: Home, volume: str, snapshot: str | None = None, length: int = 4 * MiB) -> bytes:
    vol = home.pool("p").open_volume(volume, snapshot)
    try:
        buf = bytearray(length)
        vol.read_into(0, memoryview(buf))
        return bytes(buf)
    finally:
        vol.close()


def _same(got: bytes, want: bytes | bytearray) -> bool:
    """Whether ``got == want``, printing the first differing 4 KiB block when not (an
    assertion on megabytes of bytes would make pytest diff them for minutes)."""
    if got == want:
        return True
    first = next(i for i in range(0, len(want), 4096) if got[i : i + 4096] != want[i : i + 4096])
    print(f"first difference in the block at {first:#x} of {len(want):#x} bytes")
    return False


def _writes(vol: str, byte: int, offsets: list[int], length: int = 4096) -> list[dict[str, object]]:
    return [{"op": "write", "vol": vol, "off": o, "len": length, "byte": byte} for o in offsets]


def test_a_killed_process_loses_no_acknowledged_write(tmp_path: Path) -> None:
    """Writes that allocated (first writes, copy-on-write after a snapshot, after a discard)
    and were acknowledged but never flushed or committed survive a SIGKILL of the process,
    twice in a row (the second process's records follow the replayed ones); fsck stays clean
    and the snapshot keeps its own data."""
    home_dir = tmp_path / "home"
    with Home(home_dir) as home:
        home.create_pool("p", [BackingSpec(str(tmp_path / "b0.img"), size=64 * MiB)], CS)
        home.pool("p").create_volume("v", 4 * MiB)
        home.pool("p").create_volume("w", 4 * MiB)
    first = [
        *_writes("v", 0xA1, [0, CS, 5 * CS + 512]),
        {"op": "snapshot", "vol": "v", "name": "s"},
        *_writes("v", 0xB2, [0, 9 * CS]),  # copy-on-write, and a fresh cluster
        *_writes("w", 0xC3, [2 * MiB]),
        {"op": "discard", "vol": "v", "off": CS, "len": CS},
        *_writes("v", 0xD4, [CS + 100], length=300),  # allocates again after the discard
    ]
    _run_and_kill(home_dir, first)
    expected = bytearray(4 * MiB)
    expected[0:4096] = b"\xb2" * 4096
    expected[CS + 100 : CS + 400] = b"\xd4" * 300
    expected[5 * CS + 512 : 5 * CS + 512 + 4096] = b"\xa1" * 4096
    expected[9 * CS : 9 * CS + 4096] = b"\xb2" * 4096
    snapshot = bytearray(4 * MiB)
    for off in (0, CS, 5 * CS + 512):
        snapshot[off : off + 4096] = b"\xa1" * 4096
    with Home(home_dir) as home:
        assert home.pool("p").fsck().clean
        assert _same(_read(home, "v"), expected), "acknowledged writes were lost with the process"
        assert _same(_read(home, "v", "s"), snapshot)
        assert _same(_read(home, "w")[2 * MiB : 2 * MiB + 4096], b"\xc3" * 4096)
    second = _writes("v", 0xE5, [20 * CS, 21 * CS])
    _run_and_kill(home_dir, second)
    expected[20 * CS : 20 * CS + 4096] = b"\xe5" * 4096
    expected[21 * CS : 21 * CS + 4096] = b"\xe5" * 4096
    with Home(home_dir) as home:
        assert home.pool("p").fsck().clean
        assert _same(_read(home, "v"), expected), "the second process's records were lost"
        assert _same(_read(home, "v", "s"), snapshot)


def test_after_a_reboot_only_flushed_writes_count(tmp_path: Path) -> None:
    """A journal written before a reboot (another boot id) replays nothing: the unflushed
    writes of the killed process are gone, the flushed ones stay, fsck is clean, and new
    records after that work."""
    home_dir = tmp_path / "home"
    with Home(home_dir) as home:
        home.create_pool("p", [BackingSpec(str(tmp_path / "b0.img"), size=64 * MiB)], CS)
        home.pool("p").create_volume("v", 4 * MiB)
    _run_and_kill(home_dir, [*_writes("v", 0x11, [0]), {"op": "flush"}, *_writes("v", 0x22, [CS])])
    journal = home_dir / "pools" / "p" / "journal"
    with open(journal, "r+b") as f:
        f.seek(16)
        f.write(os.urandom(16))
    with Home(home_dir) as home:
        assert home.pool("p").fsck().clean
        data = _read(home, "v")
        assert data[:4096] == b"\x11" * 4096
        assert data[CS : CS + 4096] == bytes(4096), "a record of another boot was replayed"
    _run_and_kill(home_dir, _writes("v", 0x33, [2 * CS]))
    with Home(home_dir) as home:
        assert home.pool("p").fsck().clean
        assert _read(home, "v")[2 * CS : 2 * CS + 4096] == b"\x33" * 4096

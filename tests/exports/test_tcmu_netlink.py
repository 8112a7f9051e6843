"""The generic netlink codec of ``exports.tcmu_netlink``: the GETFAMILY request byte for
byte, the controller's replies (the group found among several, errors, garbage)."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from storvisor.errors import LocalFailure, NotFound
from storvisor.exports.tcmu_netlink import (
    CTRL_ATTR_FAMILY_ID,
    CTRL_ATTR_FAMILY_NAME,
    CTRL_ATTR_MCAST_GROUPS,
    CTRL_ATTR_MCAST_GRP_ID,
    CTRL_ATTR_MCAST_GRP_NAME,
    CTRL_CMD_NEWFAMILY,
    GENL_ID_CTRL,
    NLMSG_ERROR,
    attributes,
    config_listener,
    family_request,
    mcast_group_id,
)

NLA_F_NESTED = 0x8000


def attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def message(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 1, 0) + body


def family_reply(groups: list[tuple[str, int]]) -> bytes:
    nested = b"".join(
        attr(
            NLA_F_NESTED | (i + 1),
            attr(CTRL_ATTR_MCAST_GRP_ID, struct.pack("=I", gid))
            + attr(CTRL_ATTR_MCAST_GRP_NAME, name.encode() + b"\0"),
        )
        for i, (name, gid) in enumerate(groups)
    )
    body = struct.pack("=BBH", CTRL_CMD_NEWFAMILY, 2, 0)
    body += attr(CTRL_ATTR_FAMILY_NAME, b"TCM-USER\0")
    body += attr(CTRL_ATTR_FAMILY_ID, struct.pack("=H", 0x1F))
    body += attr(NLA_F_NESTED | CTRL_ATTR_MCAST_GROUPS, nested)
    return message(GENL_ID_CTRL, body)


def test_family_request_bytes() -> None:
    name = b"TCM-USER\0"  # 9 bytes: the attribute is 13 long, padded to 16
    expected = struct.pack("=IHHII", 36, 16, 1, 7, 0) + struct.pack("=BBH", 3, 1, 0)
    expected += struct.pack("=HH", 13, 2) + name + bytes(3)
    assert family_request("TCM-USER", 7) == expected


def test_the_group_is_found_among_several() -> None:
    reply = family_reply([("other", 3), ("config", 12)])
    assert mcast_group_id(reply, "TCM-USER", "config") == 12
    assert mcast_group_id(reply + bytes(20), "TCM-USER", "other") == 3  # trailing bytes


def test_a_missing_group_is_not_found() -> None:
    with pytest.raises(NotFound, match="no multicast group config"):
        mcast_group_id(family_reply([("other", 3)]), "TCM-USER", "config")


def test_an_error_reply_names_the_family() -> None:
    reply = message(NLMSG_ERROR, struct.pack("=i", -errno.ENOENT) + bytes(16))
    with pytest.raises(NotFound, match="no generic netlink family TCM-USER"):
        mcast_group_id(reply, "TCM-USER", "config")


@pytest.mark.parametrize(
    "reply",
    [
        b"",
        bytes(15),
        bytes(16),  # a length of 0
        struct.pack("=IHHII", 400, GENL_ID_CTRL, 0, 1, 0) + bytes(8),  # longer than sent
        message(GENL_ID_CTRL, b""),  # no generic netlink header
        message(99, struct.pack("=BBH", 1, 2, 0)),  # not the controller
        message(GENL_ID_CTRL, struct.pack("=BBH", 1, 2, 0) + struct.pack("=HH", 40, 7)),
    ],
)
def test_garbage_is_a_local_failure(reply: bytes) -> None:
    with pytest.raises(LocalFailure):
        mcast_group_id(reply, "TCM-USER", "config")


def test_attributes_are_walked_with_padding() -> None:
    data = attr(1, b"abcde") + attr(2, b"") + attr(NLA_F_NESTED | 3, b"xy")
    assert attributes(data) == [(1, b"abcde"), (2, b""), (3, b"xy")]
    with pytest.raises(LocalFailure):
        attributes(struct.pack("=HH", 2, 1))  # shorter than its header


def test_the_listener_joins_or_names_what_is_missing() -> None:
    """On this kernel: joined when target_core_user is loaded, else NotFound naming TCM-USER
    (the guest tests in tests/lio join it for real)."""
    loaded = os.path.isdir("/sys/module/target_core_user")
    try:
        with config_listener():
            joined = True
    except NotFound as e:
        assert "TCM-USER" in str(e)
        joined = False
    assert joined == loaded

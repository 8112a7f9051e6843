"""A listener in the ``config`` group of target_core_user's netlink family (``TCM-USER``).

Theory of operation
-------------------
The kernel reconfigures an enabled TCMU device (a write of ``attrib/dev_size``,
``attrib/dev_config`` or ``attrib/emulate_write_cache``) only after it told user space:
``tcmu_netlink_event_send`` multicasts ``TCMU_CMD_RECONFIG_DEVICE`` to the ``config``
group of the generic netlink family ``TCM-USER`` and fails the write with ``ESRCH`` when
nobody has joined that group (``drivers/target/target_core_user.c``). A device created with
``nl_reply_supported=-1`` (as storvisor creates them) waits for no ``*_DONE`` reply, so it
is enough that a socket is in the group while the attribute is written:
``config_listener`` opens one (resolving the group's id with ``CTRL_CMD_GETFAMILY`` of the
generic netlink controller), yields, and closes it; the events it received are dropped.

``family_request`` and ``mcast_group_id`` are the codec (``include/uapi/linux/netlink.h``,
``genetlink.h``), pure functions over bytes; the socket calls are in ``config_listener``.

Errors: ``NotFound`` when the family or its group is not registered (target_core_user is
not loaded), ``LocalFailure`` when the socket cannot be opened or joined (not root, no
netlink) or the controller answers garbage.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Iterator

from storvisor.errors import LocalFailure, NotFound

FAMILY = "TCM-USER"
"""The generic netlink family of target_core_user."""
CONFIG_GROUP = "config"
"""Its only multicast group: device added, removed, reconfigured."""

NETLINK_GENERIC = 16
GENL_ID_CTRL = 16
CTRL_CMD_NEWFAMILY = 1
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1

NLMSGHDR = struct.Struct("=IHHII")
"""``struct nlmsghdr``: len, type, flags, seq, pid (host byte order)."""
GENLMSGHDR = struct.Struct("=BBH")
"""``struct genlmsghdr``: cmd, version, reserved."""
NLATTR = struct.Struct("=HH")
"""``struct nlattr``: len, type; the payload follows, padded to 4 bytes."""
NLMSGERR = struct.Struct("=i")


def _align(n: int) -> int:
    return (n + 3) & ~3


def family_request(name: str, seq: int) -> bytes:
    """A ``CTRL_CMD_GETFAMILY`` request for the family ``name``."""
    value = name.encode() + b"\0"
    attr = NLATTR.pack(NLATTR.size + len(value), CTRL_ATTR_FAMILY_NAME) + value
    attr += bytes(_align(len(attr)) - len(attr))
    body = GENLMSGHDR.pack(CTRL_CMD_GETFAMILY, 1, 0) + attr
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), GENL_ID_CTRL, NLM_F_REQUEST, seq, 0) + body


def attributes(data: bytes) -> list[tuple[int, bytes]]:
    """The netlink attributes in ``data``: (type, payload) in order.

    Raises:
        LocalFailure: an attribute's length runs past ``data``.
    """
    found = []
    pos = 0
    while pos + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, pos)
        if length < NLATTR.size or pos + length > len(data):
            raise LocalFailure(f"malformed netlink attribute (length {length} at {pos})")
        found.append((kind & NLA_TYPE_MASK, data[pos + NLATTR.size : pos + length]))
        pos += _align(length)
    return found


def mcast_group_id(reply: bytes, family: str, group: str) -> int:
    """The id of multicast group ``group`` in the controller's reply to ``family_request``.

    Raises:
        NotFound: the controller answered with an error (no such family), or the family
            has no such group.
        LocalFailure: the reply is not a controller message.
    """
    if len(reply) < NLMSGHDR.size:
        raise LocalFailure(f"short netlink reply ({len(reply)} bytes)")
    length, kind, _, _, _ = NLMSGHDR.unpack_from(reply)
    if length < NLMSGHDR.size or length > len(reply):
        raise LocalFailure(f"netlink reply of length {length} in {len(reply)} bytes")
    if kind == NLMSG_ERROR:
        error = -NLMSGERR.unpack_from(reply, NLMSGHDR.size)[0]
        reason = os.strerror(error) if error else "no answer"
        raise NotFound(f"no generic netlink family {family} ({reason})")
    if kind != GENL_ID_CTRL or length < NLMSGHDR.size + GENLMSGHDR.size:
        raise LocalFailure(f"unexpected netlink reply of type {kind}")
    for attr, value in attributes(reply[NLMSGHDR.size + GENLMSGHDR.size : length]):
        if attr != CTRL_ATTR_MCAST_GROUPS:
            continue
        for _, nested in attributes(value):
            fields = dict(attributes(nested))
            name = fields.get(CTRL_ATTR_MCAST_GRP_NAME, b"").rstrip(b"\0").decode()
            raw_id = fields.get(CTRL_ATTR_MCAST_GRP_ID, b"")
            if name == group and len(raw_id) == 4:
                return int(struct.unpack("=I", raw_id)[0])
    raise NotFound(f"generic netlink family {family} has no multicast group {group}")


@contextlib.contextmanager
def config_listener(timeout: float = 5.0) -> Iterator[None]:
    """A socket in the ``config`` group of ``TCM-USER`` while the block runs.

    Raises:
        NotFound: target_core_user is not loaded.
        LocalFailure: the socket cannot be opened, asked or joined.
    """
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
    except OSError as e:
        raise LocalFailure(f"cannot open a generic netlink socket: {e.strerror}") from e
    with sock:
        try:
            sock.settimeout(timeout)
            sock.bind((0, 0))
            sock.send(family_request(FAMILY, 1))
            group = mcast_group_id(sock.recv(65536), FAMILY, CONFIG_GROUP)
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except TimeoutError as e:
            raise LocalFailure("the generic netlink controller did not answer") from e
        except OSError as e:
            what = "join" if e.errno in (errno.EPERM, errno.EACCES) else "ask"
            raise LocalFailure(
                f"cannot {what} the netlink group {FAMILY}/{CONFIG_GROUP}: {e.strerror}"
            ) from e
        yield

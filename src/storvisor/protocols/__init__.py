"""Sans-I/O codecs and state machines (nbd, vhost_user, virtio, and the frames of
storvisor's own inter-process links).

Nothing below this package imports ``socket``, ``asyncio``, ``selectors`` or ``threading``:
bytes go in, events come out; the servers in ``storvisor.exports`` do the I/O.
"""

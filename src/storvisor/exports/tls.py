"""TLS for the export servers: the server's context, and a TLS stream over a connected socket
that one thread may read while another writes.

Theory of operation
-------------------
An OpenSSL connection object must not be used by two threads at once, and CPython's
``ssl.SSLSocket`` takes no lock around it: a reader blocked in ``recv`` and a writer in
``sendall`` on one ``SSLSocket`` may corrupt the session. The NBD export receives requests
in one thread while another sends replies, so ``TlsStream`` keeps the TLS state in an
``ssl.SSLObject`` over two memory BIOs instead and does the socket I/O itself:

* every call into the ``SSLObject`` (handshake, decrypt, encrypt) holds ``_lock``, which is
  never held while waiting on the socket;
* the encrypted bytes leave in the order OpenSSL produced them: ``_send_lock`` is held from
  taking them out of the outgoing BIO until the socket has accepted them (lock order:
  ``_send_lock`` before ``_lock``);
* a reader that needs more bytes ``recv``s from the socket without any lock, then hands
  them to the incoming BIO.

Records OpenSSL writes while decrypting (a TLS 1.3 key update, an alert) are sent by the
reader; a reader does that while the writer may be blocked on a client that does not read,
which stalls the reader as well, as a full send queue stalls it anyway.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading

from storvisor.engine.device import Buffer
from storvisor.errors import InvalidArgument, ProtocolError

_RECV_SIZE = 256 << 10
_WRITE_CHUNK = 256 << 10  # plaintext encrypted per lock hold (the BIO holds its ciphertext)


def server_context(
    cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]
) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or later) with the PEM certificate chain in
    ``cert_file`` and its unencrypted private key in ``key_file``. Clients are not asked
    for certificates.

    Raises:
        InvalidArgument: a file cannot be read, is not PEM, the key does not match the
            certificate, or the key is encrypted.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2

    def no_password() -> bytes:
        raise InvalidArgument(f"TLS key {key_file} is encrypted: give an unencrypted key")

    try:
        context.load_cert_chain(cert_file, key_file, password=no_password)
    except ssl.SSLError as e:
        raise InvalidArgument(
            f"TLS certificate {cert_file} and key {key_file} are not a PEM certificate and "
            f"its private key ({e.reason or e})"
        ) from e
    except OSError as e:
        raise InvalidArgument(
            f"cannot read TLS certificate {cert_file} or key {key_file}: {e.strerror or e}"
        ) from e
    return context


class TlsStream:
    """The server side of TLS over the connected socket ``sock``, which the stream owns.

    ``received`` are bytes of the client's first TLS flight already read from ``sock``.
    Call ``handshake`` first; then one thread may ``recv_into`` while another ``sendall``s.
    ``shutdown`` may be called from any thread to wake both.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, received: bytes = b"") -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._established = False
        if received:
            self._incoming.write(received)

    @property
    def version(self) -> str | None:
        """The TLS version negotiated (``"TLSv1.3"``), or None before the handshake."""
        return self._tls.version()

    def handshake(self) -> None:
        """Run the TLS handshake to its end.

        Raises:
            ProtocolError: the client broke off the handshake or sent something that is not
                TLS (an alert explaining why is sent to the client first).
            OSError: the socket failed.
        """
        while True:
            done = False
            failure: ssl.SSLError | None = None
            with self._lock:
                try:
                    self._tls.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as e:
                    failure = e
            if failure is not None:
                with contextlib.suppress(OSError):
                    self._flush()  # the alert
                raise ProtocolError(f"TLS handshake failed: {_reason(failure)}") from failure
            self._flush()
            if done:
                self._established = True
                return
            data = self._sock.recv(_RECV_SIZE)
            if not data:
                raise ProtocolError("the client closed the connection during the TLS handshake")
            with self._lock:
                self._incoming.write(data)

    def recv_into(self, buffer: memoryview, /) -> int:
        """Decrypt received data into ``buffer``: everything already received that fits,
        waiting only while there is nothing. Returns how many bytes, 0 at the end of the
        stream (the client closed, with or without a TLS close_notify).

        Raises:
            ProtocolError: the client sent a broken TLS record.
            OSError: the socket failed.
        """
        size = len(buffer)
        filled = 0
        while True:
            end = False
            with self._lock:
                try:
                    while filled < size:  # one TLS record per read
                        # into a buffer, read returns the count (typeshed knows only bytes)
                        got: int = self._tls.read(size - filled, buffer[filled:])  # type: ignore[assignment]
                        if not got:
                            end = True
                            break
                        filled += got
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    end = True
                except ssl.SSLError as e:
                    raise ProtocolError(f"TLS: {_reason(e)}") from e
                unsent = self._outgoing.pending
            if unsent:
                self._flush()
            if filled or end:
                return filled
            data = self._sock.recv(_RECV_SIZE)
            if not data:
                return 0
            with self._lock:
                self._incoming.write(data)

    def sendall(self, data: Buffer, /) -> None:
        """Encrypt and send all of ``data``.

        Raises:
            OSError: the socket failed (the client went away).
        """
        view = memoryview(data)
        if not view.nbytes:
            return
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        with self._send_lock:
            for start in range(0, len(view), _WRITE_CHUNK):
                with self._lock:
                    self._tls.write(view[start : start + _WRITE_CHUNK])
                    out = self._outgoing.read()
                self._sock.sendall(out)

    def shutdown(self, how: int, /) -> None:
        """Shut the socket down (wakes a blocked ``recv_into`` or ``sendall``)."""
        self._sock.shutdown(how)

    def close(self) -> None:
        """Send a TLS close_notify if the socket takes it at once, then close the socket.
        Call it when no other thread uses the stream any more."""
        if self._established:
            with contextlib.suppress(OSError), self._send_lock:
                with self._lock:
                    with contextlib.suppress(ssl.SSLError):
                        self._tls.unwrap()
                    out = self._outgoing.read()
                if out:
                    self._sock.setblocking(False)  # a client that does not read is left
                    self._sock.send(out)
        self._sock.close()

    def _flush(self) -> None:
        with self._send_lock:
            with self._lock:
                out = self._outgoing.read()
            if out:
                self._sock.sendall(out)


def _reason(e: ssl.SSLError) -> str:
    return str(e.reason or e.strerror or e).replace("_", " ").lower()

"""A small TCP proxy for the mirror tests: it forwards to a server, and can be stopped
(connections refused, open ones cut), restarted on its port, stalled (it accepts and
reads, but forwards nothing and never answers), held (it forwards nothing until released,
then all of it: an endpoint that answers late), made to cut answers (it forwards the
first chunk of what the server sends, then closes the connection: a response ends early),
or slowed (``rate``: each connection's answers, in bytes per second), or made to corrupt
answers (``corrupting``: one byte flipped in every chunk of an answer that carries no
status line, so bodies change and headers do not), or made to lose one answer
(``lose_answer``: the server does the next matching request, the client never hears of it:
the connection closes before the final answer; a ``100 Continue`` still goes through, so
that the client sends the body)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class Proxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.stalled = threading.Event()
        self.held = threading.Event()
        self.cutting = threading.Event()
        self.corrupting = threading.Event()
        self.rate = 0.0
        """Bytes per second of each connection's answers (0: as fast as they come)."""
        self._lose: bytes | None = None
        self.lost = 0
        """Answers lost so far (``lose_answer``)."""
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def accepted(self) -> int:
        """Connections accepted and forwarded so far (and not cut by ``stop``)."""
        with self._lock:
            return len(self._conns) // 2

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def lose_answer(self, request_line: bytes) -> None:
        """Lose the answer to the next request whose first line starts with
        ``request_line`` (say ``b"PUT /bucket/key"``): forwarded to the server, its answer
        swallowed and the connection closed."""
        with self._lock:
            self._lose = request_line

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            deaf = threading.Event()  # this connection's next answer is lost
            for a, b, answers in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(a, b, answers, deaf), daemon=True).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, answers: bool, deaf: threading.Event
    ) -> None:
        due = 0.0  # when the answers forwarded so far are due at ``rate``
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.stalled.is_set():
                    continue  # swallowed: the peer waits for an answer that never comes
                if not answers and self._lose is not None:
                    with self._lock:
                        if self._lose is not None and data.startswith(self._lose):
                            self._lose = None
                            deaf.set()
                if answers and deaf.is_set() and not data.startswith(b"HTTP/1.1 100 "):
                    with self._lock:
                        self.lost += 1
                    with contextlib.suppress(OSError):
                        src.shutdown(socket.SHUT_RDWR)
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_RDWR)
                    break
                while self.held.is_set():
                    time.sleep(0.01)
                rate = self.rate
                if answers and rate:
                    now = time.monotonic()
                    due = max(due, now) + len(data) / rate
                    time.sleep(due - now)
                if answers and self.corrupting.is_set() and b"HTTP/1." not in data:
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                dst.sendall(data)
                if answers and self.cutting.is_set():
                    with contextlib.suppress(OSError):
                        src.shutdown(socket.SHUT_RDWR)
                    break
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

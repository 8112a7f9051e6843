"""Bearer tokens of the API on TCP, kept in ``HOME/tokens.json`` as hashes only.

Theory of operation
-------------------
``TokenStore.create`` draws a token (``svt_`` and 43 URL-safe characters: 256 random bits),
returns it once and records only its SHA-256 digest, its name, whether it is read-only and
when it was made. A token of 256 random bits needs no salt or slow hash: the digest is as
hard to invert as the token is to guess. ``verify`` hashes the presented token and compares it
with every recorded digest in constant time (``hmac.compare_digest``), so neither the answer
nor its timing says how much of a wrong token was right.

The file is written atomically (``save_json``) under ``HOME/tokens.lock`` (``flock``), so two
``token`` commands never lose each other's change; the daemon rereads it whenever it changes,
so a token created or revoked while the daemon runs counts from the next request.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from storvisor.api.codec import decode_list, encode, save_json
from storvisor.errors import Conflict, CorruptMetadata, InvalidArgument, NotFound, ProtocolError

TOKENS_FILE = "tokens.json"
TOKEN_PREFIX = "svt_"

_LOCK_FILE = "tokens.lock"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as listed: never the token itself."""

    name: str
    read_only: bool
    created: float  # Unix time


@dataclass(frozen=True, slots=True)
class _Stored:
    name: str
    read_only: bool
    created: float
    sha256: str  # hex digest of the token


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def looks_like_token(text: str) -> bool:
    """Whether ``text`` has the form of a storvisor token (to refuse one sent in a URL)."""
    return TOKEN_PREFIX in text


class TokenStore:
    """The tokens of one HOME. Thread-safe (the daemon verifies from several threads)."""

    def __init__(self, home: Path) -> None:
        self._path = home / TOKENS_FILE
        self._lock_path = home / _LOCK_FILE
        self._mutex = threading.Lock()
        self._cache_key: tuple[int, int, int] | None = None
        self._cache: list[_Stored] = []

    # -- the token commands ----------------------------------------------------------------

    def create(self, name: str, *, read_only: bool = False) -> tuple[TokenInfo, str]:
        """Record a new token and return it (the only time it is available). Raises
        ``InvalidArgument`` for a bad name, ``Conflict`` if the name is taken."""
        if not _NAME_RE.match(name):
            raise InvalidArgument(
                f"invalid token name {name!r}: use letters, digits, '.', '_' and '-' "
                "(up to 63, starting with a letter or digit)"
            )
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._locked():
            stored = self._load()
            if any(s.name == name for s in stored):
                raise Conflict(f"token {name} exists (revoke it first)")
            entry = _Stored(name, read_only, time.time(), _digest(token).hex())
            self._save([*stored, entry])
        return TokenInfo(name, read_only, entry.created), token

    def tokens(self) -> list[TokenInfo]:
        """Every token, in the order they were created."""
        return [TokenInfo(s.name, s.read_only, s.created) for s in self._load()]

    def revoke(self, name: str) -> None:
        """Forget token ``name``; ``NotFound`` if there is none."""
        with self._locked():
            stored = self._load()
            kept = [s for s in stored if s.name != name]
            if len(kept) == len(stored):
                raise NotFound(f"no token named {name}")
            self._save(kept)

    # -- the daemon ---------------------------------------------------------------------

    def verify(self, token: str) -> TokenInfo | None:
        """The token ``token`` is, or ``None``. Raises ``CorruptMetadata`` if the file cannot
        be parsed."""
        digest = _digest(token)
        found: _Stored | None = None
        for s in self._current():
            if hmac.compare_digest(bytes.fromhex(s.sha256), digest):
                found = s
        return None if found is None else TokenInfo(found.name, found.read_only, found.created)

    def _current(self) -> list[_Stored]:
        with self._mutex:
            try:
                st = os.stat(self._path)
                key: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                key = None
            if key != self._cache_key or key is None:
                self._cache = self._load()
                self._cache_key = key
            return self._cache

    # -- the file -----------------------------------------------------------------------

    def _load(self) -> list[_Stored]:
        try:
            text = self._path.read_text()
        except FileNotFoundError:
            return []
        try:
            stored = decode_list(_Stored, json.loads(text)["tokens"])
            for s in stored:
                if len(bytes.fromhex(s.sha256)) != 32:
                    raise ValueError(f"token {s.name}: not a SHA-256 digest")
        except (ValueError, KeyError, TypeError, ProtocolError) as e:
            raise CorruptMetadata(f"{self._path}: unreadable tokens: {e}") from e
        return stored

    def _save(self, stored: list[_Stored]) -> None:
        save_json(self._path, {"tokens": encode(stored)}, mode=0o600)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

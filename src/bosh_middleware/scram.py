"""SCRAM client (RFC 5802, RFC 7677) and the salted-password cache.

PBKDF2 is by far the most expensive thing a prebind does on the web server (10,000 iterations of
HMAC per login with Prosody's defaults), and it is a pure function of (password, salt, iteration
count). Servers keep the salt and count stable per account, so caching the derived keys turns a
repeat login into a handful of HMACs. A server that stores plain passwords (Prosody's
``internal_plain``; its default is ``internal_hashed``) picks a new salt for every login, so
there every prebind derives anew: that derivation is done with ``cryptography``'s PBKDF2 when
it is installed (``bosh-middleware[speedups]``), whose wheels carry a newer OpenSSL than most
Pythons link (measured on Debian 12's OpenSSL 3.0: 0.45x the time of ``hashlib.pbkdf2_hmac``).
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import secrets
import stringprep
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable

from .errors import AuthenticationFailed, ProtocolError

__all__ = [
    "MAX_ITERATIONS",
    "MIN_ITERATIONS",
    "SCRAM_HASHES",
    "ScramClient",
    "clear_cache",
    "derivations",
    "pbkdf2_backend",
    "salted_password",
    "saslprep",
]

#: SASL mechanism name -> hashlib name. Order is not preference; see ``sasl.py``.
SCRAM_HASHES = {
    "SCRAM-SHA-512": "sha512",
    "SCRAM-SHA-256": "sha256",
    "SCRAM-SHA-1": "sha1",
}

#: A hostile server could ask for 10**9 iterations and pin a web worker's CPU; refuse instead.
MAX_ITERATIONS = 200_000
#: RFC 5802/7677: "at least 4096" (Prosody asks 10,000, ejabberd 4096). Fewer, or an empty salt,
#: would make the proof that goes over the wire cheap to attack offline: over plain HTTP anyone
#: on the path could ask for one iteration.
MIN_ITERATIONS = 4096
_CACHE_SIZE = 4096

_cache: OrderedDict[tuple[str, str, bytes, bytes, int], tuple[bytes, bytes]] = OrderedDict()
_cache_lock = threading.Lock()
_derived = 0  # key derivations (PBKDF2) run in this process


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _hashlib_pbkdf2(hash_name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac(hash_name, password, salt, iterations)


def _cryptography_pbkdf2() -> Callable[[str, bytes, bytes, int], bytes] | None:
    """``cryptography``'s PBKDF2 in ``hashlib.pbkdf2_hmac``'s shape, or None when it is missing
    or does not agree with hashlib on a short derivation of each hash (a broken build would
    otherwise turn every SCRAM login into a wrong proof). Both release the GIL."""
    try:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
    except ImportError:
        return None
    algorithms: dict[str, Callable[[], hashes.HashAlgorithm]] = {
        "sha1": hashes.SHA1,
        "sha256": hashes.SHA256,
        "sha512": hashes.SHA512,
    }

    def derive(hash_name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        try:
            algorithm = algorithms[hash_name]()
            kdf = PBKDF2HMAC(algorithm, algorithm.digest_size, salt, iterations)
        except Exception:  # (a build that refuses the hash, FIPS and SHA-1: hashlib decides)
            return _hashlib_pbkdf2(hash_name, password, salt, iterations)
        return kdf.derive(password)

    try:
        for name in algorithms:
            if derive(name, b"pencil", b"salt", 2) != _hashlib_pbkdf2(name, b"pencil", b"salt", 2):
                return None
    except Exception:
        return None
    return derive


_pbkdf2: Callable[[str, bytes, bytes, int], bytes] | None = None
_pbkdf2_lock = threading.Lock()


def pbkdf2_backend() -> str:
    """Which PBKDF2 a derivation uses here: ``"cryptography"`` or ``"hashlib"``."""
    return "hashlib" if _pick_pbkdf2() is _hashlib_pbkdf2 else "cryptography"


def _pick_pbkdf2() -> Callable[[str, bytes, bytes, int], bytes]:
    global _pbkdf2
    if _pbkdf2 is None:
        with _pbkdf2_lock:  # (on first use, not at import: importing cryptography takes time)
            if _pbkdf2 is None:
                _pbkdf2 = _cryptography_pbkdf2() or _hashlib_pbkdf2
    return _pbkdf2


def salted_password(hash_name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
    """RFC 5802's ``Hi(password, salt, i)``: PBKDF2-HMAC with one block of output."""
    return (_pbkdf2 or _pick_pbkdf2())(hash_name, password, salt, iterations)


def derivations() -> int:
    """How many key derivations (PBKDF2) this process has run: against a server that salts
    every login afresh, one per SCRAM login (``bosh-middleware check --jid`` reports it)."""
    return _derived


def _cache_key(
    hash_name: str, username: str, password: str, salt: bytes, iterations: int
) -> tuple[str, str, bytes, bytes, int]:
    # A digest of the password, not the password: a changed password must miss.
    return (hash_name, username, hashlib.sha256(password.encode()).digest(), salt, iterations)


def _cached(key: tuple[str, str, bytes, bytes, int]) -> tuple[bytes, bytes] | None:
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
        return hit


def _keys(
    hash_name: str, username: str, password: str, salt: bytes, iterations: int
) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey), from the cache when possible."""
    key = _cache_key(hash_name, username, password, salt, iterations)
    hit = _cached(key)
    if hit is not None:
        return hit
    salted = salted_password(hash_name, password.encode(), salt, iterations)
    keys = (
        hmac.digest(salted, b"Client Key", hash_name),
        hmac.digest(salted, b"Server Key", hash_name),
    )
    global _derived
    with _cache_lock:
        _derived += 1
        _cache[key] = keys
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return keys


def saslprep(value: str) -> str:
    """RFC 4013 SASLprep (as a "query": unassigned code points are allowed)."""
    if value.isascii() and value.isprintable():
        return value
    mapped = []
    for ch in value:
        if stringprep.in_table_c12(ch):
            mapped.append(" ")
        elif not stringprep.in_table_b1(ch):
            mapped.append(ch)
    out = unicodedata.normalize("NFKC", "".join(mapped))
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21,
        stringprep.in_table_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    for ch in out:
        if any(table(ch) for table in prohibited):
            raise ValueError("string contains a character SASLprep prohibits")
    if any(stringprep.in_table_d1(ch) for ch in out):
        if any(stringprep.in_table_d2(ch) for ch in out):
            raise ValueError("string mixes right-to-left and left-to-right characters")
        if not (stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1])):
            raise ValueError("right-to-left string must start and end with an RTL character")
    return out


def _escape_username(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


def _parse_attributes(message: bytes) -> dict[str, str]:
    try:
        text = message.decode()
    except UnicodeDecodeError:
        raise ProtocolError("SCRAM message is not UTF-8") from None
    attrs: dict[str, str] = {}
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ProtocolError("malformed SCRAM message")
        attrs.setdefault(part[0], part[2:])
    return attrs


class ScramClient:
    """One SCRAM exchange. Feed it the server's messages; it never does I/O."""

    __slots__ = (
        "_auth_message",
        "_checked",
        "_client_first_bare",
        "_hash",
        "_nonce",
        "_password",
        "_server_signature",
        "_username",
        "mechanism",
    )

    def __init__(
        self, mechanism: str, username: str, password: str, *, nonce: str | None = None
    ) -> None:
        if mechanism not in SCRAM_HASHES:
            raise ValueError(f"not a SCRAM mechanism: {mechanism}")
        self.mechanism = mechanism
        self._hash = SCRAM_HASHES[mechanism]
        self._username = saslprep(username)
        self._password = saslprep(password)
        self._nonce = nonce or secrets.token_urlsafe(18)
        self._client_first_bare = f"n={_escape_username(self._username)},r={self._nonce}"
        self._auth_message = b""
        self._server_signature = b""
        #: ``derivation``'s reading of a server-first message, for ``client_final``:
        #: (message, nonce, salt, iterations, keys or None)
        self._checked: tuple[bytes, str, bytes, int, tuple[bytes, bytes] | None] | None = None

    def __repr__(self) -> str:
        return f"<ScramClient {self.mechanism} user={self._username!r}>"

    def client_first(self) -> bytes:
        # "n,," : no channel binding, no authzid.
        return f"n,,{self._client_first_bare}".encode()

    def _server_first(self, server_first: bytes) -> tuple[str, bytes, int]:
        """The server-first message's nonce, salt and iteration count, checked."""
        attrs = _parse_attributes(server_first)
        if "m" in attrs:
            raise ProtocolError("SCRAM server requires an unsupported extension")
        try:
            nonce, salt_b64, iterations_s = attrs["r"], attrs["s"], attrs["i"]
        except KeyError as exc:
            raise ProtocolError(f"SCRAM server-first message lacks {exc.args[0]!r}") from None
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise ProtocolError("SCRAM server nonce does not extend the client nonce")
        try:
            salt = binascii.a2b_base64(salt_b64, strict_mode=True)
            iterations = int(iterations_s)
        except (ValueError, TypeError):
            raise ProtocolError("SCRAM salt or iteration count is malformed") from None
        if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
            raise ProtocolError(f"SCRAM iteration count {iterations} is out of range")
        if not salt:
            raise ProtocolError("SCRAM salt is empty")
        return nonce, salt, iterations

    def derivation(self, server_first: bytes) -> Callable[[], object] | None:
        """The key derivation (PBKDF2) that ``client_final`` would do, as a call to make first,
        elsewhere: the async drivers make it in a thread, so that a login the cache has not
        seen (milliseconds of CPU, more for a server that asks many iterations) does not stall
        the event loop. None when the keys are cached, or the message will be refused."""
        try:
            nonce, salt, iterations = self._server_first(server_first)
        except ProtocolError:
            return None
        keys = _cached(_cache_key(self._hash, self._username, self._password, salt, iterations))
        # (what was read and found is kept: client_final does not do it all again)
        self._checked = (server_first, nonce, salt, iterations, keys)
        return None if keys is not None else functools.partial(self._derive, salt, iterations)

    def _derive(self, salt: bytes, iterations: int) -> None:
        # The password is read from here, not bound into the call: the call is a ``Derive``
        # step that drivers and tests may show (a repr of a partial shows its arguments).
        keys = _keys(self._hash, self._username, self._password, salt, iterations)
        if self._checked is not None:
            self._checked = (*self._checked[:4], keys)

    def client_final(self, server_first: bytes) -> bytes:
        checked = self._checked
        if checked is not None and checked[0] is server_first:
            _, nonce, salt, iterations, keys = checked
        else:
            nonce, salt, iterations = self._server_first(server_first)
            keys = None
        if keys is None:
            keys = _keys(self._hash, self._username, self._password, salt, iterations)
        client_key, server_key = keys
        stored_key = hashlib.new(self._hash, client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        self._auth_message = (
            self._client_first_bare.encode() + b"," + server_first + b"," + without_proof.encode()
        )
        signature = hmac.digest(stored_key, self._auth_message, self._hash)
        # XOR of two digests of one hash: as integers, in C (not a Python loop per byte)
        proof = (int.from_bytes(client_key) ^ int.from_bytes(signature)).to_bytes(len(signature))
        self._server_signature = hmac.digest(server_key, self._auth_message, self._hash)
        return b"%s,p=%s" % (without_proof.encode(), binascii.b2a_base64(proof, newline=False))

    def verify_server_final(self, server_final: bytes) -> None:
        """Raise unless the server proved it knows the password too."""
        if not self._server_signature:
            raise ProtocolError("SCRAM server-final before client-final")
        try:
            attrs = _parse_attributes(server_final)
        except ProtocolError:
            # (an empty <success/> too) as wrong as a forged signature: the server did not
            # prove it knows the password, and asking it again would only cost a second login
            raise ProtocolError(
                "SCRAM server-final message is malformed: the server is not who it claims",
                condition="server-signature-mismatch",
            ) from None
        if "e" in attrs:
            raise AuthenticationFailed(
                f"SCRAM server error: {attrs['e']}", condition=attrs["e"] or "not-authorized"
            )
        try:
            verifier = binascii.a2b_base64(attrs.get("v", ""), strict_mode=True)
        except ValueError:
            verifier = b""
        if not verifier or not hmac.compare_digest(verifier, self._server_signature):
            raise ProtocolError(
                "SCRAM server signature is wrong: the server is not who it claims",
                condition="server-signature-mismatch",
            )

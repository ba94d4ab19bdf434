"""Where and how the session variables go into an HTML page.

Works on bytes, never decodes the document: bytes outside the insertion stay exactly as they
were (no decode/encode round trip to break on odd charsets or lone surrogates), and the search is
ASCII-case-insensitive on purpose (``str.lower()`` changes the length of "İ" and shifts every
offset after it). Non-ASCII-compatible charsets (UTF-16/32) get patterns encoded in that charset.

Placement: before the first ``</head>``, else before the last ``</body>``, else at the end, with
the same result whatever the chunking of a streamed body.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence

__all__ = ["Injector", "inject", "js_literal", "script_snippet"]

_IDENT = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")
# A tail this long may still hold an incomplete "</head  >" / "</body>" across a chunk edge.
_MAX_SPACES = 32
#: Held text after the last ``</body>`` beyond which we give up waiting for another one and fall
#: back to appending at the end: a stream must not be buffered without bound.
_MAX_HELD = 64 * 1024


def js_literal(value: object) -> str:
    """A JavaScript literal that cannot close the ``<script>`` element or open a comment."""
    text = json.dumps(value, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def script_snippet(values: Sequence[tuple[str, object]], *, nonce: str | None = None) -> str:
    for name, _ in values:
        if not _IDENT.match(name):
            raise ValueError(f"not a JavaScript identifier: {name!r}")
    nonce_attr = ""
    if nonce:
        escaped = (
            nonce.replace("&", "&amp;")
            .replace('"', "&quot;")
            .replace("<", "&lt;")
            .replace(">", "&gt;")
        )
        nonce_attr = f' nonce="{escaped}"'
    assignments = ",".join(f"{name}={js_literal(value)}" for name, value in values)
    return f"<script{nonce_attr}>var {assignments};</script>"


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
#: Bytes needed to recognise any byte order mark.
_SNIFF = 4


def _codec(charset: str | None, head: bytes) -> str:
    """The codec to search with, BOM-less for UTF-16/32.

    A byte order mark wins over the declared charset, as in browsers (HTML encoding sniffing):
    a UTF-16 page with a BOM is UTF-16 whatever its Content-Type says, or does not say.
    """
    name = "utf-8"
    if charset:
        try:
            name = codecs.lookup(charset).name
        except LookupError:
            name = "utf-8"
    for bom, codec in _BOMS:
        # FF FE 00 00 is UTF-32 only when declared so; otherwise a UTF-16 BOM and a NUL.
        if head.startswith(bom) and (name.startswith("utf-32") or not codec.startswith("utf-32")):
            return codec
    if name in ("utf-16", "utf-32"):
        return f"{name}-le"
    return name


def _ascii_compatible(codec: str) -> bool:
    try:
        return "</head>".encode(codec) == b"</head>"
    except (LookupError, UnicodeError):
        return False


def _pattern(tag: str, codec: str) -> re.Pattern[bytes]:
    if _ascii_compatible(codec):
        return re.compile(rf"</{tag}[ \t\r\n\f]{{0,{_MAX_SPACES}}}>".encode(), re.IGNORECASE)

    def alt(chars: str) -> bytes:
        return b"(?:" + b"|".join(re.escape(c.encode(codec)) for c in chars) + b")"

    parts = [re.escape("</".encode(codec))]
    parts += [alt(c.lower() + c.upper()) for c in tag]
    parts.append(alt(" \t\r\n\f") + b"{0,%d}" % _MAX_SPACES)
    parts.append(re.escape(">".encode(codec)))
    return re.compile(b"".join(parts))


class Injector:
    """Streams a body through, inserting ``snippet`` once, at the right place.

    Holds back only what must be held: a short tail that may be the start of a tag, and, once a
    ``</body>`` is seen with no ``</head>`` before it, the text from that ``</body>`` on (usually
    just ``</body></html>``), because a later ``</body>`` would win.
    """

    def __init__(self, snippet: str, *, charset: str | None = None) -> None:
        self._snippet_text = snippet
        self._charset = charset
        self._codec: str | None = None
        self._snippet = b""
        self._head: re.Pattern[bytes] | None = None
        self._body: re.Pattern[bytes] | None = None
        self._tail = 0
        self._held = b""
        self._held_is_body = False
        self.done = False

    def _setup(self, first: bytes) -> None:
        self._codec = codec = _codec(self._charset, first)
        self._snippet = self._snippet_text.encode(codec)
        self._head = _pattern("head", codec)
        self._body = _pattern("body", codec)
        self._tail = len(f"</body{' ' * _MAX_SPACES}>".encode(codec))

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return chunk
        if self._codec is None:
            # Wait for enough bytes to see a byte order mark, even if it is split across chunks.
            self._held += chunk
            if len(self._held) < _SNIFF:
                return b""
            self._setup(self._held)
            chunk, self._held = self._held, b""
        assert self._head is not None and self._body is not None
        data = self._held + chunk
        m = self._head.search(data)
        if m is not None:
            self.done = True
            self._held = b""
            return data[: m.start()] + self._snippet + data[m.start() :]
        last = None
        for match in self._body.finditer(data):
            last = match
        if last is not None and len(data) - last.start() <= _MAX_HELD:
            self._held, self._held_is_body = data[last.start() :], True
            return data[: last.start()]
        # Keep only a tail that could be the start of "</head" or "</body". More than _MAX_HELD
        # after the last </body>: stop waiting for another one and let the snippet go at the end.
        self._held_is_body = False
        keep = min(len(data), self._tail)
        self._held, out = data[len(data) - keep :], data[: len(data) - keep]
        return out

    def finish(self) -> bytes:
        """The rest of the body, with the snippet if it has not gone in yet."""
        if self.done:
            return b""
        self.done = True
        if self._codec is None:  # empty body, or shorter than a byte order mark
            self._setup(self._held)
        held, self._held = self._held, b""
        if self._held_is_body:
            return self._snippet + held
        return held + self._snippet


def inject(body: bytes, snippet: str, *, charset: str | None = None) -> bytes:
    injector = Injector(snippet, charset=charset)
    return injector.feed(body) + injector.finish()

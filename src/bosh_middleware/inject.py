"""Where and how the session variables go into an HTML page.

Works on bytes, never decodes the document: bytes outside the insertion stay exactly as they
were (no decode/encode round trip to break on odd charsets or lone surrogates), and the search is
ASCII-case-insensitive on purpose (``str.lower()`` changes the length of "İ" and shifts every
offset after it). Non-ASCII-compatible charsets (UTF-16/32) get patterns encoded in that charset.

Placement: before the first ``</head>`` end tag, else before the last ``</body>``, else at the
end, with the same result whatever the chunking of a streamed body. Only end tags count, found as
the HTML tokenizer finds them: not in comments, nor in the text of ``<script>``, ``<style>``,
``<title>`` and the other raw-text elements (a ``"</head>"`` in a script string would otherwise
get the snippet, whose ``</script>`` ends the page's script early), nor inside ``<template>``,
nor inside another tag (``<meta content="</head>">``). tests/test_inject_html5lib.py checks the
result against html5lib, a parser that follows the HTML standard.
"""

from __future__ import annotations

import codecs
import functools
import json
import logging
import re
import string
from collections.abc import Callable, Iterable, Iterator, Sequence

__all__ = [
    "Injector",
    "inject",
    "injected_stream",
    "js_literal",
    "script_snippet",
    "sent_with_a_byte",
]

log = logging.getLogger("bosh_middleware")

_IDENT = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")
#: Whitespace allowed before the ">" of "</head  >" / "</body  >" (bounds what a tail may hold).
_MAX_SPACES = 32
#: Held text after the last ``</body>`` beyond which we give up waiting for another one and fall
#: back to appending at the end: a stream must not be buffered without bound.
_MAX_HELD = 64 * 1024
#: The longest unfinished tag at the end of the data that is held back to be read whole with
#: the next chunk (a longer one, with a big data: URL, goes out, and is carried on as open).
_MAX_TAG = 4096


def js_literal(value: object) -> str:
    """A JavaScript literal that cannot close the ``<script>`` element or open a comment, and
    whose strings hold no quote character: the only ``"`` in it are a string's own two (so that
    even a snippet a page put inside an attribute value cannot write attributes of its own)."""
    text = json.dumps(value, ensure_ascii=True)
    if isinstance(value, str):  # every '"' inside is escaped as \", the one before it ends no
        # escape of its own (json writes a backslash as \\): \u0022 means the same in JS
        text = '"' + text[1:-1].replace('\\"', "\\u0022").replace("'", "\\u0027") + '"'
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
#: Labels of the WHATWG Encoding Standard that browsers read as UTF-16 and Python's codecs
#: do not know: with the UTF-8 default, a page so labelled would be searched as ASCII and get
#: a UTF-8 snippet in the middle of its UTF-16 text. The standard's other labels that Python
#: does not know name ASCII-compatible encodings, which the default searches right.
_WHATWG_UTF16 = {
    "csunicode": "utf-16-le",
    "iso-10646-ucs-2": "utf-16-le",
    "ucs-2": "utf-16-le",
    "unicode": "utf-16-le",
    "unicodefeff": "utf-16-le",
    "unicodefffe": "utf-16-be",
}


def _codec(charset: str | None, head: bytes) -> str:
    """The codec to search with, BOM-less for UTF-16/32.

    A byte order mark wins over the declared charset, as in browsers (HTML encoding sniffing):
    a UTF-16 page with a BOM is UTF-16 whatever its Content-Type says, or does not say.

    A label nobody knows falls back to UTF-8 rather than failing open: a browser ignores such
    a label and decodes with the BOM, a ``<meta charset>`` (where "utf-16" reads as UTF-8) or
    its default, so with no BOM the page is ASCII-compatible to it too.
    """
    name = "utf-8"
    if charset:
        try:
            name = _WHATWG_UTF16.get(charset.strip(_WS).lower()) or codecs.lookup(charset).name
        except (LookupError, ValueError):  # (ValueError: a NUL in the label)
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


_WS = " \t\r\n\f"
#: Elements whose content the HTML tokenizer reads as text up to their own end tag (raw text and
#: RCDATA; ``noscript`` too, as the page runs scripts): a ``</head>`` in there is no tag, and the
#: snippet put there would be text, or end the page's own ``<script>`` early.
_RAW = ("script", "style", "title", "textarea", "xmp", "iframe", "noembed", "noframes", "noscript")
#: What may be the start of a searched token when the data ends (see ``_Syntax.data``):
#: "<!" / "<!-" may still become "<!--", and an element name waits for the character after it.
_DATA_WORDS = ("</head", "</body", "</template", "<template", "<!-", *(f"<{n}" for n in _RAW))
_SPACED_WORDS = ("</head", "</body")
_COMMENT_WORDS = ("--!>", "-->")


class _Aligned:
    """A UTF-16/32 pattern whose matches start on a code unit: bytes that straddle two
    characters ("\u3c41\u2f00..." read from its second byte is "</...") are no token. Offsets
    count from the start of the searched data, which is always on one: the document's start
    (a BOM is whole code units), or where ``Injector._resume`` or a ``</body>`` cut it."""

    __slots__ = ("pattern", "unit")

    def __init__(self, pattern: re.Pattern[bytes], unit: int) -> None:
        self.pattern = pattern
        self.unit = unit

    def search(self, data: bytes, pos: int) -> re.Match[bytes] | None:
        m = self.pattern.search(data, pos)
        while m is not None and m.start() % self.unit:
            m = self.pattern.search(data, m.start() + 1)  # (the next byte may start one)
        return m


#: What the search goes on with: a compiled pattern for ASCII-compatible codecs (the fast
#: path, no Python code per match), an aligned one for UTF-16/32.
_Search = re.Pattern[bytes] | _Aligned


class _Syntax:
    """The patterns of one codec: ASCII ones with ``re.IGNORECASE``, and for UTF-16/32 the same
    patterns spelled out character by character in that codec."""

    def __init__(self, codec: str) -> None:
        self.codec = codec
        ascii_ok = _ascii_compatible(codec)
        unit = len("<".encode(codec))

        def searcher(pattern: bytes) -> _Search:
            return (
                re.compile(pattern, re.IGNORECASE)
                if ascii_ok
                else _Aligned(re.compile(pattern), unit)
            )

        def alt(chars: str) -> bytes:
            return b"(?:" + b"|".join(re.escape(c.encode(codec)) for c in chars) + b")"

        def lit(text: str) -> bytes:  # ASCII-case-insensitive literal
            if ascii_ok:
                return re.escape(text.encode())
            return b"".join(
                alt(c.lower() + c.upper()) if c.isalpha() else re.escape(c.encode(codec))
                for c in text
            )

        def one_of(chars: str) -> bytes:
            return b"[" + re.escape(chars.encode()) + b"]" if ascii_ok else alt(chars)

        letter = b"[A-Za-z]" if ascii_ok else alt(string.ascii_letters)

        def none_of(chars: str) -> bytes:  # one character (code unit) that is none of these
            if ascii_ok:
                return b"[^" + re.escape(chars.encode()) + b"]"
            return b"(?!" + alt(chars) + b")[\x00-\xff]{%d}" % len("<".encode(codec))

        flags = re.IGNORECASE if ascii_ok else 0
        spaces = one_of(_WS) + b"{0,%d}" % _MAX_SPACES
        # A positive lookahead, so that a name at the very end of the data is no match yet.
        name_end = b"(?=" + one_of(_WS + "/>") + b")"
        # Tried where ``candidate`` matched; no capturing group inside a named one, so that
        # ``lastgroup`` tells the branch.
        self.data = re.compile(
            lit("<")
            + b"(?:(?P<head>"
            + lit("/head")
            + spaces
            + lit(">")
            + b")|(?P<body>"
            + lit("/body")
            + spaces
            + lit(">")
            + b")|(?P<tclose>"
            + lit("/template")
            + b")"
            + name_end
            + b"|(?P<raw>"
            + b"|".join(lit(n) for n in _RAW)
            + b")"
            + name_end
            + b"|(?P<topen>"
            + lit("template")
            + b")"
            + name_end
            + b"|(?P<bang>"
            + lit("!")
            + b")|(?P<pi>"
            + lit("?")
            # "</" then neither a letter nor ">" opens a bogus comment too ("</1 ... >")
            + b"|"
            + lit("/")
            + none_of(string.ascii_letters + ">")
            + b"))",
            flags,
        )
        if ascii_ok:
            # Candidates for ``data``, quick to search for: most "<" in a page (<p>, </a>, <td>,
            # <span>) fail on the first two or three bytes here, without the branches above.
            # "</template" only matters in a template: "</td>" and "</tr>" are common.
            self.candidate: _Search = _candidates(("head", "body"))
            self.candidate_in_template: _Search = _candidates(("head", "body", "template"))
        else:  # UTF-16/32 pages are rare: no shortcut
            self.candidate = self.candidate_in_template = _Aligned(self.data, unit)
        self.raw_end = {n: searcher(lit(f"</{n}") + name_end) for n in _RAW}
        # A script's text has states of its own (the "script data escaped" states): after a
        # "<!--" in it, a "<script" makes the next "</script" part of the text, as in the
        # legacy ``<!-- document.write("<script ...></script>") -->``, until "-->".
        script_end = b"(?P<end>" + lit("</script") + name_end + b")"
        leave = b"|(?P<out>" + lit("-->") + b")"
        self.raw_end["script"] = searcher(script_end + b"|(?P<esc>" + lit("<!--") + b")")
        self.script_escaped = searcher(
            script_end + b"|(?P<dbl>" + lit("<script") + name_end + b")" + leave
        )
        self.script_double = searcher(b"(?P<undbl>" + lit("</script") + name_end + b")" + leave)
        #: What may be starting at the end of the data, in each state of a script's text.
        self.script_words = {
            self.raw_end["script"]: ("</script", "<!--"),
            self.script_escaped: ("</script", "<script", "-->"),
            self.script_double: ("</script", "-->"),
        }
        self.comment_end = searcher(lit("--") + b"(?:" + lit("!") + b")?" + lit(">"))
        self.tag_end = searcher(lit(">"))
        #: The end of a raw-text element's start tag: its text begins after it, and in XHTML
        #: not at all when the tag closes itself (``<script src="a.js"/>``).
        self.raw_tag_end = searcher(
            b"(?P<selfclose>" + lit("/>") + b")|(?P<opened>" + lit(">") + b")"
        )
        self.lt = "<".encode(codec)
        self.gt = ">".encode(codec)
        self.dash = "-".encode(codec)
        self.slash = "/".encode(codec)
        #: A tag's start: "<" or "</", then a letter (the rest may still be to come).
        self.tag_start = re.compile(lit("<") + b"(?:" + lit("/") + b")?" + letter, flags)

        self.dashes = "--".encode(codec)
        #: Bytes at the end that may hold the start of a token, per state.
        self.data_window = unit * (len("</head>") + _MAX_SPACES)
        self.comment_window = unit * 3
        self.raw_window = {n: unit * (len(n) + 3) for n in _RAW}

    def could_start(self, tail: bytes, words: tuple[str, ...], spaced: tuple[str, ...]) -> bool:
        """Whether ``tail`` (the data's end) may grow into one of ``words`` (or a spaced one
        followed by whitespace). An incomplete character at the end is ignored: holding back
        too much only delays bytes, holding back too little would miss a tag."""
        text = tail.decode(self.codec, "ignore").lower()
        if any(w.startswith(text) for w in words):
            return True
        stem = text.rstrip(_WS)
        return stem in spaced and len(text) - len(stem) <= _MAX_SPACES


def _candidates(end_tags: Sequence[str]) -> re.Pattern[bytes]:
    """ "<!", "<?", "</" and no letter, the first two letters of ``end_tags`` after "</", and
    of the elements whose start changes what follows (``_RAW``, "template") after "<", each
    position as a class of the letters seen there: a cheap superset of where
    ``_Syntax.data`` can match."""

    def two(names: Sequence[str]) -> str:
        return "".join(
            "[" + "".join(sorted({c for n in names for c in (n[i], n[i].upper())})) + "]"
            for i in (0, 1)
        )

    return re.compile(
        f"<(?:[!?]|/(?:[^A-Za-z>]|{two(end_tags)})|{two((*_RAW, 'template'))})".encode()
    )


@functools.cache
def _syntax(codec: str) -> _Syntax:
    return _Syntax(codec)


class Injector:
    """Streams a body through, inserting ``snippet`` once, at the right place.

    Only ``</head>`` and ``</body>`` end tags count: the search steps over comments (and
    ``<!...>`` / ``<?...>``), the content of raw-text elements (``<script>``, ``<style>``,
    ``<title>`` ...) and of ``<template>``, as the HTML tokenizer does, and keeps that state
    across chunks. A ``<`` inside a tag is no token; a tag ends at its first ``>``, as
    attribute values are not tokenized (so in ``<a title="a>b </head>">`` that ``</head>``
    counts).

    "At the end" is where the document's data ends, before a token or a tag it is cut off in
    the middle of. A document that ends inside a comment, raw text, a ``<template>`` tag or a
    template's (inert) content goes out without the snippet (``done`` stays false): no script
    would run there.

    Holds back only what must be held: a short tail that may be the start of a token (from its
    ``<``; nothing when the data ends in text), and, once a ``</body>`` is seen with no
    ``</head>`` before it, the text from that ``</body>`` on (usually just ``</body></html>``),
    because a later ``</body>`` would win.

    Fails open: when the charset cannot carry the snippet (``charset=hex``, or a nonce the
    charset has no characters for) the body goes through untouched, ``done`` stays false and the
    cause is logged.
    """

    def __init__(self, snippet: str, *, charset: str | None = None, xml: bool = False) -> None:
        self._snippet_text = snippet
        self._charset = charset
        #: An XHTML page (``application/xhtml+xml``), which browsers read with their XML
        #: parser: there ``<script src="a.js"/>`` is a whole element, with no text after it.
        self._xml = xml
        self._syntax: _Syntax | None = None
        self._snippet = b""
        self._held = b""
        self._held_is_body = False
        #: Where in ``_held`` the search goes on (what comes before was searched already).
        self._scan = 0
        #: The end of the comment or raw text the search is in, with the raw element's name.
        self._skip: _Search | None = None
        self._skip_name = ""
        self._templates = 0
        #: The data so far ends inside a tag ("<a href=..." and no ">" yet).
        self._in_tag = False
        self._failed = False
        #: The snippet is in the output.
        self.done = False

    def _setup(self, first: bytes) -> bool:
        codec = _codec(self._charset, first)
        try:
            # str.encode raises LookupError for codecs that are no text encoding (hex, rot13,
            # base64), UnicodeError for "undefined" or a nonce the charset cannot encode.
            self._snippet = self._snippet_text.encode(codec)
            self._syntax = _syntax(codec)
        except (LookupError, UnicodeError) as exc:
            self._failed = True
            log.warning(
                "page served without the session: its charset %r cannot carry the snippet (%s)",
                self._charset,
                exc,
            )
            return False
        return True

    def feed(self, chunk: bytes) -> bytes:
        if self.done or self._failed:
            return chunk
        if self._syntax is None:
            # Wait for enough bytes to see a byte order mark, even if it is split across chunks.
            self._held += chunk
            if len(self._held) < _SNIFF:
                return b""
            chunk, self._held = self._held, b""
            if not self._setup(chunk):
                return chunk
        syntax = self._syntax
        assert syntax is not None
        data = self._held + chunk
        # pos: where the search state was last known to change; look: where to go on looking.
        pos = look = self._scan
        # tag_at: where the tag that pos is in began (after "<template" or "</script"), -2
        # for a tag begun in an earlier chunk, -1 for none (see ``_open_tag``).
        tag_at = -2 if self._in_tag else -1
        body = 0 if self._held_is_body else -1
        while True:
            skip = self._skip
            if skip is not None:
                m = skip.search(data, pos)
                if m is None:
                    break
                look = pos = m.end()
                state = m.lastgroup  # (None: the pattern has no states, it just ends)
                if state is None or state == "end":
                    self._skip = None
                    # after "</script" (in the end tag, until its ">"), not after "-->" or ">"
                    in_end_tag = skip is not syntax.comment_end and skip is not syntax.tag_end
                    tag_at = m.start() if in_end_tag else -1
                elif state == "esc":  # "<!--": "-->" may use its dashes ("<!-->")
                    self._skip = syntax.script_escaped
                    pos = m.end() - len(syntax.dashes)
                elif state == "dbl":
                    self._skip = syntax.script_double
                elif state == "undbl":
                    self._skip = syntax.script_escaped
                elif state == "opened" or state == "selfclose":  # a raw-text element's start tag
                    if state == "selfclose" and self._xml:
                        self._skip = None  # (an XHTML element that closes itself: no text)
                    elif self._skip_name == "template":  # (XHTML's, see "topen")
                        self._skip = None
                        self._templates += 1
                    else:  # (in HTML "/>" closes no element but the void ones)
                        self._skip = syntax.raw_end[self._skip_name]
                else:  # "out": "-->"
                    self._skip = syntax.raw_end["script"]
                continue
            candidate = (
                syntax.candidate_in_template if self._templates else syntax.candidate
            ).search(data, look)
            if candidate is None:
                break
            at = candidate.start()
            m = syntax.data.match(data, at)
            # (a "<" inside a tag is no token: "<meta content='</head>'>", "</p</head>")
            if m is None or self._open_tag(data, pos, at, tag_at) != -1:
                look = at + 1  # "<strong>", "</header>", a token the data ends in, or in a tag
                continue
            look = pos = m.end()
            kind = m.lastgroup
            # after "</head>", "</body>", "<!", "<?": out of any tag; after "<template" and
            # "</template", in it, until its ">"
            tag_at = at if kind == "topen" or kind == "tclose" else -1
            if kind == "head":
                if not self._templates:  # in a template, the tree builder ignores it
                    self.done = True
                    self._held = b""
                    at = m.start()
                    return data[:at] + self._snippet + data[at:]
            elif kind == "body":
                if not self._templates:
                    body = m.start()
            elif kind == "raw":
                # Its text begins after the start tag's ">": a "<!--" or "</script" in an
                # attribute value is no part of it
                self._skip_name = m.group("raw").decode(syntax.codec).lower()
                self._skip = syntax.raw_tag_end
            elif kind == "bang":
                after = data[pos : pos + len(syntax.dashes)]
                if after == syntax.dashes:
                    # Search "-->" from the opening "--" on: "<!-->" and "<!--->" are comments.
                    self._skip = syntax.comment_end
                elif len(after) < len(syntax.dashes) and syntax.dashes.startswith(after):
                    pos = m.start()  # "<!" or "<!-" at the end: wait for what follows
                    break
                else:
                    self._skip = syntax.tag_end  # "<!DOCTYPE ...>" and other bogus comments
            elif kind == "pi":
                self._skip = syntax.tag_end
            elif kind == "topen":
                if self._xml:  # read to its end first: in XHTML "<template/>" holds nothing
                    self._skip_name = "template"
                    self._skip = syntax.raw_tag_end
                    tag_at = -1
                else:
                    self._templates += 1
            elif self._templates:  # "tclose"
                self._templates -= 1
        resume = self._resume(data, pos)
        if self._skip is None:
            # A tag the data ends in is held back, so that it is read whole, if it is short
            # and an ordinary one (not the "<template" that set pos); else it is carried on.
            open_tag = self._open_tag(data, pos, resume, tag_at)
            held_tag = pos <= open_tag and len(data) - open_tag <= _MAX_TAG
            if held_tag:
                resume = open_tag
            self._in_tag = open_tag != -1 and not held_tag
        if body >= 0 and len(data) - body <= _MAX_HELD:
            cut, self._held_is_body = body, True
        else:
            # More than _MAX_HELD after the last </body>: stop waiting for another one and let
            # the snippet go at the end.
            cut, self._held_is_body = resume, False
        self._held, self._scan = data[cut:], resume - cut
        return data[:cut]

    def _open_tag(self, data: bytes, start: int, end: int, tag_at: int) -> int:
        """Where the tag that ``data[start:end]``, read in the data state, ends inside of
        begins: -1 if it ends inside none, -2 if in a tag begun in an earlier chunk;
        ``tag_at`` is the same for ``start``. A tag ends at its first ">": attribute values
        are not tokenized, so a "<" in one is inside the tag, but a ">" in one ends it."""
        syntax = self._syntax
        assert syntax is not None
        unit = len(syntax.lt)
        gt = data.rfind(syntax.gt, start, end)
        while gt >= start and (gt - start) % unit:  # (UTF-16/32: a whole code unit only)
            gt = data.rfind(syntax.gt, start, gt)
        if gt >= start:
            start, tag_at = gt + unit, -1
        elif tag_at != -1:  # still in the tag that start is in (a "<x" in it is part of it)
            return tag_at
        m = syntax.tag_start.search(data, start, end)
        while m is not None and (m.start() - start) % unit:
            m = syntax.tag_start.search(data, m.start() + 1, end)
        return tag_at if m is None else m.start()

    def _resume(self, data: bytes, pos: int) -> int:
        """Where the search must go on when more data comes: the start of a token that the data
        ends in the middle of, else the end, or the last whole code unit of UTF-16/32 before it
        (a "<" cut in half is no "<" to ``find``, and the rest of its tag would be searched out
        of step). Nothing before it is held back."""
        syntax = self._syntax
        assert syntax is not None
        end = len(data) - len(data) % len(syntax.lt)  # (len(data) for ASCII-compatible codecs)
        skip = self._skip
        spaced: tuple[str, ...] = ()
        if skip is None:
            anchor, window, words, spaced = (
                syntax.lt,
                syntax.data_window,
                _DATA_WORDS,
                _SPACED_WORDS,
            )
        elif skip is syntax.comment_end:
            anchor, window, words = syntax.dash, syntax.comment_window, _COMMENT_WORDS
        elif skip is syntax.tag_end:
            return end
        elif skip is syntax.raw_tag_end:
            # (XHTML: a "/" at the end may be the start of a "/>")
            slash = end - len(syntax.lt)
            if self._xml and slash >= pos and data.startswith(syntax.slash, slash):
                return slash
            return end
        elif skip in syntax.script_words:  # "</script", and "<!--" / "-->" / "<script"
            words = syntax.script_words[skip]
            start = max(pos, end - syntax.raw_window["script"])
            for i in range(start + (end - start) % len(syntax.lt), end, len(syntax.lt)):
                if data.startswith((syntax.lt, syntax.dash), i) and syntax.could_start(
                    data[i:], words, ()
                ):
                    return i
            return end
        else:
            name = self._skip_name
            anchor, window, words = syntax.lt, syntax.raw_window[name], (f"</{name}",)
        i = data.find(anchor, max(pos, end - window), end)
        while i >= 0:
            # (a "<" straddling two UTF-16/32 characters: held from there, the next chunk
            # would be searched out of step)
            if i % len(syntax.lt) == 0 and syntax.could_start(data[i:], words, spaced):
                return i
            i = data.find(anchor, i + 1, end)
        return end

    def release(self) -> bytes:
        """What is held back, unchanged, with no injection from here on: for a body that goes
        on in a form this cannot see into (an ASGI ``zerocopysend`` or ``pathsend`` after the
        first chunks), whose bytes must still all reach the client, in order."""
        held, self._held = self._held, b""
        self._failed = True  # (feed and finish pass everything through from now on)
        return held

    def finish(self) -> bytes:
        """The rest of the body, with the snippet if it has not gone in yet (and can).

        "At the end" means where the document's data ends: before a token it ends in the
        middle of (a lone ``</``, ``<!-``, an unfinished tag), which is what is held back, as a
        snippet after it would be swallowed by it (``</<script>`` is a bogus comment). A
        document that ends inside a comment, raw text (an unclosed ``<script>``) or a bogus
        comment has no such place left, as those bytes went out already: it goes out
        without the snippet (``done`` stays false), rather than with a snippet that is
        text, or part of the page's own script."""
        if self.done or self._failed:
            held, self._held = self._held, b""
            return held
        if self._syntax is None:  # shorter than a byte order mark: never searched
            held, self._held = self._held, b""
            if not self._setup(held):
                return held
            return self.feed(held) + self.finish()
        held, self._held = self._held, b""
        if self._held_is_body:  # (before that </body>, whatever follows it)
            self.done = True
            return self._snippet + held
        if self._skip is not None or self._in_tag or self._templates:
            syntax = self._syntax
            log.warning(
                "page served without the session: it ends inside %s, where a script would not run",
                "a tag"
                if (self._skip is None and self._in_tag) or self._skip is syntax.raw_tag_end
                else "a <template> element"
                if self._skip is None
                else "a comment"
                if self._skip in (syntax.comment_end, syntax.tag_end)
                else f"the text of a <{self._skip_name}> element",
            )
            self._failed = True
            return held
        self.done = True
        return self._snippet + held


def inject(body: bytes, snippet: str, *, charset: str | None = None) -> bytes:
    injector = Injector(snippet, charset=charset)
    return injector.feed(body) + injector.finish()


def injected_stream(
    chunks: Iterable[bytes], injector: Injector, undelivered: Callable[[], None] | None
) -> Iterator[bytes]:
    """A streamed page's body through ``injector``, calling ``undelivered()`` once it has ended
    without the snippet in it: read to its end, failed, or closed early by the server because
    the client went away (the framework closes the response, and with it this generator).
    The framework adapters (Django's, Flask's) put this in place of a streamed body."""
    try:
        for chunk in chunks:
            if out := injector.feed(chunk):
                yield out
        yield injector.finish()
    finally:
        if not injector.done and undelivered is not None:
            undelivered()


def sent_with_a_byte(chunks: Iterable[bytes], unsent: Callable[[], None]) -> Iterator[bytes]:
    """A streamed body, calling ``unsent()`` if it fails or is closed before it has given a
    byte: the session in the headers ("headers" and "both" modes) went nowhere then. A WSGI
    server sends them with the first non-empty chunk (PEP 3333), and a body that fails before
    one gets the server's error response in their place. Given, not taken: a server that stops
    at the Content-Length kept in headers mode did send them."""
    given = False
    try:
        for chunk in chunks:
            given = given or bool(chunk)
            yield chunk
        given = True  # (an empty body: the headers go out as it ends)
    finally:
        if not given:
            unsent()

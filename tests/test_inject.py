"""Where the session variables go into a page, and that nothing else changes (inject.py).

Placement rule: before the first ``</head>``, else before the last ``</body>``, else at the end;
ASCII-case-insensitive, up to 32 whitespace characters before ``>``; only end tags count, not
text in comments, raw-text elements (``<script>``, ``<style>``, ``<title>`` ...) or templates;
the same result whatever the chunking of a streamed body. Property tests compare with an
independent reference.
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import json
import logging
import shutil
import subprocess
from typing import Any

import lxml.etree
import lxml.html
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bosh_middleware.asgi import BOSHPrebindMiddleware as ASGIMiddleware
from bosh_middleware.config import MiddlewareConfig
from bosh_middleware.core import PrebindCore
from bosh_middleware.credentials import Credentials
from bosh_middleware.inject import Injector, inject, js_literal, script_snippet
from bosh_middleware.session import PrebindSession
from bosh_middleware.wsgi import BOSHPrebindMiddleware as WSGIMiddleware
from support.asgi_recorder import NAV, ASGIRecorder, User, call_wsgi, http_scope, wsgi_environ
from support.bosh_check import page_vars

SNIPPET = '<script>var BOSH_JID="a@b/c",BOSH_SID="s",BOSH_RID=7;</script>'
S = SNIPPET.encode()
EVIL = "</script><script>alert(1)</script>"


def feed_chunks(chunks: list[bytes], snippet: str = SNIPPET, charset: str | None = None) -> bytes:
    inj = Injector(snippet, charset=charset)
    return b"".join(inj.feed(c) for c in chunks) + inj.finish()


def inserted_at(original: bytes, result: bytes, snippet: bytes = S) -> int:
    """The position of the one insertion; fails unless result == original + one insertion."""
    assert len(result) == len(original) + len(snippet)
    for pos in range(len(original) + 1):
        if (
            result[:pos] == original[:pos]
            and result[pos + len(snippet) :] == original[pos:]
            and result[pos : pos + len(snippet)] == snippet
        ):
            return pos
    raise AssertionError("result is not the original with one insertion of the snippet")


# ------------------------------------------------------------------------------------------
# placement
# ------------------------------------------------------------------------------------------


def test_before_first_head_close() -> None:
    doc = b"<html><head><title>x</title></head><body><template></head></template></body></html>"
    assert inserted_at(doc, inject(doc, SNIPPET)) == doc.index(b"</head>")


def test_before_last_body_close_without_head() -> None:
    doc = b"<html><body><p>one</p></body><!-- --></body></html>"
    assert inserted_at(doc, inject(doc, SNIPPET)) == doc.rindex(b"</body>")


def test_at_end_without_head_or_body() -> None:
    doc = b"<p>fragment</p>"
    assert inject(doc, SNIPPET) == doc + S


def test_head_wins_even_after_body() -> None:
    doc = b"<body>x</body></head>"
    assert inserted_at(doc, inject(doc, SNIPPET)) == doc.index(b"</head>")


def test_empty_body_gets_only_the_snippet() -> None:
    assert inject(b"", SNIPPET) == S


@pytest.mark.parametrize(
    "tag", [b"</HEAD>", b"</Head>", b"</head >", b"</head\t\r\n\f>", b"</hEaD" + b" " * 32 + b">"]
)
def test_head_close_is_case_and_space_insensitive(tag: bytes) -> None:
    doc = b"<html><head><title>t</title>" + tag + b"<body></body></html>"
    assert inserted_at(doc, inject(doc, SNIPPET)) == doc.index(tag)


@pytest.mark.parametrize("tag", [b"</BODY>", b"</Body  >"])
def test_body_close_is_case_and_space_insensitive(tag: bytes) -> None:
    doc = b"<html><p>x</p>" + tag + b"</html>"
    assert inserted_at(doc, inject(doc, SNIPPET)) == doc.index(tag)


@pytest.mark.parametrize(
    "decoy",
    [
        b"</header>",
        b"</headx>",
        b"<head>",
        b"</ head>",
        b"</head" + b" " * 33 + b">",
        b"</bodyx>",
        b"</he ad>",
    ],
)
def test_lookalikes_are_not_tags(decoy: bytes) -> None:
    doc = b"<p>" + decoy + b"</p>"
    assert inject(doc, SNIPPET) == doc + S


# ------------------------------------------------------------------------------------------
# chunk boundaries
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", [b"</head>", b"</HEAD  >", b"</body>"])
def test_tag_split_at_every_byte(tag: bytes) -> None:
    doc = b"<html><head><title>t</title>" + tag + b"<p>after</p></html>"
    start = doc.index(tag)
    for cut in range(start, start + len(tag) + 1):
        assert feed_chunks([doc[:cut], doc[cut:]]) == inject(doc, SNIPPET), cut


def test_byte_by_byte_equals_whole() -> None:
    doc = "<html><head><title>İ</title></HEAD ><body>é</body></html>".encode()
    assert feed_chunks([doc[i : i + 1] for i in range(len(doc))]) == inject(doc, SNIPPET)


def test_stream_is_not_held_beyond_a_tag_tail() -> None:
    inj = Injector(SNIPPET)
    out = inj.feed(b"<html><head><title>" + b"x" * 10_000)
    assert len(out) >= 10_000 - 64  # only a short tail that might start "</head" is held


def test_text_after_body_is_not_buffered_without_bound() -> None:
    """A stream whose </body> is followed by much more text must not be held in memory."""
    inj = Injector(SNIPPET)
    emitted = len(inj.feed(b"<html><body>x</body>"))
    chunk = b"a" * 10_000
    for _ in range(100):
        emitted += len(inj.feed(chunk))
    assert emitted > 1_000_000 - 70 * 1024
    doc = b"<html><body>x</body>" + chunk * 100
    assert feed_chunks([doc[:20]] + [chunk] * 100) == inject(doc, SNIPPET) == doc + S


# ------------------------------------------------------------------------------------------
# bytes outside the insertion never change
# ------------------------------------------------------------------------------------------


def test_dotted_capital_i_does_not_shift_the_position() -> None:
    """ "İ".lower() is two code points: a search on lowered text would be off by one."""
    doc = ("<html><head><title>" + "İ" * 50 + "</title></head><body>İ</body></html>").encode()
    assert inserted_at(doc, inject(doc, SNIPPET)) == doc.index(b"</head>")


def test_invalid_utf8_bytes_are_kept() -> None:
    doc = b"<html><head><title>\xc3\x28\xa0\xa1\xed\xa0\x80\xff</title></head><body></body></html>"
    out = inject(doc, SNIPPET, charset="utf-8")
    assert inserted_at(doc, out) == doc.index(b"</head>")


def test_latin1_page_is_kept_byte_for_byte() -> None:
    doc = "<html><head><title>Café crème ÿ</title></head><body>déjà</body></html>".encode("latin-1")
    out = inject(doc, SNIPPET, charset="iso-8859-1")
    assert inserted_at(doc, out) == doc.index(b"</head>")
    assert out.decode("latin-1").count("Café crème ÿ") == 1


@pytest.mark.parametrize(
    ("encoding", "charset"),
    [
        ("utf-16", "utf-16"),
        ("utf-16", None),
        ("utf-16-be-bom", "utf-16"),
        ("utf-16-be-bom", "utf-8"),
    ],
)
def test_utf16_page_with_bom(encoding: str, charset: str | None) -> None:
    """The BOM decides, as in browsers, even against the declared (or missing) charset."""
    text = "<html><head><title>é€😀</title></head><body>İ</body></html>"
    if encoding == "utf-16-be-bom":
        doc = codecs.BOM_UTF16_BE + text.encode("utf-16-be")
        codec = "utf-16-be"
    else:
        doc = text.encode("utf-16")  # BOM + native (little) endian
        codec = "utf-16-le"
    out = inject(doc, SNIPPET, charset=charset)
    snippet = SNIPPET.encode(codec)
    pos = inserted_at(doc, out, snippet)
    assert pos == 2 + len(text[: text.index("</head>")].encode("utf-16-le"))
    assert out.decode("utf-16") == text.replace("</head>", SNIPPET + "</head>")
    # the BOM split from the rest of the first chunk changes nothing
    assert feed_chunks([doc[:1], doc[1:3], doc[3:]], charset=charset) == out


def test_utf16_without_bom_uses_the_declared_byte_order() -> None:
    text = "<html><head></head></html>"
    doc = text.encode("utf-16-be")
    out = inject(doc, SNIPPET, charset="utf-16be")
    assert out.decode("utf-16-be") == text.replace("</head>", SNIPPET + "</head>")


def straddling(token: str, codec: str) -> str:
    """Characters whose bytes in ``codec``, read from the second (UTF-16LE/BE, UTF-32LE) or the
    fourth (UTF-32BE) byte on, are ``token`` in ``codec``: "</head>" in UTF-16LE is hidden in
    "\u3c41\u2f00\u6800...", ordinary CJK text."""
    unit = len("<".encode(codec))
    pad = b"\x00" * (unit - 2)
    if codec.endswith("le"):
        raw = b"\x41" + token.encode(codec) + b"\x4e" + pad
    else:
        raw = pad + b"\x41" + token.encode(codec) + b"\x4e"
    return raw.decode(codec)


#: Pages with a token hidden across characters ({}) and where the snippet goes (@).
STRADDLED = [
    ("<html><body><p>{}</p>@</body></html>", "</head>"),  # no head: the last </body>
    ("<html><body><p>x</p>@</body>{}</html>", "</body>"),
    ("<html><head>{}<title>t</title>@</head><body></body></html>", "<!--"),
    ("<html><head><!-- {} </head> -->@</head><body></body></html>", "-->"),
    ("<html><head><title>{}</head></title>@</head><body></body></html>", "</title>"),
    # The page's own script is not ended early, nor is the snippet put into it.
    ('<html><head><script>var s="{}", t="</head>";</script>@</head></html>', "</script>"),
    ("<html><head><script><!--<script>{}</script></head></script>@</head></html>", "-->"),
]


@pytest.mark.parametrize(
    ("codec", "charset", "bom"),
    [
        ("utf-16-le", "utf-16le", b""),
        ("utf-16-be", "utf-16be", b""),
        ("utf-16-le", None, codecs.BOM_UTF16_LE),
        ("utf-16-be", "utf-16", codecs.BOM_UTF16_BE),
        ("utf-32-le", "utf-32", b""),
        ("utf-32-be", "utf-32", codecs.BOM_UTF32_BE),
    ],
)
@pytest.mark.parametrize(("page", "token"), STRADDLED)
def test_utf16_tag_bytes_across_two_characters_are_no_tag(
    codec: str, charset: str | None, bom: bytes, page: str, token: str
) -> None:
    """A match must start on a code unit, at every cut of the stream: a cut right after the
    hidden "</he" must not hold the data back from its second byte (and search the rest out of
    step), nor put the snippet in there."""
    text = page.format(straddling(token, codec))
    doc = bom + text.replace("@", "").encode(codec)
    want = bom + text.replace("@", SNIPPET).encode(codec)
    assert feed_chunks([doc], charset=charset) == want
    for cut in range(len(doc) + 1):
        assert feed_chunks([doc[:cut], doc[cut:]], charset=charset) == want, cut
    assert feed_chunks([doc[i : i + 1] for i in range(len(doc))], charset=charset) == want


@pytest.mark.parametrize(
    ("charset", "codec"),
    [
        *((label, "utf-16-le") for label in ("csunicode", "iso-10646-ucs-2", "ucs-2")),
        *((label, "utf-16-le") for label in ("unicode", "unicodefeff", "UCS-2", " Unicode ")),
        ("unicodefffe", "utf-16-be"),
    ],
)
def test_whatwg_utf16_labels_python_does_not_know(charset: str, codec: str) -> None:
    """Browsers decode these labels as UTF-16 (WHATWG Encoding Standard); Python's codecs do
    not know them: the page must not be searched as ASCII and get a UTF-8 snippet."""
    text = "<html><head><title>t</title></head><body>hi</body></html>"
    inj = Injector(SNIPPET, charset=charset)
    out = inj.feed(text.encode(codec)) + inj.finish()
    assert inj.done
    assert out.decode(codec) == text.replace("</head>", SNIPPET + "</head>")


@pytest.mark.parametrize(("charset", "bom"), [("unicodefffe", b"\xff\xfe"), ("ucs-2", b"\xfe\xff")])
def test_the_bom_wins_over_a_whatwg_utf16_label(charset: str, bom: bytes) -> None:
    codec = "utf-16-le" if bom == codecs.BOM_UTF16_LE else "utf-16-be"
    text = "<html><head></head></html>"
    out = inject(bom + text.encode(codec), SNIPPET, charset=charset)
    assert out == bom + text.replace("</head>", SNIPPET + "</head>").encode(codec)


# ------------------------------------------------------------------------------------------
# escaping: the values cannot break out of the script
# ------------------------------------------------------------------------------------------

NASTY = [
    EVIL,
    "a\u2028b\u2029c",
    "<!--<script>",
    "]]></script>",
    "\"';\\\n</SCRIPT >",
    "&lt;/script&gt;",
]


@pytest.mark.parametrize("value", NASTY)
def test_values_cannot_break_out(value: str) -> None:
    snippet = script_snippet([("BOSH_JID", value + "@x/y"), ("BOSH_SID", value), ("BOSH_RID", 42)])
    page = inject(b"<html><head><title>t</title></head><body><p>x</p></body></html>", snippet)
    doc = lxml.html.document_fromstring(page.decode())
    scripts = list(doc.iter("script"))
    assert len(scripts) == 1
    expected = (
        f"var BOSH_JID={js_literal(value + '@x/y')},BOSH_SID={js_literal(value)},BOSH_RID=42;"
    )
    assert scripts[0].text == expected
    assert "<" not in expected and ">" not in expected and "\u2028" not in expected
    assert page_vars(page) == {"BOSH_JID": value + "@x/y", "BOSH_SID": value, "BOSH_RID": 42}
    assert [el.tag for el in doc.iter() if el.tag in ("script", "p")] == ["script", "p"]


def test_snippet_evaluates_to_the_exact_values_in_javascript() -> None:
    node = shutil.which("node")
    assert node is not None, "node is part of the dev set-up (package.json)"
    values = {
        "BOSH_JID": EVIL + "@x/\u2028",
        "BOSH_SID": "a\u2029</script>",
        "BOSH_RID": 9007199254740991,
    }
    snippet = script_snippet(list(values.items()))
    js = lxml.html.fragment_fromstring(snippet).text
    program = (
        "const vm = require('vm'); const ctx = {}; vm.runInNewContext(process.argv[1], ctx);"
        "process.stdout.write(JSON.stringify([ctx.BOSH_JID, ctx.BOSH_SID, ctx.BOSH_RID]));"
    )
    out = subprocess.run([node, "-e", program, js], capture_output=True, timeout=20, check=True)
    assert json.loads(out.stdout) == list(values.values())


def test_nonce_attribute_is_escaped() -> None:
    snippet = script_snippet([("A", 1)], nonce='n"o<n>&ce')
    el = lxml.html.fragment_fromstring(snippet)
    assert el.get("nonce") == 'n"o<n>&ce'
    assert el.text == "var A=1;"


def test_core_snippet_uses_configured_names_and_service() -> None:
    config = MiddlewareConfig(
        service_url="http://127.0.0.1:1/http-bind",
        credentials=lambda u: None,
        variables=("JID", "SID", "RID"),
        public_service_url="https://chat.example/http-bind",
        service_variable="SERVICE",
    )
    session = PrebindSession(
        jid=EVIL + "@x/r", sid="s\u2028", rid=12, service_url=config.service_url
    )
    snippet = PrebindCore(config).snippet(session, nonce="abc")
    page = inject(b"<html><head></head></html>", snippet)
    assert page_vars(page) == {
        "JID": EVIL + "@x/r",
        "SID": "s\u2028",
        "RID": 12,
        "SERVICE": "https://chat.example/http-bind",
    }
    assert lxml.html.document_fromstring(page).find(".//script").get("nonce") == "abc"


@pytest.mark.parametrize("name", ["1abc", "a-b", "a b", "x;alert(1)", ""])
def test_variable_names_must_be_identifiers(name: str) -> None:
    with pytest.raises(ValueError):
        MiddlewareConfig(
            service_url="http://x/", credentials=lambda u: None, variables=(name, "B", "C")
        )


# ------------------------------------------------------------------------------------------
# only end tags count: not text in comments, scripts, styles, titles, templates
# ------------------------------------------------------------------------------------------

HEAD_DECOYS = {
    "script string": b'<script>var tpl = "<html><head></head></html>";</script>',
    "script, upper case": b'<SCRIPT type="module">x = "</HEAD >"</Script >',
    "comment": b"<!-- layout: </head> is below -->",
    "comment closed by --!>": b"<!-- </head> --!>",
    "bogus comment": b"<!x </head>",
    "processing instruction": b'<?php echo "</head>"; ?>',
    "style": b"<style>/* </head> */</style>",
    "title": b"<title>a </head> b</title>",
    "textarea": b"<textarea></head></textarea>",
    "noscript": b"<noscript></head></noscript>",
    "template": b"<template><p></head></p></template>",
}


@pytest.mark.parametrize("decoy", HEAD_DECOYS.values(), ids=HEAD_DECOYS.keys())
def test_head_close_in_text_is_not_the_place(decoy: bytes) -> None:
    """Put inside a script string, the snippet's </script> ends the page's script early; in a
    comment or a title, the variables never exist. The real </head> is the place."""
    doc = b"<!doctype html><html><head>" + decoy + b"<title>t</title></head><body>x</body></html>"
    out = inject(doc, SNIPPET)
    assert inserted_at(doc, out) == doc.rindex(b"</head>")
    for cut in range(len(doc) + 1):  # the state is kept across chunk edges
        assert feed_chunks([doc[:cut], doc[cut:]]) == out, cut
    assert feed_chunks([doc[i : i + 1] for i in range(len(doc))]) == out


def test_page_script_with_head_close_in_a_string_stays_whole() -> None:
    """The reviewer's page, as a browser-like parser sees it."""
    page_script = 'var tpl = "<html><head></head></html>";'
    doc = f"<html><head><script>{page_script}</script></head><body>x</body></html>".encode()
    tree = lxml.html.document_fromstring(inject(doc, SNIPPET))
    assert [s.text for s in tree.iter("script")] == [page_script, SNIPPET[8:-9]]


@pytest.mark.parametrize(
    "doc",
    [
        b"<head><!----></head>",
        b"<head><!--></head>",  # "<!-->" is a whole (empty) comment
        b"<head><!---></head>",
        b"<head><!DOCTYPE html></head>",
        b"<head><scripts></head>",  # another element, not <script>
        b"<head><script></script ></head>",
        b"<head><script>a</script/></head>",
        b"<head><template></template></template></head>",  # a stray </template> changes nothing
    ],
)
def test_head_close_after_a_skipped_part_is_found(doc: bytes) -> None:
    assert inserted_at(doc, inject(doc, SNIPPET)) == doc.rindex(b"</head>")


def test_body_close_in_a_trailing_comment_is_not_the_place() -> None:
    doc = b"<html><body><p>x</p></body><!-- old layout: </body> --></html>"
    assert inserted_at(doc, inject(doc, SNIPPET)) == doc.index(b"</body>")


@pytest.mark.parametrize(
    "doc",
    [
        b"<html><head><script>var a = '</head></body>';",  # a script never closed
        b"<html><head><!-- </head>",  # a comment never closed
        b"<html><head><title>x</head>",
        b'<html><head><template x="',  # cut off in a template's tag
        b"<html><head><?php ",
    ],
)
def test_a_page_that_ends_inside_a_comment_text_or_tag_goes_out_without_the_session(
    doc: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Such a page has no place left for a script that runs: after it, the snippet would be
    the script's, comment's or title's text (a script's, a broken one), or part of the tag.
    It goes out as it is, and the injector says it did not inject (so that the session is
    ended, not left live)."""
    injector = Injector(SNIPPET)
    assert injector.feed(doc) + injector.finish() == doc
    assert not injector.done
    assert "page served without the session: it ends inside" in caplog.text


@pytest.mark.parametrize(
    "doc,at",
    [
        (b"<p>x</", 4),
        (b"<p>x<", 4),
        (b"<p>x<!-", 4),
        (b"<p>x</he", 4),
        (b"<p>x</head  ", 4),
        (b"<p>x<scrip", 4),
        (b'<p>x<meta content="</head', 4),  # cut off in a tag
        (b"<p>x</p", 4),
        (b"<p>x", 4),
    ],
)
def test_the_end_is_before_a_token_the_page_ends_in_the_middle_of(doc: bytes, at: int) -> None:
    """After it, the snippet would be swallowed by it ("</<script>" is a bogus comment)."""
    assert inject(doc, SNIPPET) == doc[:at] + S + doc[at:]


# ------------------------------------------------------------------------------------------
# streaming: only what may start a tag is held back
# ------------------------------------------------------------------------------------------


def test_text_goes_out_with_its_chunk() -> None:
    """Progress text streamed before the page ends must not wait for the next chunk."""
    inj = Injector(SNIPPET)
    step = b"<html><body><p>Step 1 of 3: loading your account \xe2\x80\xa6</p>\n"
    assert inj.feed(step) == step
    assert inj.feed(b"<p>Step 2 <") == b"<p>Step 2 "  # "<" may start </head> or </body>
    assert inj.feed(b"/p><scr") == b"</p>"  # may be <script>
    assert inj.feed(b"ipt>var a = '</h") == b"<script>var a = '</h"  # in a script: text
    assert inj.feed(b"ead>';</scr") == b"ead>';"  # may be </script>
    assert inj.feed(b"ipt></b") == b"</script>"
    assert inj.feed(b"ody>") == b""  # a later </body> would win
    assert inj.feed(b"<!-- -") == b""
    assert inj.finish() == S + b"</body><!-- -"


def test_held_tail_inside_a_comment_or_script() -> None:
    inj = Injector(SNIPPET)
    assert inj.feed(b"<head><!-- " + b"x" * 100 + b"--") == b"<head><!-- " + b"x" * 100
    assert inj.feed(b"!") == b""  # "--!" may still be "--!>"
    assert inj.feed(b"> <script>" + b"y" * 100 + b"</") == b"--!> <script>" + b"y" * 100
    assert inj.feed(b"scriptx") == b"</scriptx"
    assert inj.feed(b"</script></head>") == b"</script>" + S + b"</head>"


# ------------------------------------------------------------------------------------------
# charsets that cannot carry the snippet: the page goes through untouched
# ------------------------------------------------------------------------------------------

PAGE = b"<!doctype html><html><head><title>t</title></head><body><p>x</p></body></html>"


@pytest.mark.parametrize("charset", ["hex", "rot13", "base64", "undefined", "uu"])
def test_charset_that_is_no_text_encoding_fails_open(
    charset: str, caplog: pytest.LogCaptureFixture
) -> None:
    """codecs.lookup() knows these, but str.encode() refuses them (or always fails)."""
    caplog.set_level(logging.WARNING, logger="bosh_middleware")
    inj = Injector(SNIPPET, charset=charset)
    out = inj.feed(PAGE[:20]) + inj.feed(PAGE[20:]) + inj.finish()
    assert out == PAGE
    assert not inj.done  # the session did not go out: the adapter ends it
    assert inj.finish() == b""
    assert [r.name for r in caplog.records] == ["bosh_middleware"]
    assert repr(charset) in caplog.text


def test_a_charset_label_with_a_nul_is_no_error() -> None:
    """codecs.lookup() raises ValueError for it (not LookupError): the default is used."""
    assert inject(PAGE, SNIPPET, charset="utf\x008") == PAGE.replace(b"</head>", S + b"</head>")


@pytest.mark.parametrize("charset", ["no-such-charset", "utf-8x", "x-user-defined"])
def test_an_unknown_charset_label_is_searched_as_ascii(charset: str) -> None:
    """A browser ignores a label it does not know: with no BOM it decodes the page with a
    ``<meta charset>`` or its default, ASCII-compatible either way, as the UTF-8 default here."""
    inj = Injector(SNIPPET, charset=charset)
    assert inj.feed(PAGE) + inj.finish() == PAGE.replace(b"</head>", S + b"</head>")
    assert inj.done


def test_nonce_the_charset_cannot_encode_fails_open(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="bosh_middleware")
    snippet = script_snippet([("A", 1)], nonce="n\u00f6nce\u2603")
    assert inject(PAGE, snippet, charset="iso-8859-1") == PAGE
    assert inject(b"", snippet, charset="iso-8859-1") == b""
    assert "iso-8859-1" in caplog.text
    # Latin-1 can carry "ö": that nonce goes in.
    ok = script_snippet([("A", 1)], nonce="n\u00f6nce")
    assert inject(PAGE, ok, charset="iso-8859-1").count(ok.encode("latin-1")) == 1


# ------------------------------------------------------------------------------------------
# through the middleware (in-process, a ready-made session instead of a prebind)
# ------------------------------------------------------------------------------------------

SESSION = PrebindSession(
    jid="alice@example.org/web-1", sid="SID123", rid=42, service_url="http://127.0.0.1:9/"
)
CDN_HEADERS = [
    ("Cache-Control", "public, max-age=60"),
    ("CDN-Cache-Control", "max-age=300"),
    ("Cloudflare-CDN-Cache-Control", "max-age=300"),
    ("Surrogate-Control", "max-age=300"),
    ("Edge-Control", "max-age=300"),
    ("X-Accel-Expires", "3600"),  # nginx: wins over Cache-Control
    ("X-LiteSpeed-Cache-Control", "public,max-age=3600"),
]
CDN_NAMES = {n.lower() for n, _ in CDN_HEADERS} - {"cache-control"}


class _Ready:
    """Stands in for a finished prebind (core.AsyncPending / SyncPending)."""

    error = None

    async def session(self) -> PrebindSession:
        return SESSION

    def discard(self) -> None:
        pass


class _ReadySync(_Ready):
    def session(self) -> PrebindSession:  # type: ignore[override]
        return SESSION


def _asgi_page(content_type: str, headers: list[tuple[str, str]], body: bytes) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raw = [(b"content-type", content_type.encode())]
        raw += [(k.encode(), v.encode()) for k, v in headers]
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        await send({"type": "http.response.body", "body": body[:30], "more_body": True})
        await send({"type": "http.response.body", "body": body[30:]})

    return app


def _run_asgi(
    content_type: str, headers: list[tuple[str, str]] = (), body: bytes = PAGE
) -> tuple[ASGIRecorder, list[PrebindSession]]:
    mw = ASGIMiddleware(
        _asgi_page(content_type, list(headers), body),
        service_url="http://127.0.0.1:9/http-bind",
        credentials=lambda u: Credentials("alice@example.org", "pw"),
    )
    ended: list[PrebindSession] = []
    mw.core.start_async = lambda c: _Ready()  # type: ignore[assignment,method-assign]
    mw.core.terminate_async = ended.append  # type: ignore[method-assign]
    rec = ASGIRecorder()
    try:
        asyncio.run(mw(http_scope("/", headers=NAV, user=User("alice")), rec.receive, rec.send))
    finally:
        mw.core.close()
    return rec, ended


def _run_wsgi(
    content_type: str,
    headers: list[tuple[str, str]] = (),
    body: bytes = PAGE,
    *,
    whole: bool = False,
    ended: list[PrebindSession] | None = None,
) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", content_type), *headers])
        if whole:  # a list: injected at once, with a Content-Length
            return [body]
        return iter([body[:30], body[30:]])  # streamed: fed chunk by chunk

    mw = WSGIMiddleware(
        app,
        service_url="http://127.0.0.1:9/http-bind",
        credentials=lambda u: Credentials("alice@example.org", "pw"),
    )
    mw.core.start_sync = lambda c: _ReadySync()  # type: ignore[assignment,method-assign]
    if ended is not None:
        mw.core.terminate_sync = ended.append  # type: ignore[method-assign]
    try:
        return call_wsgi(mw, wsgi_environ("/", headers=NAV, user="alice"))
    finally:
        mw.core.close()


def test_asgi_page_with_a_non_text_charset_is_served_untouched() -> None:
    rec, ended = _run_asgi("text/html; charset=hex")
    assert rec.status == 200 and rec.body == PAGE and rec.complete
    assert ended == [SESSION]  # never delivered: ended at once


@pytest.mark.parametrize("whole", [False, True], ids=["streamed", "whole"])
def test_wsgi_page_with_a_non_text_charset_is_served_untouched(whole: bool) -> None:
    ended: list[PrebindSession] = []
    r = _run_wsgi("text/html; charset=base64", whole=whole, ended=ended)
    assert r.code == 200 and r.body == PAGE
    assert ended == [SESSION]  # never delivered: ended, not left to time out


def test_prebound_page_drops_cdn_cache_fields() -> None:
    """CDNs obey these instead of Cache-Control: an app's max-age there would let a CDN store
    a page that carries a live session, and serve it to others."""
    rec, _ = _run_asgi("text/html; charset=utf-8", CDN_HEADERS)
    assert page_vars(rec.body)["BOSH_SID"] == "SID123"
    names = {k.decode().lower() for k, _ in rec.raw_headers}
    assert names & CDN_NAMES == set()
    assert rec.headers("cache-control") == ["private, no-store"]
    r = _run_wsgi("text/html; charset=utf-8", CDN_HEADERS)
    assert page_vars(r.body)["BOSH_SID"] == "SID123"
    assert {k.lower() for k, _ in r.headers} & CDN_NAMES == set()
    assert r.header_list("cache-control") == ["private, no-store"]


# ------------------------------------------------------------------------------------------
# property tests
# ------------------------------------------------------------------------------------------

WS = b" \t\r\n\f"


def _tag_at(doc: bytes, i: int, name: bytes) -> bool:
    """Reference matcher, written without regexes: "</" name (ASCII case-insensitive),
    at most 32 whitespace bytes, ">"."""
    if doc[i : i + 2] != b"</":
        return False
    j = i + 2
    if len(doc) < j + len(name) or doc[j : j + len(name)].lower() != name:
        return False
    j += len(name)
    spaces = 0
    while j < len(doc) and doc[j] in WS and spaces < 32:
        j += 1
        spaces += 1
    return doc[j : j + 1] == b">"


RAW_ELEMENTS = (
    b"script",
    b"style",
    b"title",
    b"textarea",
    b"xmp",
    b"iframe",
    b"noembed",
    b"noframes",
    b"noscript",
)
NAME_END = WS + b"/>"


def _name_at(doc: bytes, i: int, opening: bytes, name: bytes) -> bool:
    """``opening`` ("<" or "</"), ``name`` (ASCII case-insensitive), then whitespace, / or >."""
    j = i + len(opening) + len(name)
    return (
        doc[i : i + len(opening)] == opening
        and doc[i + len(opening) : j].lower() == name
        and doc[j : j + 1] != b""
        and doc[j] in NAME_END
    )


def _partial_token_at(doc: bytes, i: int, codec: str = "utf-8") -> bool:
    """Whether ``doc[i:]`` (the end of the document) may be the start of a token that the
    search waits for: a prefix of one of these, or "</head"/"</body" and some whitespace. As
    the injector reads it, a character cut at the end does not count (decoded leniently)."""
    tail = doc[i:].decode(codec, "ignore").lower()
    if any(w.startswith(tail) for w in PARTIAL_WORDS):
        return True
    stem = tail.rstrip(WS.decode())
    return stem in ("</head", "</body") and len(tail) - len(stem) <= 32


PARTIAL_WORDS = (
    "</head",
    "</body",
    "</template",
    "<template",
    "<!-",
    *(f"<{r.decode()}" for r in RAW_ELEMENTS),
)


def _script_end(doc: bytes, k: int) -> int:
    """Where the text of a script that starts at ``k`` ends (its "</script"), or -1: "<!--"
    escapes it, and an escaped "<script" makes the next "</script" part of the text, until
    "-->" (the HTML tokenizer's script data escaped states)."""
    state = "data"
    while k < len(doc):
        if _name_at(doc, k, b"</", b"script"):
            if state != "double":
                return k
            state, k = "escaped", k + 8
        elif state == "data" and doc.startswith(b"<!--", k):
            state, k = "escaped", k + 2  # its dashes may end it: "<!-->"
        elif state == "escaped" and _name_at(doc, k, b"<", b"script"):
            state, k = "double", k + 7
        elif state != "data" and doc.startswith(b"-->", k):
            state, k = "data", k + 3
        else:
            k += 1
    return -1


def _tag_end(doc: bytes, i: int) -> int | None:
    """Where the tag that starts at ``doc[i]`` ends (after its first ">": attribute values
    are not tokenized), None if it does not."""
    k = doc.find(b">", i)
    return None if k < 0 else k + 1


def reference_position(doc: bytes, codec: str = "utf-8") -> int | None:
    """Walks the document as the HTML tokenizer does, for what matters here, one byte at a
    time: comments, bogus comments (<!...>, <?...>, </1...>), tags (to their first ">": a
    "<" inside one is no token), raw-text elements (a script's escaped states too) and
    templates. At the end: before a token or an ordinary tag the
    document ends in the middle of. None: no place for the snippet, as the document ends
    inside a comment, raw text, a template's content (inert), or a "<template" or
    "</script" tag."""
    last_body, templates, i = None, 0, 0
    while i < len(doc):
        nxt = doc[i + 1 : i + 2]
        if doc.startswith(b"<!--", i):
            ends = [k for k in (doc.find(b"-->", i + 2), doc.find(b"--!>", i + 2)) if k >= 0]
            if not ends:
                return last_body
            k = min(ends)
            i = k + (3 if doc.startswith(b"-->", k) else 4)
            continue
        if doc[i:] in (b"<!", b"<!-"):
            break  # may still become a comment
        if doc.startswith((b"<!", b"<?"), i) or (
            doc.startswith(b"</", i)
            and doc[i + 2 : i + 3] not in (b"", b">")
            and not doc[i + 2 : i + 3].isalpha()
        ):
            k = doc.find(b">", i + 2)
            if k < 0:
                return last_body
            i = k + 1
            continue
        if raw := next((r for r in RAW_ELEMENTS if _name_at(doc, i, b"<", r)), None):
            k = _tag_end(doc, i) or -1  # (its text begins after its start tag)
            if k < 0:
                return last_body
            if raw == b"script":
                k = _script_end(doc, k)
            else:
                while k < len(doc) and not _name_at(doc, k, b"</", raw):
                    k += 1
            end = _tag_end(doc, k) if 0 <= k < len(doc) else None  # its end tag
            if end is None:
                return last_body
            i = end
            continue
        if _name_at(doc, i, b"<", b"template") or _name_at(doc, i, b"</", b"template"):
            if doc[i + 1 : i + 2] != b"/":
                templates += 1
            else:
                templates = max(0, templates - 1)
            end = _tag_end(doc, i)
            if end is None:
                return last_body
            i = end
            continue
        if templates == 0 and _tag_at(doc, i, b"head"):
            return i
        if _tag_at(doc, i, b"body"):
            last_body = i if templates == 0 else last_body
        if doc[i : i + 1] == b"<" and (
            nxt.isalpha() or (nxt == b"/" and doc[i + 2 : i + 3].isalpha())
        ):
            if _partial_token_at(doc, i, codec):
                break  # the document ends in it
            end = _tag_end(doc, i)
            if end is None:  # the document ends in this tag: before it (if short), out of templates
                if last_body is not None or templates:
                    return last_body
                return i if len(doc) - i <= 4096 else None
            i = end
            continue
        i += 1
    if last_body is not None:
        return last_body
    if templates:
        return None
    return next(
        (j for j in range(len(doc)) if doc[j : j + 1] == b"<" and _partial_token_at(doc, j, codec)),
        len(doc),
    )


TAGS = [
    b"</head>",
    b"</HEAD>",
    b"</Head >",
    b"</head\n\t>",
    b"</body>",
    b"</BODY>",
    b"</bOdY   >",
    b"</head" + b" " * 33 + b">",
    b"</header>",
    b"</bo",
    b"</hea",
    b"<head>",
    b"</",
    b"<",
    b">",
    b"</body\r\n>",
    # what the search must step over
    b"<!--",
    b"<!-->",
    b"-->",
    b"--!>",
    b"-",
    b"<!",
    b"<?",
    b"<script>",
    b"<SCRIPT ",
    b"</script>",
    b"</Script\t",
    b"<scripts>",
    b"<style/",
    b"</style>",
    b"<title>",
    b"</TITLE>",
    b"<template>",
    b"</template>",
    # tags (a "<" in one is no token), bogus end tags, a script's escaped text
    b"<a title='",
    b"'>",
    b"<p ",
    b"</1",
    b"</>",
    b"<!--<script>",
    b"<sCript>",
]
parts = st.one_of(
    st.sampled_from(TAGS),
    st.text(alphabet="ab<>/ \tHhEeAaDdBbOoYyİé€", max_size=12).map(str.encode),
    st.binary(max_size=8).filter(lambda b: not b.startswith((b"\xff\xfe", b"\xfe\xff"))),
)
documents = (
    st.lists(parts, max_size=14)
    .map(b"".join)
    .filter(
        lambda d: not d.startswith((b"\xff\xfe", b"\xfe\xff"))  # a BOM would make it UTF-16
    )
)
PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    doc = draw(documents)
    cuts = sorted(draw(st.lists(st.integers(0, len(doc)), max_size=8)))
    bounds = [0, *cuts, len(doc)]
    return doc, [doc[a:b] for a, b in itertools.pairwise(bounds)]


@PROPERTY_SETTINGS
@given(chunked())
def test_property_any_chunking_equals_whole_body(case: tuple[bytes, list[bytes]]) -> None:
    doc, chunks = case
    assert feed_chunks(chunks) == inject(doc, SNIPPET)


@PROPERTY_SETTINGS
@given(documents)
def test_property_exactly_one_insertion_at_the_rule_position(doc: bytes) -> None:
    assert inject(doc, SNIPPET) == expected(doc)


def expected(doc: bytes) -> bytes:
    """``doc`` with the snippet where ``reference_position`` puts it, or as it is."""
    pos = reference_position(doc)
    return doc if pos is None else doc[:pos] + S + doc[pos:]


@PROPERTY_SETTINGS
@given(chunked())
def test_property_chunked_insertion_obeys_the_rule(case: tuple[bytes, list[bytes]]) -> None:
    doc, chunks = case
    assert feed_chunks(chunks) == expected(doc)


@pytest.mark.parametrize("text", ["<<<<<></head>", "<p>ab</head>", "<!-- x --></head>"])
def test_utf16_page_cut_inside_a_code_unit(text: str) -> None:
    """A chunk that ends in the middle of a UTF-16 code unit (half a "<") holds the half back:
    at every cut, the snippet goes where it goes in the whole page."""
    doc = text.encode("utf-16")
    whole = feed_chunks([doc], charset="utf-16").decode("utf-16")
    assert whole == text.replace("</head>", SNIPPET + "</head>")
    for cut in range(len(doc) + 1):
        out = feed_chunks([doc[:cut], doc[cut:]], charset="utf-16")
        assert out.decode("utf-16") == whole, cut


@PROPERTY_SETTINGS
@given(
    st.lists(
        st.sampled_from([t.decode() for t in TAGS]) | st.text("ab<>/ Hhéİ😀", max_size=6),
        max_size=10,
    ).map("".join),
    st.lists(st.integers(0, 400), max_size=6),
)
def test_property_utf16_pages(text: str, cuts: list[int]) -> None:
    doc = text.encode("utf-16")  # with a BOM
    bounds = [0, *sorted(c for c in cuts if c <= len(doc)), len(doc)]
    chunks = [doc[a:b] for a, b in itertools.pairwise(bounds)]
    out = feed_chunks(chunks, charset="utf-16")
    # Same offsets, one byte per character: ASCII tags, and anything else as "é", which like
    # "İ" or "😀" is text after a "<" ("?", encode's usual stand-in, would start a "<?" token).
    latin = "".join(c if ord(c) < 256 else "é" for c in text).encode("latin-1")
    pos = reference_position(latin, "latin-1")  # (one character per byte, as in UTF-16)
    assert out.decode("utf-16") == (text if pos is None else text[:pos] + SNIPPET + text[pos:])


XHTML_HEAD = (
    '<?xml version="1.0" encoding="utf-8"?>\n'
    '<html xmlns="http://www.w3.org/1999/xhtml"><head><title>t</title>{}@</head>'
    "<body><p>x</p></body></html>"
)


@pytest.mark.parametrize(
    "element",
    [
        '<script src="a.js"/>',
        '<script type="module" src="a.js" />',
        "<title/>",
        "<style/>",
        '<textarea name="a"/>',
        '<iframe src="/frame"/>',
        '<SCRIPT src="a.js"/>',
    ],
)
def test_xhtml_raw_text_element_that_closes_itself(element: str) -> None:
    """In XHTML (read by browsers with their XML parser) ``<script src="a.js"/>`` is a whole
    element: the page's ``</head>`` after it is the end of the head, at every cut of the
    stream. Read as HTML, the same bytes open a script whose text runs to the page's end."""
    page = XHTML_HEAD.format(element).encode()
    want = page.replace(b"@", SNIPPET.encode())
    doc = page.replace(b"@", b"")

    def fed(chunks: list[bytes], xml: bool) -> bytes:
        inj = Injector(SNIPPET, xml=xml)
        return b"".join(inj.feed(c) for c in chunks) + inj.finish()

    for cut in range(len(doc) + 1):
        assert fed([doc[:cut], doc[cut:]], xml=True) == want, cut
    assert fed([doc[i : i + 1] for i in range(len(doc))], xml=True) == want
    # what a browser's XML parser reads: the snippet's script is the head's last child
    root = lxml.etree.fromstring(want)
    head = root.find("{http://www.w3.org/1999/xhtml}head")
    assert head is not None and "BOSH_SID" in (head[-1].text or "")
    if element.lower().startswith(("<script", "<style", "<textarea", "<iframe", "<title")):
        assert fed([doc], xml=False) == doc  # HTML rules: inside the element's text to the end


def test_xhtml_utf16_script_that_closes_itself() -> None:
    page = XHTML_HEAD.replace("utf-8", "utf-16").format('<script src="a.js"/>')
    doc = page.replace("@", "").encode("utf-16-le")
    want = page.replace("@", SNIPPET).encode("utf-16-le")
    for cut in range(0, len(doc) + 1):
        inj = Injector(SNIPPET, charset="utf-16le", xml=True)
        assert inj.feed(doc[:cut]) + inj.feed(doc[cut:]) + inj.finish() == want, cut


@pytest.mark.parametrize(
    "tag",
    [
        '<script data-x="<!--">',  # (then a "<script" in the text would start a double escape)
        '<script data-x="</script ">',
        "<script data-x='</script/'>",
        '<style data-x="</style ">',
    ],
)
def test_raw_text_begins_after_the_start_tag(tag: str) -> None:
    """An element's raw text begins after its start tag's ``>``: a ``<!--`` or an end tag's
    start in an attribute value is no part of it (both counted before, the first leaving the
    rest of the page in a script, the second ending the element inside its own tag)."""
    body = 'var s = "<script>"; var t = "</head>";' if tag.startswith("<script") else "p{}"
    end = "</script>" if tag.startswith("<script") else "</style>"
    page = f"<html><head>{tag}{body}{end}@</head><body></body></html>"
    doc = page.replace("@", "").encode()
    want = page.replace("@", SNIPPET).encode()
    assert feed_chunks([doc]) == want
    for cut in range(len(doc) + 1):
        assert feed_chunks([doc[:cut], doc[cut:]]) == want, cut
    # where a parser that follows the HTML standard puts it: after the page's own element
    html5lib = pytest.importorskip("html5lib")
    head = html5lib.parse(want.decode(), namespaceHTMLElements=False).find("head")
    assert [child.tag for child in head] == [tag[1:].split()[0], "script"]
    assert "BOSH_SID" in (head[-1].text or "")


def test_page_injector_reads_xhtml_from_the_content_type() -> None:
    from bosh_middleware.core import page_injector

    doc = XHTML_HEAD.format('<script src="a.js"/>').replace("@", "").encode("latin-1")
    for content_type, injected in [
        ("application/xhtml+xml", True),
        ("Application/XHTML+XML; charset=latin-1", True),
        ("text/html; charset=utf-8", False),
        (None, False),
    ]:
        inj = page_injector(SNIPPET, content_type)
        out = inj.feed(doc) + inj.finish()
        assert inj.done is injected and (SNIPPET.encode() in out) is injected, content_type
    assert page_injector(SNIPPET, "text/html; charset=utf-16", "latin-1")._charset == "latin-1"


def test_a_page_that_ends_in_a_template_gets_no_snippet(caplog: pytest.LogCaptureFixture) -> None:
    """A template's content is inert: a script appended there would never run, while the
    session it carries would count as delivered and stay live until it timed out."""
    doc = b"<html><head><title>t</title><template><p>x</p>"
    with caplog.at_level(logging.WARNING, logger="bosh_middleware"):
        for cut in range(len(doc) + 1):
            inj = Injector(SNIPPET)
            assert inj.feed(doc[:cut]) + inj.feed(doc[cut:]) + inj.finish() == doc, cut
            assert not inj.done
    assert "ends inside a <template> element" in caplog.text
    # a </body> before it still takes the snippet
    doc = b"<html><body><p>x</p></body><template><p>y</p>"
    assert inject(doc, SNIPPET) == doc.replace(b"</body>", SNIPPET.encode() + b"</body>")


def test_xhtml_template_that_closes_itself() -> None:
    page = XHTML_HEAD.format("<template/>")
    doc = page.replace("@", "").encode()
    want = page.replace("@", SNIPPET).encode()
    for cut in range(len(doc) + 1):
        inj = Injector(SNIPPET, xml=True)
        assert inj.feed(doc[:cut]) + inj.feed(doc[cut:]) + inj.finish() == want, cut
    inj = Injector(SNIPPET, xml=True)  # an XHTML template that holds something: as in HTML
    doc = XHTML_HEAD.format("<template><p>x</p></template>").replace("@", "").encode()
    assert inj.feed(doc) + inj.finish() == doc.replace(b"</head>", SNIPPET.encode() + b"</head>")

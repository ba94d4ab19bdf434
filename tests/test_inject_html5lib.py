"""The injector against html5lib, an HTML parser that follows the standard's tokenizer and tree
builder (with scripting on, as in a browser that runs the snippet).

For generated documents: the page with the snippet parses to the page's own tree plus exactly
one script element holding the snippet's code, so the snippet runs and nothing of the page
changed (up to where comments and whitespace-only text land, which an element before them can
move between the document, ``<head>`` and ``<body>``). When the injector declines (the page ends
inside a comment or raw text), it must be that the snippet at the end would not have run.

Outside what is generated here, as documented: a ``>`` inside a quoted attribute value ends the
tag as far as the search goes; SVG/MathML content and ``<plaintext>`` are not modelled.
"""

from __future__ import annotations

import itertools
from typing import Any
from xml.etree import ElementTree

import html5lib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bosh_middleware.inject import Injector

CODE = 'var BOSH_JID="a@b/c",BOSH_SID="s",BOSH_RID=7;'
SNIPPET = f"<script>{CODE}</script>"

Found = tuple[ElementTree.Element, int, ElementTree.Element]


def parse(html: bytes | str) -> ElementTree.Element:
    if isinstance(html, bytes):
        html = html.decode("latin-1")
    tree: ElementTree.Element = html5lib.parse(
        html, treebuilder="etree", namespaceHTMLElements=False, scripting=True
    )
    return tree


def snippets(root: ElementTree.Element) -> list[Found]:
    """The script elements that hold the snippet's code, and nothing else (no attribute: a
    snippet swallowed by an unfinished ``<script`` tag would carry one), that would run: not
    in a ``<template>``'s content, which is inert (html5lib's etree puts it in the element)."""
    found: list[Found] = []

    def walk(parent: ElementTree.Element) -> None:
        for i, child in enumerate(parent):
            if child.tag == "script" and child.text == CODE and not child.attrib:
                found.append((parent, i, child))
            if child.tag != "template":
                walk(child)

    walk(root)
    return found


def without(found: Found) -> None:
    parent, i, child = found
    if child.tail:  # its tail text joins what came before it
        if i:
            parent[i - 1].tail = (parent[i - 1].tail or "") + child.tail
        else:
            parent.text = (parent.text or "") + child.tail
    parent.remove(child)


def outline(root: ElementTree.Element) -> list[Any]:
    """Elements (with attributes) and text in document order, without comments and
    whitespace-only text, adjacent text joined, its whitespace left out."""
    out: list[Any] = []

    def text(value: str | None) -> None:
        if value and value.strip():
            if out and out[-1][0] == "text":
                out[-1] = ("text", out[-1][1] + value)
            else:
                out.append(("text", value))

    def walk(el: ElementTree.Element) -> None:
        if isinstance(el.tag, str):  # (a comment's tag is a function)
            out.append(("start", el.tag, sorted(el.attrib.items())))
            text(el.text)
            for child in el:
                walk(child)
            out.append(("end", el.tag))
        text(el.tail)

    walk(root)
    # Text compared without whitespace: a script in a table splits "<table> <" into a space
    # the table keeps and a "<" fostered out before it, where without one " <" is fostered whole
    return [("text", "".join(v[1].split())) if v[0] == "text" else v for v in out]


def cases(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from(sorted({name, name.upper(), name.title()}))


NAMES = [
    *("html", "head", "body", "p", "div", "a", "table", "td", "meta", "br"),
    *("title", "script", "style", "textarea", "xmp", "iframe", "noembed", "noframes"),
    *("noscript", "template"),
]
# Attribute values hold "<" or ">", not both (see the module docstring).
value = st.text("ab </=-!", max_size=5) | st.text("ab >/=-!", max_size=5)
attribute = st.one_of(
    st.builds(lambda v: f' x="{v}"', value),
    st.builds(lambda v: f" q='{v}'", value),
    st.builds(lambda v: f" x={v}", st.text("ab-", min_size=1, max_size=4)),
    st.just(" w"),
)
start_tag = st.builds(
    lambda n, attrs, space, slash: f"<{n}{''.join(attrs)}{space}{slash}>",
    st.sampled_from(NAMES).flatmap(cases),
    st.lists(attribute, max_size=2),
    st.sampled_from(["", " ", "\n"]),
    st.sampled_from(["", "/"]),
)
end_tag = st.builds(
    lambda n, space: f"</{n}{space}>",
    st.sampled_from(NAMES).flatmap(cases),
    st.sampled_from(["", " ", "  \t"]),
)
text = st.text("ab \n>&=\"'/-!", max_size=6)
comment = st.builds(
    lambda inside, end: f"<!--{inside}{end}",
    st.sampled_from(["", "x", "</head>", "<script>", "-", "<!--"]),
    st.sampled_from(["-->", "--!>", "->"]),
)
special = st.sampled_from(
    [
        *("<!-->", "<!--->", "<!DOCTYPE html>", "<?xml x?>", "</1x>", "</>", "< b"),
        *("<![CDATA[ x ]]>", "<script><!--<script></script>-->", "</scrip", "</scripts>"),
    ]
)
# How a document may end: a token or tag cut off in the middle too.
ending = st.sampled_from(
    ["", "<", "</", "<!", "<!-", "<!--x", "<script>x", "<H", '<a href="x', "</he", "</head  "]
)
documents = st.builds(
    lambda tokens, end: ("".join(tokens) + end).encode("latin-1"),
    st.lists(st.one_of(start_tag, end_tag, text, comment, special), max_size=12),
    ending,
)


@settings(
    max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(documents, st.lists(st.integers(0, 200), max_size=4))
def test_the_snippet_runs_and_the_page_is_unchanged(doc: bytes, cuts: list[int]) -> None:
    injector = Injector(SNIPPET)
    bounds = [0, *sorted(c for c in cuts if c <= len(doc)), len(doc)]
    out = b"".join(injector.feed(doc[a:b]) for a, b in itertools.pairwise(bounds))
    out += injector.finish()
    if not injector.done:
        assert out == doc
        assert snippets(parse(doc + SNIPPET.encode())) == [], "it would have run at the end"
        return
    page = parse(out)
    found = snippets(page)
    assert len(found) == 1, out
    without(found[0])
    assert outline(page) == outline(parse(doc)), out


def straddling(token: str) -> str:
    """CJK text whose UTF-16LE bytes, read from the second byte on, are ``token`` in UTF-16LE
    ("</head>" is in "\u3c41\u2f00\u6800..."): to be found only on a code unit."""
    return (b"\x41" + token.encode("utf-16-le") + b"\x4e").decode("utf-16-le")


hidden = st.sampled_from(
    ["</head>", "</body>", "</script>", "</title>", "<!--", "-->", "<script>", "<template>"]
).map(straddling)
utf16_documents = st.builds(
    lambda tokens, end: "".join(tokens) + end,
    st.lists(st.one_of(start_tag, end_tag, text, comment, special, hidden), max_size=12),
    ending,
)


@settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    utf16_documents,
    st.lists(st.integers(0, 400), max_size=4),
    st.sampled_from([("utf-16le", b""), (None, b"\xff\xfe"), ("utf-16", b"")]),
)
def test_utf16_page_with_tags_hidden_across_characters(
    html: str, cuts: list[int], label: tuple[str | None, bytes]
) -> None:
    charset, bom = label
    doc = bom + html.encode("utf-16-le")
    injector = Injector(SNIPPET, charset=charset)
    bounds = [0, *sorted(c for c in cuts if c <= len(doc)), len(doc)]
    out = b"".join(injector.feed(doc[a:b]) for a, b in itertools.pairwise(bounds))
    out += injector.finish()
    if not injector.done:
        assert out == doc
        assert snippets(parse(html + SNIPPET)) == [], "it would have run at the end"
        return
    assert out.startswith(bom)
    page = parse(out[len(bom) :].decode("utf-16-le"))
    found = snippets(page)
    assert len(found) == 1, out
    without(found[0])
    assert outline(page) == outline(parse(html)), out

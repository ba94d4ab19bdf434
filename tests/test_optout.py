"""``no_prebind(request)``: where it leaves its word for each kind of request. What the adapters
make of it is tested with each of them, against the real Prosody."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from bosh_middleware import no_prebind
from bosh_middleware.optout import NO_PREBIND, opted_out


@pytest.mark.parametrize("kind", ["scope", "environ"])
def test_a_scope_or_environ_is_marked_itself(kind: str) -> None:
    mapping: dict[str, Any] = {"type": "http"} if kind == "scope" else {"PATH_INFO": "/"}
    assert not opted_out(mapping)
    no_prebind(mapping)
    assert opted_out(mapping) and mapping[NO_PREBIND] is True


@pytest.mark.parametrize(
    "attrs,marked",
    [
        # Django's HttpRequest: META (under ASGI it also has .scope, which Django's middleware
        # does not read: META wins)
        ({"META": {}, "scope": {}}, "META"),
        ({"META": {}, "environ": {}}, "META"),
        ({"scope": {}}, "scope"),  # Starlette's Request
        ({"environ": {}}, "environ"),  # Werkzeug's (Flask's) request
    ],
)
def test_a_request_object_marks_the_mapping_its_middleware_reads(
    attrs: dict[str, Any], marked: str
) -> None:
    request = SimpleNamespace(**attrs)
    no_prebind(request)
    for name, mapping in attrs.items():
        assert opted_out(mapping) == (name == marked), name


@pytest.mark.parametrize("request_", [None, "GET /", SimpleNamespace(scope=None), ("a", "b")])
def test_anything_else_is_refused_with_what_it_takes(request_: Any) -> None:
    with pytest.raises(TypeError, match="takes the view's request"):
        no_prebind(request_)


@pytest.mark.parametrize("value", [1, "yes", "True", object()])
def test_only_no_prebinds_own_word_counts(value: Any) -> None:
    """The key is ``no_prebind``'s: only the True it sets counts, not a look-alike value."""
    assert not opted_out({NO_PREBIND: value})

"""A middleware that sets ``request.user`` itself, to put above ours in the tests."""

from __future__ import annotations

from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.contrib.auth import get_user_model
from django.http import HttpRequest
from django.utils.functional import SimpleLazyObject


class ActAs:
    """Replaces ``request.user`` with the user named by ``X-Act-As`` (impersonation, token auth),
    after AuthenticationMiddleware has set its lazy object (and ``auser``)."""

    sync_capable = async_capable = True

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        if name := request.headers.get("X-Act-As"):
            request.user = get_user_model().objects.get(username=name)
        return self.get_response(request)

    async def __acall__(self, request: HttpRequest) -> Any:
        if name := request.headers.get("X-Act-As"):
            request.user = await get_user_model().objects.aget(username=name)
        return await self.get_response(request)


def lazy_act_as(get_response: Any) -> Any:
    """``ActAs`` as a token-auth middleware is often written: sync only, and ``request.user`` a
    lazy object of its own, loaded from the database when first used."""

    def middleware(request: HttpRequest) -> Any:
        if name := request.headers.get("X-Act-As"):
            request.user = SimpleLazyObject(lambda: get_user_model().objects.get(username=name))
        return get_response(request)

    return middleware

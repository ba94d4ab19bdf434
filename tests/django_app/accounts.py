"""The ``CREDENTIALS`` callables: Django username -> XMPP account, from a dict tests fill.

Both ask the ORM first, on purpose: under ASGI the sync one must run off the event loop.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model

from bosh_middleware import Credentials

#: username -> (bare JID, password)
ACCOUNTS: dict[str, tuple[str, str]] = {}


def credentials(user: Any) -> Credentials | None:
    if not get_user_model().objects.filter(pk=user.pk, is_active=True).exists():
        return None
    account = ACCOUNTS.get(user.get_username())
    return Credentials(jid=account[0], password=account[1]) if account else None


async def acredentials(user: Any) -> Credentials | None:
    if not await get_user_model().objects.filter(pk=user.pk, is_active=True).aexists():
        return None
    account = ACCOUNTS.get(user.get_username())
    return Credentials(jid=account[0], password=account[1]) if account else None

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


@login_required
def chat(request: HttpRequest) -> HttpResponse:
    """The chat page. The middleware adds BOSH_JID/SID/RID/SERVICE to its <head>; chat.js
    attaches to that session. Nothing XMPP-specific happens in the view."""
    return render(
        request,
        "chat/chat.html",
        {
            "bosh_service": settings.BOSH_PREBIND.get("PUBLIC_SERVICE_URL", ""),
            "xmpp_domain": settings.XMPP_DOMAIN,
        },
    )

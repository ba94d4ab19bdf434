"""``BOSH_PREBIND["CREDENTIALS"]``: which XMPP account a Django user gets.

``alice`` logs in as ``alice@<XMPP_DOMAIN>`` with the password HMAC-SHA256(BOSH_SHARED_SECRET,
JID): the XMPP accounts are provisioned with ``bosh_middleware.derive_password`` (the demo does
it when it starts Prosody), and this project stores no XMPP password at all.
"""

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from bosh_middleware import SharedSecretCredentials

if not settings.BOSH_SHARED_SECRET:
    raise ImproperlyConfigured(
        "BOSH_SHARED_SECRET is not set: run `python examples/demo.py`, or see "
        "examples/django/README.md"
    )

credentials = SharedSecretCredentials(settings.BOSH_SHARED_SECRET, settings.XMPP_DOMAIN)

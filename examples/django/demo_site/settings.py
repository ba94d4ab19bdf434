"""Settings of the bosh-middleware Django example.

The XMPP side comes from the environment (``examples/demo.py`` sets it):

* ``BOSH_SERVICE_URL``         BOSH endpoint as this server reaches it
* ``BOSH_PUBLIC_SERVICE_URL``  ... and as browsers reach it (default: the same, without a
  ``user:password@``, which only this server may send)
* ``BOSH_SHARED_SECRET``       XMPP passwords are HMAC-SHA256(secret, JID) (see chat/xmpp.py)
* ``XMPP_DOMAIN``              the users' XMPP domain (default ``localhost``)
"""

import os
from pathlib import Path
from urllib.parse import urlsplit

from django.core.management.utils import get_random_secret_key

BASE_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BASE_DIR.parent.parent

# A fresh key per start unless given: the demo's logins do not survive a restart.
SECRET_KEY = os.environ.get("DEMO_SECRET_KEY") or get_random_secret_key()
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.staticfiles",
    "bosh_middleware.django",  # system checks for BOSH_PREBIND and the MIDDLEWARE order
    "chat",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # After sessions and authentication: it needs request.user.
    "bosh_middleware.django.BOSHPrebindMiddleware",
]


def without_userinfo(url: str) -> str:
    """``url`` without its ``user:password@`` (Basic auth for a proxy in front of the XMPP
    server, which only this server sends): the public URL is written into every page."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


BOSH_SERVICE_URL = os.environ.get("BOSH_SERVICE_URL", "http://127.0.0.1:5280/http-bind")
BOSH_SHARED_SECRET = os.environ.get("BOSH_SHARED_SECRET", "")
XMPP_DOMAIN = os.environ.get("XMPP_DOMAIN", "localhost")

BOSH_PREBIND = {
    "SERVICE_URL": BOSH_SERVICE_URL,
    "CREDENTIALS": "chat.xmpp.credentials",
    # Written into pages as BOSH_SERVICE, next to BOSH_JID, BOSH_SID and BOSH_RID.
    "PUBLIC_SERVICE_URL": os.environ.get(
        "BOSH_PUBLIC_SERVICE_URL", without_userinfo(BOSH_SERVICE_URL)
    ),
    "EXCLUDE_PATHS": ["/static/"],
}

ROOT_URLCONF = "demo_site.urls"
WSGI_APPLICATION = "demo_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
            ],
        },
    },
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_DB_PATH") or BASE_DIR / "db.sqlite3",
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

# Strophe.js straight from node_modules (`npm ci` at the repository root), and the chat page's
# script and style shared by the examples.
STATIC_URL = "static/"
STATICFILES_DIRS = [
    ("strophe", REPO_DIR / "node_modules" / "strophe.js" / "dist"),
    ("demo", BASE_DIR.parent / "bosh_demo" / "static"),
]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"bosh_middleware": {"handlers": ["console"], "level": "INFO"}},
}

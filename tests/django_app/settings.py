"""Settings of the test project, as keyword arguments for ``settings.configure()``.

BOSH_PREBIND's SERVICE_URL is a placeholder: the ``bosh`` fixture points it at the test Prosody.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
_DB = os.path.join(tempfile.gettempdir(), f"bosh-django-{os.getpid()}")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "bosh_middleware.django.BOSHPrebindMiddleware",
]

SETTINGS = {
    "DEBUG": False,
    "SECRET_KEY": "bosh-middleware-tests-only",
    "ALLOWED_HOSTS": ["127.0.0.1", "localhost", "testserver"],
    "ROOT_URLCONF": "django_app.urls",
    "INSTALLED_APPS": [
        "django.contrib.contenttypes",
        "django.contrib.auth",
        "django.contrib.sessions",
        "bosh_middleware.django",
    ],
    "MIDDLEWARE": MIDDLEWARE,
    "DATABASES": {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": f"{_DB}.sqlite3",
            # A file, not shared-cache memory: server threads use the database concurrently.
            "TEST": {"NAME": f"{_DB}-test.sqlite3"},
        }
    },
    "DEFAULT_AUTO_FIELD": "django.db.models.AutoField",
    "PASSWORD_HASHERS": ["django.contrib.auth.hashers.MD5PasswordHasher"],
    "TEMPLATES": [
        {
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "DIRS": [HERE / "templates"],
            "OPTIONS": {
                "context_processors": [
                    "django.template.context_processors.request",
                    "django.contrib.auth.context_processors.auth",
                ]
            },
        }
    ],
    "LOGIN_URL": "/accounts/login/",
    "LOGIN_REDIRECT_URL": "/page/",
    "USE_TZ": True,
    "BOSH_PREBIND": {
        "SERVICE_URL": "http://127.0.0.1:9/http-bind",
        "CREDENTIALS": "django_app.accounts.credentials",
        "TIMEOUT": 10,
    },
}

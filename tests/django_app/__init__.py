"""A minimal Django project for bosh_middleware.django's tests (configured by conftest.py)."""

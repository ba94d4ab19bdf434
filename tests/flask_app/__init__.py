"""Test apps and framework-free checks for the Flask and Starlette adapter tests.

``flask_app.app`` is the Flask app (imports Flask); ``flask_app.checks`` imports no web
framework, so the Starlette tests use it too.
"""

"""Serve the Django example on a threaded WSGI server: migrate, create the demo users, serve.

    BOSH_SERVICE_URL=... BOSH_SHARED_SECRET=... python examples/django/serve.py --port 8000

(``python examples/demo.py`` does all of it, Prosody included.) Static files (Strophe.js from
node_modules, chat.js) are served by Django's staticfiles handler, as ``runserver`` does. Without
``DJANGO_DB_PATH`` the database is a temporary file, removed on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from socketserver import ThreadingMixIn
from types import FrameType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

HERE = Path(__file__).resolve().parent


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--quiet", action="store_true", help="no access log")
    args = parser.parse_args()

    tmp = None
    if not os.environ.get("DJANGO_DB_PATH"):
        tmp = tempfile.mkdtemp(prefix="bosh-django-example-")
        os.environ["DJANGO_DB_PATH"] = os.path.join(tmp, "db.sqlite3")
    # Ours, whatever the environment says (a test runner may have set another project's).
    os.environ["DJANGO_SETTINGS_MODULE"] = "demo_site.settings"
    sys.path.insert(0, str(HERE))

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        import django
        from django.contrib.staticfiles.handlers import StaticFilesHandler
        from django.core.management import call_command
        from django.core.wsgi import get_wsgi_application

        django.setup()
        call_command("check", fail_level="ERROR")
        call_command("migrate", interactive=False, verbosity=0)
        call_command("create_demo_users")
        app = StaticFilesHandler(get_wsgi_application())
        handler = QuietHandler if args.quiet else WSGIRequestHandler
        with make_server(
            args.host, args.port, app, server_class=ThreadingWSGIServer, handler_class=handler
        ) as httpd:
            print(f"Django example on http://{args.host}:{args.port}/", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                httpd.serve_forever(poll_interval=0.2)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Start one of the example web apps as a child process, configured through the environment.

    with ExampleApp("django", xmpp_service_url, secret, port=8000) as app:
        app.url   # http://127.0.0.1:8000/

The child runs ``examples/bosh_demo/child.py`` which exits as soon as this process is gone
(no orphaned web server after a SIGKILL), then the example's own entry point.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from . import (
    DOMAIN,
    ENV_DOMAIN,
    ENV_PARENT_PID,
    ENV_PUBLIC_SERVICE_URL,
    ENV_SERVICE_URL,
    ENV_SHARED_SECRET,
    EXAMPLES_DIR,
)
from .xmpp import HOST, free_port, port_is_free, port_open

FRAMEWORKS = ("django", "flask", "starlette")
#: Each example's entry point (all take --host, --port, --quiet).
ENTRY_POINTS = {
    "django": EXAMPLES_DIR / "django" / "serve.py",
    "flask": EXAMPLES_DIR / "flask" / "app.py",
    "starlette": EXAMPLES_DIR / "starlette" / "app.py",
}
CHILD = Path(__file__).resolve().parent / "child.py"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 8.0


class AppStartError(RuntimeError):
    pass


class ExampleApp:
    def __init__(
        self,
        framework: str,
        service_url: str,
        shared_secret: str,
        *,
        public_service_url: str | None = None,
        domain: str = DOMAIN,
        port: int | None = None,
        workdir: Path | None = None,
        quiet: bool = True,
        log_path: Path | None = None,
    ) -> None:
        if framework not in ENTRY_POINTS:
            raise ValueError(f"unknown framework {framework!r}: one of {', '.join(FRAMEWORKS)}")
        self.framework = framework
        if port is None:
            port = 8000 if port_is_free(8000) else free_port()
        elif not port_is_free(port):
            raise AppStartError(f"port {port} on {HOST} is already in use")
        self.port = port
        self.url = f"http://{HOST}:{port}/"
        self.log_path = log_path
        env = dict(os.environ)
        env.pop("DJANGO_SETTINGS_MODULE", None)  # the Django example sets its own
        env.update(
            {
                ENV_SERVICE_URL: service_url,
                ENV_PUBLIC_SERVICE_URL: public_service_url or service_url,
                ENV_SHARED_SECRET: shared_secret,
                ENV_DOMAIN: domain,
                ENV_PARENT_PID: str(os.getpid()),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if workdir is not None:
            env["DJANGO_DB_PATH"] = str(Path(workdir) / "django-db.sqlite3")
        self._env = env
        self._argv = [
            sys.executable,
            str(CHILD),
            str(ENTRY_POINTS[framework]),
            "--host",
            HOST,
            "--port",
            str(port),
        ] + (["--quiet"] if quiet else [])
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def returncode(self) -> int | None:
        """``None`` while running (or not started), else the exit code."""
        return self._proc.poll() if self._proc is not None else None

    def start(self) -> ExampleApp:
        out = None
        if self.log_path is not None:
            out = self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            self._argv,
            env=self._env,
            cwd=EXAMPLES_DIR,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,  # Ctrl-C goes to the demo only, which stops us in order
        )
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while not self._answers():
                if self._proc.poll() is not None:
                    raise AppStartError(
                        f"the {self.framework} example exited with code {self._proc.returncode}"
                        + self._log_hint()
                    )
                if time.monotonic() > deadline:
                    raise AppStartError(
                        f"the {self.framework} example did not answer on {self.url} within "
                        f"{START_TIMEOUT:.0f} s" + self._log_hint()
                    )
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        if not port_open(self.port):
            return False
        try:
            with urllib.request.urlopen(self.url + "login", timeout=5) as resp:
                resp.read()
            return True
        except urllib.error.HTTPError as exc:
            exc.close()
            return True
        except OSError:
            return False

    def _log_hint(self) -> str:
        if self.log_path is None:
            return " (its output is above)"
        with contextlib.suppress(OSError):
            return "\n--- app output ---\n" + "\n".join(
                self.log_path.read_text(errors="replace").splitlines()[-40:]
            )
        return ""

    def log_text(self) -> str:
        if self.log_path is None:
            return ""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        elif proc is not None:
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ExampleApp:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

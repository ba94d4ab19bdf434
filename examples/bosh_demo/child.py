"""Run an example app's entry point as a child of the demo: ``child.py SCRIPT [ARGS...]``.

Exits (SIGTERM to itself, so the server shuts down its usual way) once the process named by
``BOSH_DEMO_PARENT_PID`` is gone: a demo killed with SIGKILL leaves no web server behind.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            continue
        if os.getppid() != parent:  # reparented: the parent died and its pid was reused
            break
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    os._exit(1)


def main() -> None:
    parent = os.environ.get("BOSH_DEMO_PARENT_PID")
    if parent:
        threading.Thread(
            target=_watch_parent, args=(int(parent),), daemon=True, name="parent-watch"
        ).start()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()

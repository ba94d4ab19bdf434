"""Benchmarks of bosh-middleware against a real Prosody on 127.0.0.1 (not tests: no assertions).

    python -m benchmarks                 # every section (~20 minutes)
    python -m benchmarks latency cpu     # some sections
    python -m benchmarks --quick         # a short smoke run (< 1 minute)

Sections: latency, cpu, concurrency, overlap, passthrough, injection. See docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent / "src"
try:
    import bosh_middleware  # noqa: F401
except ImportError:  # a checkout that is not installed: use its src/
    sys.path.insert(0, str(_SRC))

SECTIONS = ("latency", "cpu", "concurrency", "overlap", "passthrough", "injection")

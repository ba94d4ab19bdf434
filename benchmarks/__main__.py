"""``python -m benchmarks [SECTION ...] [--quick] [--markdown FILE] [--json FILE]``"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import SECTIONS
from ._util import Result, machine_info, md_table

ROOT = Path(__file__).resolve().parent.parent


def _src_state() -> str:
    if not shutil.which("git"):
        return "?"
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
        n = len([d for d in dirty if d.strip()])
        return f"{rev}" + (f" + {n} uncommitted file(s) in src/" if n else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument(
        "sections",
        nargs="*",
        metavar="SECTION",
        help=f"any of {', '.join(SECTIONS)} (default: all)",
    )
    ap.add_argument("--quick", action="store_true", help="short smoke run (< 1 minute)")
    ap.add_argument(
        "--rtt",
        type=float,
        default=5.0,
        help="emulated link RTT in ms for the latency section (0: loopback only)",
    )
    ap.add_argument(
        "--prosody-log",
        default="info",
        choices=["debug", "info", "warn"],
        help="Prosody's log level (the test-suite uses debug; default info)",
    )
    ap.add_argument("--markdown", type=Path, help="also write the report here")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args(argv)
    sections = args.sections or list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")

    info = machine_info()
    info["bosh-middleware src"] = _src_state()
    info["load average at start (1/5/15 min)"] = _load()
    info["mode"] = "quick" if args.quick else "full"
    header = "# bosh-middleware benchmarks\n\n" + md_table(["machine", ""], list(info.items()))
    print(header, "\n", flush=True)
    if sys.flags.dev_mode:
        print(
            "WARNING: Python development mode is on (PYTHONDEVMODE / -X dev): debug allocator"
            " hooks and asyncio debug mode inflate every CPU and latency number several-fold.\n",
            flush=True,
        )
    if os.getloadavg()[0] > 1.0:
        print(
            f"WARNING: load average {_load()}: other work is running on this machine; "
            "numbers will be noisy.\n",
            flush=True,
        )

    results: list[Result] = []
    t_all = time.perf_counter()
    for name in sections:
        mod = importlib.import_module(f"benchmarks.{name}")
        load0 = _load()
        t0 = time.perf_counter()
        result: Result = mod.run(quick=args.quick, rtt_ms=args.rtt, log_level=args.prosody_log)
        result.notes.append(
            f"Section time {time.perf_counter() - t0:.0f} s; load average"
            f" {load0} at start, {_load()} at end."
        )
        results.append(result)
        print(result.markdown(), flush=True)

    summary = []
    for r in results:
        text = "\n".join(r.tables)
        summary.append(
            [r.title, len(re.findall(r"\bPASS\b", text)), len(re.findall(r"\bMISS\b", text))]
        )
    tail = (
        f"## Targets\n\n{md_table(['section', 'PASS', 'MISS'], summary)}\n\n"
        f"Total time {time.perf_counter() - t_all:.0f} s.\n"
    )
    print(tail, flush=True)
    if args.markdown:
        args.markdown.write_text(
            header + "\n\n" + "\n".join(r.markdown() for r in results) + "\n" + tail
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": info, "sections": {r.title: r.data for r in results}},
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

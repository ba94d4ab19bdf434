"""The benchmarks' own plumbing, against the real Prosody: benchmarks/ is not shipped, but its
numbers are published, and it wraps the engine's private pool methods to count what goes on
the wire. A change of those methods' signatures broke a full benchmark run once, well after
the test-suite had passed; this runs that path (and the floor) in a few seconds instead.

In a subprocess: the wire counters patch ``http11`` for the whole process they run in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support.xmpp_servers import XMPPServer

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import asyncio, json, sys
from benchmarks._impls import SyncImpl, async_prebinder
from benchmarks._wire import WireLog
from bosh_middleware import Credentials

url, jid, password = sys.argv[1:4]
creds = Credentials(jid, password)
out = {}
for kind in ("engine", "floor", "floor-io"):
    impl = SyncImpl(kind, url, "SCRAM-SHA-1")
    try:
        impl.terminate(impl.prebind(creds))  # warm: connections made, SCRAM keys cached
        session = impl.prebind_counted(creds)
        out[kind] = [*impl.wire.snapshot(), session.request_count, session.retried]
        impl.terminate(session)
    finally:
        impl.close()

async def run_async():
    p = async_prebinder("engine", url, "SCRAM-SHA-1")
    log = WireLog()
    try:
        await p.terminate(await p.prebind(creds))
        with log.active():
            session = await p.prebind(creds)
        await p.terminate(session)
        return [*log.snapshot(), session.request_count, session.retried]
    finally:
        await p.aclose()

out["async engine"] = asyncio.run(run_async())

# The floor, many times on its one connection: distinct sessions, each bound.
impl = SyncImpl("floor", url, "SCRAM-SHA-1")
try:
    sessions = [impl.prebind(creds) for _ in range(30)]
    out["floor, repeated"] = [len({s.sid for s in sessions}), len(sessions)]
    for s in sessions:
        impl.terminate(s)
finally:
    impl.close()

# The latency section's accounting: Prosody's CPU and the client's PBKDF2 time per prebind.
import hashlib
from benchmarks import latency
from benchmarks._util import cpu_ns
real = hashlib.pbkdf2_hmac
pid = int(sys.argv[4])
series = latency._measure(url, "SCRAM-SHA-1", creds, 3, 1, lambda: cpu_ns(pid))
out["latency"] = {k: [v.server_cpu, v.pbkdf2, v.live, v.n] for k, v in series.items()}
out["pbkdf2 restored"] = hashlib.pbkdf2_hmac is real

# The CPU section's "at once" rows: one wave of 64 prebinds, 4 users at a time, each checked.
from benchmarks import cpu
for name, at_once in (("sync", cpu._at_once_sync), ("async", cpu._at_once_async)):
    args = (url, "SCRAM-SHA-1", [creds] * 4, 1, 4, 1)
    result = at_once(*args) if name == "sync" else asyncio.run(at_once(*args))
    out[f"at once, {name}"] = result
print(json.dumps(out))
"""


def _pid(srv: XMPPServer) -> int:
    proc = srv._proc  # type: ignore[attr-defined]
    assert proc is not None
    return int(proc.pid)


def test_wire_counters_and_floor_run_against_prosody(prosody: XMPPServer) -> None:
    jid, password = prosody.new_user("bench")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, prosody.service_url, jid, password, str(_pid(prosody))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for kind in ("engine", "async engine"):
        requests, round_trips, connects, counted_by_engine, retried = out[kind]
        # what the wrappers saw on the wire is what the engine says it sent
        assert requests == counted_by_engine, (kind, out[kind])
        if not retried:  # (a bind that overtook the restart redoes the prebind)
            # create with client-first (quickstart) | client-final + restart with the bind
            # in it, pipelined: all on the warm pool's one connection
            assert (requests, round_trips) == (3, 2), (kind, out[kind])
            assert connects == 0, (kind, out[kind])
    # the floor, and the engine over the floor's I/O, send no request through the engine's
    # pools: nothing counted, and they bound
    for kind in ("floor", "floor-io"):
        assert out[kind][:3] == [0, 0, 0], (kind, out[kind])
        assert out[kind][3] == 3, (kind, out[kind])
    assert out["floor, repeated"] == [30, 30]
    # every prebind made Prosody work; the baseline derives on every login, the engine (its
    # cache warm) never; and hashlib is itself again afterwards
    for kind, (server_cpu, pbkdf2, live, n) in out["latency"].items():
        assert n == 3 and live == 3, (kind, out["latency"])
        assert all(t > 0 for t in server_cpu), (kind, server_cpu)
        if kind == "baseline":
            assert all(t > 0 for t in pbkdf2), pbkdf2
        else:
            assert pbkdf2 == [0.0, 0.0, 0.0], (kind, pbkdf2)
    assert out["pbkdf2 restored"] is True
    # one wave of 64 at once, in sync threads and async tasks: all live, CPU counted
    for name in ("sync", "async"):
        per, live, checked, _redone, done = out[f"at once, {name}"]
        assert (done, checked, live) == (64, 64, 64), (name, out[f"at once, {name}"])
        assert per > 0, (name, per)  # (counted; no timing is asserted)

"""The implementations compared side by side, built the same way by every section.

* ``baseline``  - benchmarks/baseline.py: the classic sequential prebinder;
* ``engine``    - the shipped engine (``Prebinder`` / ``AsyncPrebinder`` from src/, as it is in
  the working tree when the benchmark runs), on its default transport (the builtin HTTP/1.1
  client, ``http11.py``);
* ``httpx``     - the same engine with ``transport="httpx"`` (what it uses behind a proxy or when
  given an httpx client): the cost of the HTTP client, everything else equal;
* ``floor``     - benchmarks/floor.py: the engine's wire exchange in as few Python operations as
  a working client can do it (the CPU section only);
* ``floor-io``  - the engine over the floor's I/O instead of its transport (the CPU section only).
"""

from __future__ import annotations

import threading

from bosh_middleware import AsyncPrebinder, Credentials, Prebinder, PrebindSession

from ._wire import WireLog
from .baseline import BaselinePrebinder
from .floor import FloorIOPrebinder, FloorPrebinder

IMPLS = ("baseline", "engine", "httpx")
ASYNC_IMPLS = ("engine", "httpx")


class SyncImpl:
    """``prebind(credentials) -> PrebindSession`` for one implementation; ``prebind_counted``
    also records its HTTP traffic in ``self.wire``."""

    def __init__(
        self,
        kind: str,
        url: str,
        mechanism: str | None,
        *,
        floor_class: type[FloorPrebinder] = FloorPrebinder,
    ) -> None:
        self.kind = kind
        self.wire = WireLog()
        mechs = [mechanism] if mechanism else None
        self._baseline: threading.local | None = None
        self._baselines: list[BaselinePrebinder] = []
        self._url, self._mech = url, mechanism or "SCRAM-SHA-1"
        self._floor: FloorPrebinder | None = None
        self.prebinder: Prebinder
        if kind == "floor":
            self._floor = floor_class(url, self._mech)
            self.prebinder = Prebinder(url)  # only to end sessions after the run
        elif kind == "baseline":
            # One per thread, as one per PHP-FPM/WSGI worker: it keeps the exchange's state.
            self._baseline = threading.local()
            self.prebinder = Prebinder(url)  # only to end sessions after the run
        elif kind == "engine":
            self.prebinder = Prebinder(url, mechanisms=mechs)
        elif kind == "floor-io":
            self.prebinder = FloorIOPrebinder(url, self._mech)
        elif kind == "httpx":
            self.prebinder = Prebinder(url, mechanisms=mechs, transport="httpx")
        else:
            raise ValueError(kind)

    def prebind(self, credentials: Credentials) -> PrebindSession:
        if self._floor is not None:
            return self._floor.prebind(credentials.jid, credentials.password or "")
        if self._baseline is not None:
            b = getattr(self._baseline, "p", None)
            if b is None:
                b = self._baseline.p = BaselinePrebinder(self._url, self._mech)
                self._baselines.append(b)
            return b.prebind(credentials.jid, credentials.password or "")
        return self.prebinder.prebind(credentials)

    def prebind_counted(self, credentials: Credentials) -> PrebindSession:
        self.wire.reset()
        with self.wire.active():
            return self.prebind(credentials)

    def terminate(self, session: PrebindSession) -> bool:
        return self.prebinder.terminate(session)

    def close(self) -> None:
        for b in self._baselines:
            b.close()
        if self._floor is not None:
            self._floor.close()
        self.prebinder.close()


def async_prebinder(kind: str, url: str, mechanism: str | None = None) -> AsyncPrebinder:
    mechs = [mechanism] if mechanism else None
    if kind == "engine":
        return AsyncPrebinder(url, mechanisms=mechs)
    if kind == "httpx":
        return AsyncPrebinder(url, mechanisms=mechs, transport="httpx")
    raise ValueError(kind)

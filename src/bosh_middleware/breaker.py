"""A circuit breaker, so that a dead XMPP server costs one timeout, not one per page view."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    """Closed -> (``threshold`` consecutive failures) -> open for ``reset_after`` seconds ->
    half-open: one trial request; its success closes the breaker, its failure reopens it."""

    def __init__(
        self,
        threshold: int = 5,
        reset_after: float = 30.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.reset_after = reset_after
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False
        #: How many half-open trials have started: the one running is ``_trials`` (``abandon``).
        self._trials = 0

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            if self._clock() - self._opened_at < self.reset_after:
                return "open"
            return "half-open"

    def retry_after(self) -> float:
        """Seconds until a trial is allowed (0 when closed or half-open)."""
        with self._lock:
            if self._opened_at is None:
                return 0.0
            return max(0.0, self.reset_after - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        return self.admit() is not None

    def admit(self) -> int | None:
        """``allow``, saying what was let through: None nothing, 0 a request while closed, else
        the number of the half-open trial it is, which only ``abandon`` needs."""
        with self._lock:
            if self._opened_at is None or self.threshold <= 0:
                return 0
            if self._clock() - self._opened_at < self.reset_after or self._trial_running:
                return None
            self._trial_running = True
            self._trials += 1
            return self._trials

    def abandon(self, admitted: int) -> None:
        """A request ``admit`` let through was dropped before it reached the server (a page
        that gave up on a prebind still queued): it proves nothing either way. Were it the
        half-open trial, another may be tried: with this one's verdict never coming, the
        breaker would otherwise stay open for good. (Its number, not just "a trial": a
        request let through earlier, while closed, must not end a later request's trial.)"""
        with self._lock:
            if admitted and admitted == self._trials:
                self._trial_running = False

    def record_success(self) -> bool:
        """Count a success; returns True if this one closed the breaker (the trial passed)."""
        with self._lock:
            was_open = self._opened_at is not None
            self._failures = 0
            self._opened_at = None
            self._trial_running = False
            return was_open

    def record_failure(self) -> bool:
        """Count a failure; returns True if this one opened the breaker."""
        with self._lock:
            self._failures += 1
            was_open = self._opened_at is not None
            if self._trial_running or (self.threshold > 0 and self._failures >= self.threshold):
                self._opened_at = self._clock()
                self._trial_running = False
                return not was_open
            return False

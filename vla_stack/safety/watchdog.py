"""Input freshness: a controller must hold position when what it acts on is old."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from vla_stack.errors import VlaStackError


class Watchdog:
    """Tracks the time stamp (seconds, one clock for all inputs) of the newest sample of each named input."""

    def __init__(self, inputs: Iterable[str], max_age: float = 0.2):
        if max_age <= 0:
            raise VlaStackError(f"max_input_age must be positive, got {max_age}")
        self.max_age = max_age
        self._stamps: dict[str, float | None] = {name: None for name in inputs}
        self._lock = threading.Lock()

    def feed(self, name: str, stamp: float) -> None:
        with self._lock:
            if name not in self._stamps:
                raise KeyError(f"watchdog does not watch '{name}'")
            self._stamps[name] = stamp

    def stale(self, now: float) -> list[str]:
        """One reason per input that is missing or older than max_age; empty when all are fresh."""
        with self._lock:
            items = list(self._stamps.items())
        reasons = []
        for name, stamp in items:
            if stamp is None:
                reasons.append(f"no {name} received yet")
            elif now - stamp > self.max_age:
                reasons.append(f"{name} is {now - stamp:.3f} s old (limit {self.max_age:.3f} s)")
        return reasons

    def expires(self) -> float | None:
        """When the first input goes stale (None before all have arrived): a controller can wake exactly then."""
        with self._lock:
            stamps = list(self._stamps.values())
        return None if None in stamps else min(stamps) + self.max_age

    def reset(self) -> None:
        with self._lock:
            self._stamps = dict.fromkeys(self._stamps)

"""The engine-side staleness gate: an engine more than K versions behind the learner starts nothing.

The queue's admission (asyncrl/queue/admission.py) already bounds staleness through tickets
computed from the engine's own version; this gate is its counterpart on the engine, using the
learner's newest version as the broadcaster reports it. An engine that fell behind (a slow or
failed weight fetch) stops starting new groups, which would only be dropped as stale, and waits
until it has caught up. Its lag and the time it spent waiting are metrics. Pure: a clock is
passed in, no sockets.
"""

from __future__ import annotations

import time
from typing import Callable


class StalenessGate:
    def __init__(self, max_lag: int, clock: Callable[[], float] = time.monotonic):
        if max_lag < 0:
            raise ValueError(f"max_lag={max_lag}: must be >= 0 (it is max_staleness K)")
        self.max_lag = max_lag
        self.clock = clock
        self.lag = 0
        """Learner version minus engine version at the last check."""
        self.wait_s = 0.0
        """Total seconds the gate has kept the engine from starting groups."""
        self.waits = 0
        """How many times the gate closed."""
        self._closed_at: float | None = None

    def admits(self, engine_version: int, learner_version: int) -> bool:
        """May the engine start new groups now? Accounts waiting time while it may not."""
        self.lag = max(0, learner_version - engine_version)
        now = self.clock()
        if self.lag > self.max_lag:
            if self._closed_at is None:
                self._closed_at = now
                self.waits += 1
            return False
        if self._closed_at is not None:
            self.wait_s += now - self._closed_at
            self._closed_at = None
        return True

    def metrics(self) -> dict[str, float]:
        waiting = self.clock() - self._closed_at if self._closed_at is not None else 0.0
        return {"weights_lag": float(self.lag), "gate_wait_s": self.wait_s + waiting, "gate_waits": float(self.waits)}

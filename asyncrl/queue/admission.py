"""Staleness admission: how many new groups a rollout engine may start (architecture contract 2).

Pure arithmetic behind a tiny class, no sockets and no clocks. A group started with weights of
version w is usable when trained by a step holding version v <= w + K. Steps consume B groups
each, in order, so the first (K + w + 1)·B usable groups are all trained by step K + w. An engine
at version w may therefore start a group only while

    usable + running < (K + w + 1) · B

where `usable` counts groups accepted and not dropped (trained or waiting) and `running` counts
tickets granted and not yet settled. This is AReaL's capacity formula with the engine's own
version in place of the learner's, which makes it hold for an engine that lags behind. Groups
that still arrive too stale (many engines racing) are dropped at consumption; see `is_stale`.
"""

from __future__ import annotations

import threading


def is_stale(learner_version: int, behaviour_version: int, max_staleness: int) -> bool:
    """A group generated at behaviour_version may not be trained by the step holding learner_version."""
    return learner_version - behaviour_version > max_staleness


class Admission:
    """Counts usable groups and outstanding tickets; thread-safe."""

    def __init__(self, max_staleness: int, groups_per_step: int):
        if max_staleness < 0 or groups_per_step < 1:
            raise ValueError(f"need max_staleness >= 0 and groups_per_step >= 1, got {max_staleness}, {groups_per_step}")
        self.max_staleness = max_staleness
        self.groups_per_step = groups_per_step
        self.usable = 0
        self.running = 0
        self._lock = threading.Lock()

    def capacity(self, engine_version: int) -> int:
        limit = (self.max_staleness + engine_version + 1) * self.groups_per_step
        return max(0, limit - self.usable - self.running)

    def grant(self, engine_version: int, want: int) -> int:
        """Tickets for up to `want` new groups started with weights of engine_version."""
        with self._lock:
            granted = min(max(0, want), self.capacity(engine_version))
            self.running += granted
            return granted

    def settle(self, accepted: bool, ticketed: bool = True) -> None:
        """A ticketed group arrived (accepted) or was abandoned or rejected (not accepted)."""
        with self._lock:
            if ticketed:
                self.running = max(0, self.running - 1)
            if accepted:
                self.usable += 1

    def release(self, count: int) -> None:
        """Return tickets that will not be used (an engine stopping, or a lost engine)."""
        with self._lock:
            self.running = max(0, self.running - max(0, count))

    def unusable(self, count: int = 1) -> None:
        """Accepted groups dropped before training (stale): they free their slots."""
        with self._lock:
            self.usable = max(0, self.usable - count)

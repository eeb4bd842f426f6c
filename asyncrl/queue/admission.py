"""Staleness admission: how many new groups a rollout engine may start (architecture contract 2).

Pure arithmetic behind a tiny class, no sockets and no clocks (callers pass `now`). A group
started with weights of version w is usable when trained by a step holding version v <= w + K.
Steps consume B groups each, in order, so the first (K + w + 1)·B usable groups are all trained by
step K + w. An engine at version w may therefore start a group only while

    usable + running < (K + w + 1) · B

where `usable` counts groups accepted and not dropped (trained or waiting) and `running` counts
tickets granted and not yet settled. This is AReaL's capacity formula with the engine's own
version in place of the learner's, which makes it hold for an engine that lags behind. Groups
that still arrive too stale (many engines racing) are dropped at consumption; see `is_stale`.

Tickets are held per engine. An engine that vanishes (killed, partitioned) would otherwise hold
its tickets for ever and starve admission, so every holder has a deadline that each grant, put
and release pushes forward; `expire(now)` returns the tickets of holders past their deadline.
A ticketed group that arrives after its engine's tickets expired is still accepted, as if it had
no ticket (the check at consumption still guards staleness); it never frees someone else's ticket.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


def is_stale(learner_version: int, behaviour_version: int, max_staleness: int) -> bool:
    """A group generated at behaviour_version may not be trained by the step holding learner_version."""
    return learner_version - behaviour_version > max_staleness


@dataclass
class _Holder:
    tickets: int
    deadline: float


class Admission:
    """Counts usable groups and outstanding tickets, per engine; thread-safe."""

    def __init__(self, max_staleness: int, groups_per_step: int, ticket_lease_s: float = float("inf")):
        if max_staleness < 0 or groups_per_step < 1 or ticket_lease_s <= 0:
            raise ValueError(
                "need max_staleness >= 0, groups_per_step >= 1 and ticket_lease_s > 0, "
                f"got {max_staleness}, {groups_per_step}, {ticket_lease_s}"
            )
        self.max_staleness = max_staleness
        self.groups_per_step = groups_per_step
        self.ticket_lease_s = ticket_lease_s
        self.usable = 0
        self.running = 0
        self.expired = 0
        """Tickets returned because their engine went silent past ticket_lease_s."""
        self._holders: dict[str, _Holder] = {}
        self._lock = threading.Lock()

    def capacity(self, engine_version: int) -> int:
        limit = (self.max_staleness + engine_version + 1) * self.groups_per_step
        return max(0, limit - self.usable - self.running)

    def grant(self, engine_version: int, want: int, engine: str = "", now: float = 0.0) -> int:
        """Tickets for up to `want` new groups started by `engine` with weights of engine_version."""
        with self._lock:
            granted = min(max(0, want), self.capacity(engine_version))
            self.running += granted
            holder = self._holders.setdefault(engine, _Holder(0, 0.0))
            holder.tickets += granted
            holder.deadline = now + self.ticket_lease_s
            return granted

    def settle(self, accepted: bool, ticketed: bool = True, engine: str = "", now: float = 0.0, count: int = 1) -> None:
        """`count` groups from `engine` arrived (accepted) or were rejected (not accepted); each uses one
        ticket if the engine still holds one."""
        with self._lock:
            holder = self._holders.get(engine)
            if ticketed and holder is not None and holder.tickets > 0:
                used = min(count, holder.tickets)
                holder.tickets -= used
                holder.deadline = now + self.ticket_lease_s
                self.running -= used
            if accepted:
                self.usable += count

    def release(self, count: int, engine: str = "", now: float = 0.0) -> int:
        """Return up to `count` of `engine`'s tickets that will not be used; returns how many were held."""
        with self._lock:
            holder = self._holders.get(engine)
            if holder is None:
                return 0
            freed = min(max(0, count), holder.tickets)
            holder.tickets -= freed
            holder.deadline = now + self.ticket_lease_s
            self.running -= freed
            return freed

    def expire(self, now: float) -> int:
        """Return the tickets of every engine silent past its deadline; returns how many."""
        with self._lock:
            freed = 0
            for engine in [e for e, h in self._holders.items() if h.deadline <= now]:
                freed += self._holders.pop(engine).tickets
            self.running -= freed
            self.expired += freed
            return freed

    def consumed(self, count: int) -> None:
        """Count `count` groups as trained already: a queue started under a learner past version 0."""
        with self._lock:
            self.usable += max(0, count)

    def unusable(self, count: int = 1) -> None:
        """Accepted groups dropped before training (stale, shutdown): they free their slots."""
        with self._lock:
            self.usable = max(0, self.usable - count)

    def held(self) -> dict[str, int]:
        """Outstanding tickets per engine."""
        with self._lock:
            return {e: h.tickets for e, h in self._holders.items() if h.tickets}

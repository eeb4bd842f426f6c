"""What the transfer queue keeps: its settings, its counters, and the records of held groups,
leases, parked gets and step shares. Plain data, no sockets and no logic beyond bookkeeping;
`server.py` owns the decisions. Must never import torch or Redis.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Protocol

from asyncrl.queue.codec import pack


class QueueObserver(Protocol):
    """Sees the queue's decisions; must not block (the replay mirror buffers and returns). An entry's
    arrays may be views on a producer's arena: anything kept past the call takes `stable_frames()`.
    `tick` is called from the queue's loop about every 50 ms (an observer batching its sends sends then)."""

    def on_accept(self, entry: "Entry") -> None: ...
    def on_drop(self, entry: "Entry", reason: str) -> None: ...
    def on_reject(self, code: str, detail: str) -> None: ...
    def tick(self, now: float) -> None: ...


@dataclass
class Entry:
    group_id: str
    header: dict
    arrays: list
    """The 4 array frames."""
    nbytes: int
    behaviour_version: int
    header_frame: Optional[bytes] = None
    region: Optional[tuple[str, int, list]] = None
    """(arena, offset, sizes) when the arrays are views on a producer's arena (see shm.py), else None."""
    newest_version: Optional[int] = None
    """The newest token's version (the queue's checks find it; observers record it)."""

    @property
    def frames(self) -> list:
        """The group's 5 frames; the header frame is packed on first use (a packed put has none)."""
        if self.header_frame is None:
            self.header_frame = pack(self.header)
        return [self.header_frame, *self.arrays]

    def stable_frames(self) -> list:
        """The frames, copied out of the arena if they live in one: its region is written again once
        the group settles, so whatever may outlive that (a send, an observer's buffer) gets a copy."""
        frames = self.frames
        return frames if self.region is None else [frames[0], *(bytes(a) for a in self.arrays)]


@dataclass
class Parked:
    """A get that found no full batch and waits, up to its deadline, for puts to fill one."""

    identity: bytes
    header: dict
    deadline: float


@dataclass
class Lease:
    consumer: str
    group_ids: list[str]
    deadline: float
    version: int
    step: Optional[tuple[int, int]] = None
    """(version, rank) for a rank's share of a step batch; None for a plain get."""
    token: Optional[str] = None
    """The get's token: a resend of that get (its reply was lost) gets this lease again."""


@dataclass
class Step:
    """One step's batch, cut into `world` whole-group shares, one per learner rank."""

    world: int
    groups: int
    shares: list[list[str]]
    leases: list[Optional[int]]
    done: list[bool]
    """Acknowledged, or handed back to the ready set."""


@dataclass
class QueueSettings:
    max_staleness: int
    groups_per_step: int
    capacity_groups: int = 1024
    capacity_bytes: int = 256 << 20
    max_message_bytes: int = 64 << 20
    lease_s: float = 120.0
    vocab_size: Optional[int] = None
    ticket_lease_s: float = 300.0
    """An engine silent (no ticket, put or release) this long loses its outstanding tickets."""
    seen_capacity: int = 1 << 18
    """Most ids of settled groups remembered for duplicate detection (about 100 bytes each)."""
    resend_window_s: float = 3600.0
    """How long the id of a settled group is remembered; resends later than this are not detected."""
    max_batch_groups: int = 1024
    """Most groups in one put message."""
    shm_dir: Optional[str] = None
    """A shared-memory file system (/dev/shm) where same-host producers keep large groups' arrays
    (shm.py); None: every group's arrays travel in the messages."""


@dataclass
class QueueStats:
    accepted: int = 0
    duplicates: int = 0
    delivered: int = 0
    acknowledged: int = 0
    already_trained: int = 0
    """Groups a producer resent to a restarted queue that the learner reported trained: settled, not delivered."""
    redelivered: int = 0
    waits: int = 0
    shm_in: int = 0
    """Groups accepted whose arrays a producer wrote into its arena (not sent in the message)."""
    shm_out: int = 0
    """Groups delivered as an arena region (the learner read the arrays itself)."""
    dropped: Counter = field(default_factory=Counter)
    accepted_by_engine: Counter = field(default_factory=Counter)
    """Accepted groups per producer name: which engines are feeding the learner."""
    rejected: Counter = field(default_factory=Counter)
    staleness: Counter = field(default_factory=Counter)
    """Staleness of acknowledged (trained) groups: learner version at delivery minus behaviour version."""


class SettledIds:
    """Ids of settled groups and how each settled ("trained" or "dropped:<reason>"), remembered for
    the resend window so that resends stay idempotent and producers can ask what became of their
    groups: at most `capacity` ids, none older than `window_s` seconds (contract 7)."""

    def __init__(self, capacity: int, window_s: float):
        self.capacity = capacity
        self.window_s = window_s
        self._ids: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def add(self, gid: str, now: float, outcome: str) -> None:
        self.add_many((gid,), now, outcome)

    def add_many(self, gids, now: float, outcome: str) -> None:
        ids = self._ids
        entry = (now, outcome)
        for gid in gids:
            ids[gid] = entry
        while ids and (len(ids) > self.capacity or next(iter(ids.values()))[0] < now - self.window_s):
            ids.popitem(last=False)

    def outcome(self, gid: str) -> Optional[str]:
        found = self._ids.get(gid)
        return None if found is None else found[1]

    def __contains__(self, gid: str) -> bool:
        return gid in self._ids

    def __len__(self) -> int:
        return len(self._ids)

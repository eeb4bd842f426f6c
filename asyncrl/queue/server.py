"""The transfer queue server: one ROUTER socket between rollout producers and learner consumers.

Owns every accepted group from the moment it is acknowledged to its producer until the learner
acknowledges the step that trained on it (contract 4), the admission tickets (contract 2) and the
memory bound (contract 7). Groups are kept as the frames they arrived in and sent on unchanged.
Every request is validated; a bad one gets an error reply and a counter, and the loop goes on.
The wire protocol is specified in docs/protocol.md; change the two together.

Bookkeeping that makes "nothing vanishes, nothing is trained twice" checkable: every accepted
group is, at any moment, exactly one of ready (`depth`), held for a consumer (`leased`),
acknowledged, or dropped with a reason, so `accepted == acknowledged + dropped + depth + leased`
always holds and `snapshot()["balanced"]` says so. Ids of settled groups are remembered in a
bounded window (`seen_capacity` ids, `resend_window_s` seconds) so producer resends stay
idempotent without an id set that grows for ever.

Must never import torch or Redis: observers handed to it (the replay mirror) see what it accepts
and drops.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import zmq

from asyncrl.queue.admission import Admission, is_stale
from asyncrl.queue.codec import GROUP_FRAMES, PROTOCOL_VERSION, ProtocolError, inspect_groups, pack, unpack_header

log = logging.getLogger("asyncrl.queue")

_PER_GROUP = 1 + GROUP_FRAMES


class QueueObserver(Protocol):
    """Sees the queue's decisions; must not block (the replay mirror buffers and returns)."""

    def on_accept(self, group_id: str, frames: list) -> None: ...
    def on_drop(self, group_id: str, reason: str, frames: list) -> None: ...
    def on_reject(self, code: str, detail: str) -> None: ...


@dataclass
class _Entry:
    group_id: str
    frames: list
    nbytes: int
    behaviour_version: int


@dataclass
class _Lease:
    consumer: str
    group_ids: list[str]
    deadline: float
    version: int
    step: Optional[tuple[int, int]] = None
    """(version, rank) for a rank's share of a step batch; None for a plain get."""


@dataclass
class _Step:
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


@dataclass
class QueueStats:
    accepted: int = 0
    duplicates: int = 0
    delivered: int = 0
    acknowledged: int = 0
    redelivered: int = 0
    waits: int = 0
    dropped: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    staleness: Counter = field(default_factory=Counter)
    """Staleness of acknowledged (trained) groups: learner version at delivery minus behaviour version."""


class QueueServer:
    def __init__(self, address: str, settings: QueueSettings, context: Optional[zmq.Context] = None):
        self.settings = settings
        self.admission = Admission(settings.max_staleness, settings.groups_per_step, settings.ticket_lease_s)
        self.stats = QueueStats()
        self.observers: list[QueueObserver] = []
        self.learner_version = 0
        self.closed = False
        self.last_request = time.monotonic()
        self._entries: dict[str, _Entry] = {}
        self._ready: list[tuple[int, int, str]] = []  # (behaviour version, arrival, id): oldest first
        self._leases: dict[int, _Lease] = {}
        self._steps: dict[int, _Step] = {}
        self._settled: OrderedDict[str, float] = OrderedDict()
        self._bytes = 0
        self._arrival = itertools.count()
        self._lease_ids = itertools.count(1)
        self._ctx = context or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # Frames up to twice the limit still get an "oversized" error reply; beyond that the socket
        # itself drops the connection, so a hostile peer cannot make us buffer without bound.
        self.socket.setsockopt(zmq.MAXMSGSIZE, 2 * settings.max_message_bytes + (1 << 16))
        self.socket.bind(address)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._handlers: dict[str, Callable] = {
            "hello": self._hello,
            "ticket": self._ticket,
            "release": self._release,
            "put": self._put,
            "get": self._get,
            "ack": self._ack,
            "version": self._version,
            "close": self._close,
            "stats": self._stats,
        }

    # -- loop -------------------------------------------------------------------------------

    def serve(self, should_stop: Callable[[], bool] = lambda: False, poll_ms: int = 100) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        next_expiry = 0.0
        while not should_stop():
            if poller.poll(poll_ms):
                # Drain what is waiting before polling again: one poll per message costs more than the message.
                for _ in range(256):
                    if not self.handle_one(block=False):
                        break
            now = time.monotonic()
            if now >= next_expiry:
                self.expire_leases(now)
                next_expiry = now + 0.05

    def handle_one(self, block: bool = True) -> bool:
        """Answer one request; False when `block` is off and none is waiting."""
        try:
            frames = self.socket.recv_multipart(0 if block else zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        identity = frames[0].bytes
        self.last_request = time.monotonic()
        reply, payload = self._dispatch(frames[1:])
        self.socket.send_multipart([identity, pack(reply), *payload], copy=False)
        return True

    def _dispatch(self, body: list) -> tuple[dict, list]:
        req = None
        try:
            if not body:
                raise ProtocolError("bad_frames", "empty message: expected a msgpack header frame")
            size = sum(len(f) for f in body)
            if size > self.settings.max_message_bytes:
                raise ProtocolError(
                    "oversized",
                    f"message of {size} bytes exceeds queue.max_message_bytes={self.settings.max_message_bytes}; "
                    "send fewer or smaller groups per put",
                )
            header = unpack_header(body[0].bytes)
            req = header.get("req")
            if header.get("proto") != PROTOCOL_VERSION:
                raise ProtocolError(
                    "bad_protocol",
                    f"protocol version {header.get('proto')!r} is not supported; this server speaks {PROTOCOL_VERSION}",
                )
            op = header.get("op")
            handler = self._handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                raise ProtocolError("bad_op", f"unknown op {op!r}; known: {sorted(self._handlers)}")
            reply, payload = handler(header, body[1:])
        except ProtocolError as exc:
            self.stats.rejected[exc.code] += 1
            for obs in self.observers:
                obs.on_reject(exc.code, str(exc))
            log.warning("rejected request: %s: %s", exc.code, exc)
            reply, payload = {"ok": False, "code": exc.code, "error": str(exc)}, []
            if exc.code == "bad_protocol":
                reply["proto"] = PROTOCOL_VERSION
        reply["req"] = req if isinstance(req, int) and not isinstance(req, bool) else None
        return reply, payload

    @staticmethod
    def _int(header: dict, key: str, default: Optional[int] = None) -> int:
        value = header.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ProtocolError("bad_schema", f"field {key!r} must be a non-negative integer, got {value!r}")
        return value

    @staticmethod
    def _engine(header: dict) -> str:
        engine = header.get("engine", "")
        if not isinstance(engine, str) or len(engine) > 128:
            raise ProtocolError("bad_schema", f"field 'engine' must be a string of at most 128 characters, got {engine!r:.80}")
        return engine

    # -- producer side ----------------------------------------------------------------------

    def _hello(self, header: dict, frames: list) -> tuple[dict, list]:
        s = self.settings
        return {
            "ok": True,
            "proto": PROTOCOL_VERSION,
            "max_staleness": s.max_staleness,
            "groups_per_step": s.groups_per_step,
            "learner_version": self.learner_version,
            "max_message_bytes": s.max_message_bytes,
            "max_batch_groups": s.max_batch_groups,
            "vocab_size": s.vocab_size,
        }, []

    def _ticket(self, header: dict, frames: list) -> tuple[dict, list]:
        version = self._int(header, "version")
        want = self._int(header, "want")
        engine = self._engine(header)
        if version > self.learner_version:
            raise ProtocolError("future_version", f"engine version {version} is newer than the learner's {self.learner_version}")
        granted = 0 if self.closed else self.admission.grant(version, want, engine, time.monotonic())
        return {"ok": True, "granted": granted, "learner_version": self.learner_version, "closed": self.closed}, []

    def _release(self, header: dict, frames: list) -> tuple[dict, list]:
        released = self.admission.release(self._int(header, "count"), self._engine(header), time.monotonic())
        return {"ok": True, "released": released}, []

    def _full(self, nbytes: int) -> bool:
        s = self.settings
        return len(self._entries) >= s.capacity_groups or self._bytes + nbytes > s.capacity_bytes

    def _known(self, gid: str) -> bool:
        return gid in self._entries or gid in self._settled

    def _put(self, header: dict, frames: list) -> tuple[dict, list]:
        ticketed = header.get("ticketed", True)
        if not isinstance(ticketed, bool):
            raise ProtocolError("bad_schema", f"field 'ticketed' must be a boolean, got {ticketed!r}")
        engine = self._engine(header)
        batched = "groups" in header
        count = self._int(header, "groups") if batched else 1
        if not 1 <= count <= self.settings.max_batch_groups:
            raise ProtocolError("bad_schema", f"field 'groups' must be 1..{self.settings.max_batch_groups}, got {count}")
        if len(frames) != count * _PER_GROUP:
            raise ProtocolError(
                "bad_frames", f"put of {count} group(s) needs {count * _PER_GROUP} frames after the header, got {len(frames)}"
            )
        now = time.monotonic()
        try:
            checked = inspect_groups(frames, count, self.settings.vocab_size, self.learner_version)
        except ProtocolError:
            # The whole message is refused; the producer will not resend it, so its tickets are spent.
            for _ in range(count):
                self.admission.settle(accepted=False, ticketed=ticketed, engine=engine, now=now)
            raise
        groups = [(gid, version, frames[i * _PER_GROUP : (i + 1) * _PER_GROUP]) for i, (gid, version) in enumerate(checked)]
        statuses = [self._accept(gid, version, part, ticketed, engine, now) for gid, version, part in groups]
        if batched:
            return {"ok": True, "statuses": statuses, "accepted": statuses.count("accepted")}, []
        return {"ok": True, "status": statuses[0]}, []

    def _accept(self, gid: str, behaviour_version: int, frames: list, ticketed: bool, engine: str, now: float) -> str:
        if self._known(gid):
            self.stats.duplicates += 1
            return "duplicate"
        nbytes = sum(len(f) for f in frames)
        if self._full(nbytes):
            self.stats.waits += 1
            return "wait"
        self.admission.settle(accepted=True, ticketed=ticketed, engine=engine, now=now)
        entry = _Entry(gid, list(frames), nbytes, behaviour_version)
        self._entries[gid] = entry
        self._bytes += nbytes
        heapq.heappush(self._ready, (entry.behaviour_version, next(self._arrival), gid))
        self.stats.accepted += 1
        for obs in self.observers:
            obs.on_accept(gid, entry.frames)
        return "accepted"

    # -- consumer side ----------------------------------------------------------------------

    def _version(self, header: dict, frames: list) -> tuple[dict, list]:
        self.learner_version = max(self.learner_version, self._int(header, "version"))
        return {"ok": True, "learner_version": self.learner_version}, []

    def _settle(self, gid: str, now: float) -> _Entry:
        """Forget a group's frames and remember its id for the resend window."""
        entry = self._entries.pop(gid)
        self._bytes -= entry.nbytes
        settled = self._settled
        settled[gid] = now
        while settled and (len(settled) > self.settings.seen_capacity or next(iter(settled.values())) < now - self.settings.resend_window_s):
            settled.popitem(last=False)
        return entry

    def _drop(self, gid: str, reason: str) -> None:
        entry = self._settle(gid, time.monotonic())
        self.stats.dropped[reason] += 1
        self.admission.unusable()
        for obs in self.observers:
            obs.on_drop(gid, reason, entry.frames)

    def _drop_stale(self, version: int) -> None:
        while self._ready and is_stale(version, self._ready[0][0], self.settings.max_staleness):
            _, _, gid = heapq.heappop(self._ready)
            self._drop(gid, "stale")

    def _lease(self, consumer: str, ids: list[str], version: int, step=None) -> tuple[int, list]:
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(consumer, ids, time.monotonic() + self.settings.lease_s, version, step)
        payload = []
        for gid in ids:
            payload.extend(self._entries[gid].frames)
        self.stats.delivered += len(ids)
        return lease_id, payload

    def _get(self, header: dict, frames: list) -> tuple[dict, list]:
        version = self._int(header, "version")
        want = self._int(header, "groups")
        if want < 1:
            raise ProtocolError("bad_schema", "field 'groups' must be at least 1")
        consumer = str(header.get("consumer", ""))[:128]
        self.learner_version = max(self.learner_version, version)
        self._retire_steps()
        if "rank" in header or "world" in header:
            return self._get_share(version, want, self._int(header, "rank", 0), self._int(header, "world", 1), consumer)
        self._drop_stale(version)
        if len(self._ready) < want:
            return {"ok": True, "groups": 0, "ready": len(self._ready), "closed": self.closed}, []
        ids = [heapq.heappop(self._ready)[2] for _ in range(want)]
        lease_id, payload = self._lease(consumer, ids, version)
        return {"ok": True, "groups": want, "lease": lease_id}, payload

    def _get_share(self, version: int, want: int, rank: int, world: int, consumer: str) -> tuple[dict, list]:
        """Rank `rank` of `world` learner ranks takes its share of the batch for the step holding `version`."""
        if not 0 <= rank < world:
            raise ProtocolError("bad_schema", f"rank {rank} is outside world {world}; ranks are 0..world-1")
        if want % world:
            raise ProtocolError("bad_schema", f"a step of {want} groups cannot be split evenly over {world} ranks")
        step = self._steps.get(version)
        if step is None:
            self._drop_stale(version)
            if len(self._ready) < want:
                return {"ok": True, "groups": 0, "ready": len(self._ready), "closed": self.closed}, []
            ids = [heapq.heappop(self._ready)[2] for _ in range(want)]
            per = want // world
            step = _Step(world, want, [ids[r * per : (r + 1) * per] for r in range(world)], [None] * world, [False] * world)
            self._steps[version] = step
        elif (step.world, step.groups) != (world, want):
            raise ProtocolError(
                "bad_schema",
                f"the batch for version {version} was cut for world={step.world}, groups={step.groups}; "
                f"got world={world}, groups={want}: every rank must ask with the same world and groups",
            )
        if step.done[rank]:
            return {"ok": True, "groups": 0, "done": True, "closed": self.closed}, []
        if step.leases[rank] is not None:
            # The rank asks again (a resend, or a restarted rank): same share, fresh lease.
            old = self._leases.pop(step.leases[rank])
            self.stats.redelivered += len(old.group_ids)
        lease_id, payload = self._lease(consumer, step.shares[rank], version, (version, rank))
        step.leases[rank] = lease_id
        return {"ok": True, "groups": len(step.shares[rank]), "lease": lease_id, "rank": rank, "world": world}, payload

    def _ack(self, header: dict, frames: list) -> tuple[dict, list]:
        lease_id = self._int(header, "lease")
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return {"ok": True, "acknowledged": 0, "unknown_lease": True}, []
        now = time.monotonic()
        for gid in lease.group_ids:
            entry = self._settle(gid, now)
            self.stats.staleness[lease.version - entry.behaviour_version] += 1
        self.stats.acknowledged += len(lease.group_ids)
        if lease.step is not None:
            self._finish_share(lease.step)
        return {"ok": True, "acknowledged": len(lease.group_ids)}, []

    def _finish_share(self, key: tuple[int, int]) -> None:
        version, rank = key
        step = self._steps[version]
        step.done[rank] = True
        step.leases[rank] = None
        if all(step.done):
            del self._steps[version]

    def _requeue(self, ids: list[str]) -> None:
        for gid in ids:
            heapq.heappush(self._ready, (self._entries[gid].behaviour_version, next(self._arrival), gid))
        self.stats.redelivered += len(ids)

    def _retire_steps(self) -> None:
        """Shares of past steps that no rank holds go back to the ready set (a rank died or skipped)."""
        for version in [v for v in self._steps if v < self.learner_version]:
            step = self._steps[version]
            for rank in range(step.world):
                if not step.done[rank] and step.leases[rank] is None:
                    self._requeue(step.shares[rank])
                    step.done[rank] = True
            if all(step.done):
                del self._steps[version]

    def expire_leases(self, now: Optional[float] = None) -> int:
        """Groups held past their lease go back to the ready set; silent engines lose their tickets."""
        now = time.monotonic() if now is None else now
        self.admission.expire(now)
        count = 0
        for lid in [lid for lid, lease in self._leases.items() if lease.deadline <= now]:
            lease = self._leases.pop(lid)
            count += len(lease.group_ids)
            if lease.step is None:
                self._requeue(lease.group_ids)
            else:
                # The share stays cut for its rank, which may ask again; once the learner moves past
                # that step, _retire_steps hands it back to the ready set.
                self._steps[lease.step[0]].leases[lease.step[1]] = None
        self._retire_steps()
        return count

    def _close(self, header: dict, frames: list) -> tuple[dict, list]:
        self.closed = True
        return {"ok": True}, []

    def _stats(self, header: dict, frames: list) -> tuple[dict, list]:
        return {"ok": True, "stats": self.snapshot()}, []

    def snapshot(self) -> dict:
        s = self.stats
        depth = len(self._ready)
        leased = len(self._entries) - depth
        dropped = sum(s.dropped.values())
        return {
            "depth": depth,
            "leased": leased,
            "bytes_held": self._bytes,
            "capacity_groups": self.settings.capacity_groups,
            "capacity_bytes": self.settings.capacity_bytes,
            "accepted": s.accepted,
            "duplicates": s.duplicates,
            "delivered": s.delivered,
            "acknowledged": s.acknowledged,
            "redelivered": s.redelivered,
            "waits": s.waits,
            "dropped": dict(s.dropped),
            "rejected": dict(s.rejected),
            "staleness": {str(k): v for k, v in sorted(s.staleness.items())},
            "balanced": s.accepted == s.acknowledged + dropped + depth + leased,
            "learner_version": self.learner_version,
            "tickets_running": self.admission.running,
            "tickets_expired": self.admission.expired,
            "tickets_held": self.admission.held(),
            "usable": self.admission.usable,
            "ids_remembered": len(self._settled),
            "closed": self.closed,
        }

    def drain(self, reason: str = "shutdown") -> int:
        """Drop every group still held, with `reason`, so observers and counters account for them."""
        held = list(self._entries)
        for gid in held:
            self._drop(gid, reason)
        self._ready.clear()
        self._leases.clear()
        self._steps.clear()
        return len(held)

    def close(self) -> None:
        self.drain("shutdown")
        self.socket.close(0)

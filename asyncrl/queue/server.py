"""The transfer queue server: one ROUTER socket between rollout producers and learner consumers.

Owns every accepted group from the moment it is acknowledged to its producer until the learner
acknowledges the step that trained on it (contract 4), the admission tickets (contract 2) and the
memory bound (contract 7). Groups are kept as the frames they arrived in and sent on unchanged.
Every request is validated; a bad one gets an error reply and a counter, and the loop goes on.
Must never import torch or Redis: observers handed to it (the replay mirror) see what it accepts
and drops.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import zmq

from asyncrl.queue.admission import Admission, is_stale
from asyncrl.queue.codec import PROTOCOL_VERSION, ProtocolError, decode_group, pack, unpack_header

log = logging.getLogger("asyncrl.queue")


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
    lease: Optional[int] = None


@dataclass
class _Lease:
    consumer: bytes
    group_ids: list[str]
    deadline: float


@dataclass
class QueueSettings:
    max_staleness: int
    groups_per_step: int
    capacity_groups: int = 1024
    capacity_bytes: int = 256 << 20
    max_message_bytes: int = 64 << 20
    lease_s: float = 120.0
    vocab_size: Optional[int] = None


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


class QueueServer:
    def __init__(self, address: str, settings: QueueSettings, context: Optional[zmq.Context] = None):
        self.settings = settings
        self.admission = Admission(settings.max_staleness, settings.groups_per_step)
        self.stats = QueueStats()
        self.observers: list[QueueObserver] = []
        self.learner_version = 0
        self.closed = False
        self._entries: dict[str, _Entry] = {}
        self._ready: list[tuple[int, int, str]] = []  # (behaviour version, arrival, id): oldest first
        self._leases: dict[int, _Lease] = {}
        self._seen: set[str] = set()
        self._bytes = 0
        self._arrival = itertools.count()
        self._lease_ids = itertools.count(1)
        self._ctx = context or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, settings.max_message_bytes + (1 << 16))
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
        while not should_stop():
            if poller.poll(poll_ms):
                self.handle_one()
            self.expire_leases()

    def handle_one(self) -> None:
        frames = self.socket.recv_multipart(copy=False)
        identity = frames[0].bytes
        body = frames[1:]
        reply, payload = self._dispatch(body)
        self.socket.send_multipart([identity, pack(reply), *payload], copy=False)

    def _dispatch(self, body: list) -> tuple[dict, list]:
        req = None
        try:
            if not body:
                raise ProtocolError("bad_frames", "empty message: expected a msgpack header frame")
            size = sum(len(f) for f in body)
            if size > self.settings.max_message_bytes:
                raise ProtocolError(
                    "oversized", f"message of {size} bytes exceeds queue.max_message_bytes={self.settings.max_message_bytes}"
                )
            header = unpack_header(body[0].bytes)
            req = header.get("req")
            if header.get("proto") != PROTOCOL_VERSION:
                raise ProtocolError(
                    "bad_protocol", f"protocol version {header.get('proto')!r} is not supported; this server speaks {PROTOCOL_VERSION}"
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
        reply["req"] = req if isinstance(req, int) else None
        return reply, payload

    # -- producer side ----------------------------------------------------------------------

    def _hello(self, header: dict, frames: list) -> tuple[dict, list]:
        return {
            "ok": True,
            "proto": PROTOCOL_VERSION,
            "max_staleness": self.settings.max_staleness,
            "groups_per_step": self.settings.groups_per_step,
            "learner_version": self.learner_version,
        }, []

    def _int(self, header: dict, key: str) -> int:
        value = header.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ProtocolError("bad_schema", f"field {key!r} must be a non-negative integer, got {value!r}")
        return value

    def _ticket(self, header: dict, frames: list) -> tuple[dict, list]:
        version = self._int(header, "version")
        want = self._int(header, "want")
        if version > self.learner_version:
            raise ProtocolError("future_version", f"engine version {version} is newer than the learner's {self.learner_version}")
        granted = 0 if self.closed else self.admission.grant(version, want)
        return {"ok": True, "granted": granted, "learner_version": self.learner_version, "closed": self.closed}, []

    def _release(self, header: dict, frames: list) -> tuple[dict, list]:
        self.admission.release(self._int(header, "count"))
        return {"ok": True}, []

    def _full(self, nbytes: int) -> bool:
        s = self.settings
        return len(self._entries) >= s.capacity_groups or self._bytes + nbytes > s.capacity_bytes

    def _put(self, header: dict, frames: list) -> tuple[dict, list]:
        ticketed = bool(header.get("ticketed", True))
        try:
            group = decode_group(frames, self.settings.vocab_size, self.learner_version)
        except ProtocolError:
            if ticketed:
                self.admission.settle(accepted=False)
            raise
        gid = group.group_id
        if gid in self._seen:
            self.stats.duplicates += 1
            return {"ok": True, "status": "duplicate"}, []
        nbytes = sum(len(f) for f in frames)
        if self._full(nbytes):
            self.stats.waits += 1
            return {"ok": True, "status": "wait"}, []
        if ticketed:
            self.admission.settle(accepted=True)
        else:
            self.admission.settle(accepted=True, ticketed=False)
        self._seen.add(gid)
        entry = _Entry(gid, frames, nbytes, group.behaviour_version)
        self._entries[gid] = entry
        self._bytes += nbytes
        heapq.heappush(self._ready, (entry.behaviour_version, next(self._arrival), gid))
        self.stats.accepted += 1
        for obs in self.observers:
            obs.on_accept(gid, frames)
        return {"ok": True, "status": "accepted"}, []

    # -- consumer side ----------------------------------------------------------------------

    def _version(self, header: dict, frames: list) -> tuple[dict, list]:
        self.learner_version = max(self.learner_version, self._int(header, "version"))
        return {"ok": True, "learner_version": self.learner_version}, []

    def _drop(self, gid: str, reason: str) -> None:
        entry = self._entries.pop(gid)
        self._bytes -= entry.nbytes
        self.stats.dropped[reason] += 1
        for obs in self.observers:
            obs.on_drop(gid, reason, entry.frames)

    def _get(self, header: dict, frames: list) -> tuple[dict, list]:
        version = self._int(header, "version")
        want = self._int(header, "groups")
        if want < 1:
            raise ProtocolError("bad_schema", "field 'groups' must be at least 1")
        self.learner_version = max(self.learner_version, version)
        while self._ready and is_stale(version, self._ready[0][0], self.settings.max_staleness):
            _, _, gid = heapq.heappop(self._ready)
            self._drop(gid, "stale")
            self.admission.unusable()
        if len(self._ready) < want:
            return {"ok": True, "groups": 0, "ready": len(self._ready), "closed": self.closed}, []
        lease_id = next(self._lease_ids)
        ids, payload = [], []
        for _ in range(want):
            bv, _, gid = heapq.heappop(self._ready)
            entry = self._entries[gid]
            entry.lease = lease_id
            ids.append(gid)
            payload.extend(entry.frames)
            self.stats.staleness[version - bv] += 1
        consumer = header.get("consumer", "")
        self._leases[lease_id] = _Lease(str(consumer).encode(), ids, time.monotonic() + self.settings.lease_s)
        self.stats.delivered += want
        return {"ok": True, "groups": want, "lease": lease_id}, payload

    def _ack(self, header: dict, frames: list) -> tuple[dict, list]:
        lease_id = self._int(header, "lease")
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return {"ok": True, "acknowledged": 0, "unknown_lease": True}, []
        for gid in lease.group_ids:
            entry = self._entries.pop(gid)
            self._bytes -= entry.nbytes
        self.stats.acknowledged += len(lease.group_ids)
        return {"ok": True, "acknowledged": len(lease.group_ids)}, []

    def expire_leases(self, now: Optional[float] = None) -> int:
        """Groups held past their lease go back to the front of the ready set."""
        now = time.monotonic() if now is None else now
        expired = [lid for lid, lease in self._leases.items() if lease.deadline <= now]
        count = 0
        for lid in expired:
            for gid in self._leases.pop(lid).group_ids:
                entry = self._entries[gid]
                entry.lease = None
                heapq.heappush(self._ready, (entry.behaviour_version, next(self._arrival), gid))
                count += 1
        self.stats.redelivered += count
        return count

    def _close(self, header: dict, frames: list) -> tuple[dict, list]:
        self.closed = True
        return {"ok": True}, []

    def _stats(self, header: dict, frames: list) -> tuple[dict, list]:
        return {"ok": True, "stats": self.snapshot()}, []

    def snapshot(self) -> dict:
        s = self.stats
        return {
            "depth": len(self._ready),
            "leased": sum(len(lease.group_ids) for lease in self._leases.values()),
            "bytes_held": self._bytes,
            "accepted": s.accepted,
            "duplicates": s.duplicates,
            "delivered": s.delivered,
            "acknowledged": s.acknowledged,
            "redelivered": s.redelivered,
            "waits": s.waits,
            "dropped": dict(s.dropped),
            "rejected": dict(s.rejected),
            "staleness": {str(k): v for k, v in sorted(s.staleness.items())},
            "learner_version": self.learner_version,
            "tickets_running": self.admission.running,
            "usable": self.admission.usable,
            "closed": self.closed,
        }

    def close(self) -> None:
        self.socket.close(0)

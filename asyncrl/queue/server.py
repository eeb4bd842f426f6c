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
import secrets
import time
from typing import Callable, Optional

import zmq

from asyncrl.queue.admission import Admission, is_stale
from asyncrl.queue.codec import (
    GROUP_FRAMES, PROTOCOL_VERSION, ProtocolError, pack, pack_arrays, parse_groups, parse_packed, unpack_header,
)
from asyncrl.queue.state import Entry, Lease, Parked, QueueObserver, QueueSettings, QueueStats, SettledIds, Step
from asyncrl.security import may

log = logging.getLogger("asyncrl.queue")

_PER_GROUP = 1 + GROUP_FRAMES
PACK_LIMIT = 64 << 10
"""Get replies are packed (5 frames in all) only while the average group is below this many bytes:
joining copies, and for large groups the per-frame cost that packing saves is negligible."""
MAX_WAIT_MS = 10_000
"""Longest a get may ask to be parked (`wait_ms`); clients' request timeouts must exceed it."""


class QueueServer:
    def __init__(self, address: str, settings: QueueSettings, context: Optional[zmq.Context] = None, curve=None):
        """`curve`: an `asyncrl.security.Curve`; peers must then present an authorized key."""
        self.settings = settings
        self.admission = Admission(settings.max_staleness, settings.groups_per_step, settings.ticket_lease_s)
        self.stats = QueueStats()
        self.observers: list[QueueObserver] = []
        self.learner_version = 0
        self.learner_known = False
        """A consumer has told this queue its version; until then `learner_version` is 0 only by default
        (a queue restarted under a running learner, see `_learner_at`)."""
        self.closed = False
        self.last_request = time.monotonic()
        self._entries: dict[str, Entry] = {}
        self._ready: list[tuple[int, int, str]] = []  # (behaviour version, arrival, id): oldest first
        self._leases: dict[int, Lease] = {}
        self._steps: dict[int, Step] = {}
        self._settled = SettledIds(settings.seen_capacity, settings.resend_window_s)
        self._bytes = 0
        self._parked: list[Parked] = []
        self._grew = False
        """Groups became ready since parked gets were last looked at."""
        self._identity = b""
        self._arrival = itertools.count()
        # Lease ids start at a random point so that a restarted queue never takes an ack meant for
        # its predecessor's lease (a learner acknowledges old leases after its next checkpoint).
        self._lease_ids = itertools.count(secrets.randbits(40) << 12)
        self._ctx = context or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # Frames up to twice the limit still get an "oversized" error reply; beyond that the socket
        # itself drops the connection, so a hostile peer cannot make us buffer without bound.
        self.socket.setsockopt(zmq.MAXMSGSIZE, 2 * settings.max_message_bytes + (1 << 16))
        self.authorize = curve is not None
        """Check each request's key against its operation (security.may): on with Curve."""
        if curve is not None:
            curve.server(self.socket, "queue")
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
            timeout = poll_ms
            if self._parked:
                timeout = max(0, min(poll_ms, int((min(p.deadline for p in self._parked) - time.monotonic()) * 1000) + 1))
            if poller.poll(timeout):
                # Drain what is waiting before polling again: one poll per message costs more than the message.
                for _ in range(256):
                    if not self.handle_one(block=False):
                        break
            now = time.monotonic()
            if now >= next_expiry:
                self.expire_leases(now)
                next_expiry = now + 0.05
            if self._parked:
                self.wake_parked(now)

    def handle_one(self, block: bool = True) -> bool:
        """Answer one request; False when `block` is off and none is waiting."""
        try:
            frames = self.socket.recv_multipart(0 if block else zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        identity = frames[0].bytes
        self.last_request = time.monotonic()
        self._identity = identity
        reply, payload = self._dispatch(frames[1:])
        if reply is not None:  # None: a get parked until a batch is ready (see wake_parked)
            self.socket.send_multipart([identity, pack(reply), *payload], copy=False)
        if self._parked and self._grew:
            self.wake_parked(time.monotonic())
        return True

    def wake_parked(self, now: float) -> None:
        """Answer parked gets whose batch is now ready, or whose wait is over (with no groups)."""
        self._grew = False
        parked, self._parked = self._parked, []
        for p in parked:
            reply, payload = self._dispatch_get(p.header)
            if "ready" in reply and now < p.deadline and not self.closed:
                self._parked.append(p)
            else:
                self.socket.send_multipart([p.identity, pack(reply), *payload], copy=False)

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
            if self.authorize:
                self._check_permission(body[0], op, header)
            reply, payload = handler(header, body[1:])
            if reply is None:
                return None, []
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
    def _check_permission(frame, op: str, header: dict) -> None:
        """Only learner keys consume, only the other keys produce (see asyncrl.security.may)."""
        user = frame.get("User-Id")
        if not may(user, op, header.get("role")):
            raise ProtocolError(
                "forbidden",
                f"the key authorized as {user!r} may not send {op!r}: only keys named learner*.key in the "
                "authorized directory may consume (get, ack, version, close), and only the others may produce",
            )

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
        role, name = header.get("role"), self._engine({"engine": header.get("name", "")})
        if role == "producer" and name:
            # A (re)started producer holds no tickets: free what its predecessor of that name held.
            self.admission.release(1 << 62, name, time.monotonic())
        elif role == "consumer" and name:
            self._consumer_started(name, header)
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
        packed = header.get("packed", False)
        if not isinstance(packed, bool) or packed and not batched:
            raise ProtocolError("bad_schema", f"field 'packed' must be a boolean and needs 'groups', got {packed!r}")
        if not packed and len(frames) != count * _PER_GROUP:
            raise ProtocolError(
                "bad_frames", f"put of {count} group(s) needs {count * _PER_GROUP} frames after the header, got {len(frames)}"
            )
        # Checked before anything is accepted, so that a bad field refuses the whole put.
        ask = (self._int(header, "want"), self._int(header, "version")) if "want" in header else None
        now = time.monotonic()
        try:
            if packed:
                parts = parse_packed(header.get("headers"), header.get("plens"), frames, count,
                                     self.settings.vocab_size, self.learner_version)
                # Copied out of the message so that each group's memory is freed when it settles.
                groups = [(p[0], p[6], None, [a.tobytes() for a in p[2:6]]) for p in parts]
            else:
                checked = parse_groups(frames, count, self.settings.vocab_size, self.learner_version)
                groups = [(h, version, frames[i * _PER_GROUP], frames[i * _PER_GROUP + 1 : (i + 1) * _PER_GROUP])
                          for i, (h, version) in enumerate(checked)]
        except ProtocolError:
            # The whole message is refused; the producer will not resend it, so its tickets are spent.
            for _ in range(count):
                self.admission.settle(accepted=False, ticketed=ticketed, engine=engine, now=now)
            raise
        statuses = [self._accept(h, version, hframe, arrays, ticketed, engine, now) for h, version, hframe, arrays in groups]
        reply = {"ok": True, "statuses": statuses, "accepted": statuses.count("accepted")} if batched else {"ok": True, "status": statuses[0]}
        if ask is not None:
            reply.update(self._grant(*ask, engine, now))
        return reply, []

    def _grant(self, want: int, version: int, engine: str, now: float) -> dict:
        """Tickets asked for in a put (`want`, `version`), so a producer needs no separate ticket request."""
        # Unlike a ticket request, a version from the future is not an error here: the groups are already
        # accepted, and the producer learns the learner's version from this reply.
        granted = 0 if self.closed or version > self.learner_version else self.admission.grant(version, want, engine, now)
        return {"granted": granted, "learner_version": self.learner_version, "closed": self.closed}

    def _accept(self, header: dict, behaviour_version: int, header_frame, arrays: list, ticketed: bool, engine: str,
                now: float) -> str:
        gid = header["id"]
        if self._known(gid):
            self.stats.duplicates += 1
            return "duplicate"
        # A packed group has no header frame yet; msgpack of its header is about the same size.
        nbytes = sum(len(a) for a in arrays) + (len(header_frame) if header_frame is not None else 64 + 16 * len(header["lens"]))
        if self._full(nbytes):
            self.stats.waits += 1
            return "wait"
        self.admission.settle(accepted=True, ticketed=ticketed, engine=engine, now=now)
        entry = Entry(gid, header, list(arrays), nbytes, behaviour_version, header_frame)
        self._entries[gid] = entry
        self._bytes += nbytes
        heapq.heappush(self._ready, (entry.behaviour_version, next(self._arrival), gid))
        self.stats.accepted += 1
        self.stats.accepted_by_engine[engine] += 1
        self._grew = True
        for obs in self.observers:
            obs.on_accept(gid, entry.frames)
        return "accepted"

    # -- consumer side ----------------------------------------------------------------------

    def _consumer_started(self, name: str, header: dict) -> None:
        """A learner (re)started under `name`: what its predecessor held is delivered again at once
        rather than at lease expiry, and when it starts below the version the queue knew (resumed
        from a checkpoint), groups generated by the lost versions are dropped as 'lost_version'."""
        now = time.monotonic()
        for lease in self._leases.values():
            if lease.consumer == name:
                lease.deadline = now
        self.expire_leases(now)
        if "version" not in header:
            return
        version = self._int(header, "version")
        self._learner_at(version)
        if version < self.learner_version:
            log.warning("consumer %s restarted at version %d, below %d: dropping groups of the lost versions",
                        name, version, self.learner_version)
            self.learner_version = version
            keep = []
            for item in self._ready:
                if item[0] > version:
                    self._drop(item[2], "lost_version")
                else:
                    keep.append(item)
            heapq.heapify(keep)
            self._ready = keep

    def _learner_at(self, version: int) -> None:
        """A consumer holds `version`: the learner's version never goes down here (see _consumer_started)."""
        if not self.learner_known:
            self.learner_known = True
            # A queue (re)started under a learner already at v: the v·B groups its steps consumed count
            # as used, as if this queue had served them; otherwise engines at v would be let start
            # (K + v + 1)·B groups at once, most of which would arrive too stale to train.
            self.admission.consumed(version * self.settings.groups_per_step)
        self.learner_version = max(self.learner_version, version)

    def _version(self, header: dict, frames: list) -> tuple[dict, list]:
        self._learner_at(self._int(header, "version"))
        return {"ok": True, "learner_version": self.learner_version}, []

    def _settle(self, gid: str, now: float) -> Entry:
        """Forget a group's frames and remember its id for the resend window."""
        entry = self._entries.pop(gid)
        self._bytes -= entry.nbytes
        self._settled.add(gid, now)
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

    def _lease(self, consumer: str, ids: list[str], version: int, step=None, token=None) -> tuple[int, list]:
        """Lease `ids`; returns the lease id and the groups' entries."""
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = Lease(consumer, ids, time.monotonic() + self.settings.lease_s, version, step, token)
        self.stats.delivered += len(ids)
        return lease_id, [self._entries[gid] for gid in ids]

    def _get(self, header: dict, frames: list, park: bool = True) -> tuple[Optional[dict], list]:
        version = self._int(header, "version")
        want = self._int(header, "groups")
        if want < 1:
            raise ProtocolError("bad_schema", "field 'groups' must be at least 1")
        wait_ms = self._int(header, "wait_ms", 0)
        if wait_ms > MAX_WAIT_MS:
            raise ProtocolError("bad_schema", f"field 'wait_ms' must be 0..{MAX_WAIT_MS}, got {wait_ms}")
        packed = header.get("packed", False)
        if not isinstance(packed, bool):
            raise ProtocolError("bad_schema", f"field 'packed' must be a boolean, got {packed!r}")
        consumer = str(header.get("consumer", ""))[:128]
        token = header.get("token")
        token = token if isinstance(token, str) and 0 < len(token) <= 64 else None
        for lease_id, lease in self._leases.items() if token else ():
            if lease.token == token and lease.consumer == consumer:
                # A resend of a get whose reply was lost (Lazy Pirate): the same lease again, not
                # a second one that nobody would acknowledge until it expired.
                return {"ok": True, "groups": len(lease.group_ids), "lease": lease_id}, [
                    f for gid in lease.group_ids for f in self._entries[gid].frames
                ]
        self._learner_at(version)
        self._retire_steps()
        if "rank" in header or "world" in header:
            reply, payload = self._get_share(version, want, self._int(header, "rank", 0), self._int(header, "world", 1), consumer)
        else:
            self._drop_stale(version)
            if len(self._ready) < want:
                reply, payload = {"ok": True, "groups": 0, "ready": len(self._ready), "closed": self.closed}, []
            else:
                ids = [heapq.heappop(self._ready)[2] for _ in range(want)]
                lease_id, payload = self._lease(consumer, ids, version, token=token)
                reply = {"ok": True, "groups": want, "lease": lease_id}
        if park and wait_ms and "ready" in reply and not self.closed:
            self._parked.append(Parked(self._identity, header, time.monotonic() + wait_ms / 1000))
            return None, []
        entries = payload
        if packed and entries and sum(e.nbytes for e in entries) < PACK_LIMIT * len(entries):
            headers, plens, payload = pack_arrays([e.header for e in entries], [e.arrays for e in entries])
            reply.update(packed=True, headers=headers, plens=plens)
        else:
            payload = [f for e in entries for f in e.frames]
        return reply, payload

    def _dispatch_get(self, header: dict) -> tuple[dict, list]:
        """A parked get, looked at again."""
        try:
            reply, payload = self._get(header, [], park=False)
        except ProtocolError as exc:  # cannot happen for a header that parked, but never lose the reply
            self.stats.rejected[exc.code] += 1
            reply, payload = {"ok": False, "code": exc.code, "error": str(exc)}, []
        req = header.get("req")
        reply["req"] = req if isinstance(req, int) and not isinstance(req, bool) else None
        return reply, payload

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
            step = Step(world, want, [ids[r * per : (r + 1) * per] for r in range(world)], [None] * world, [False] * world)
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
        self._grew = True

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
            "accepted_by_engine": dict(s.accepted_by_engine),
            "rejected": dict(s.rejected),
            "staleness": {str(k): v for k, v in sorted(s.staleness.items())},
            "balanced": s.accepted == s.acknowledged + dropped + depth + leased,
            "learner_version": self.learner_version,
            "learner_known": self.learner_known,
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

"""The transfer queue server: one ROUTER socket between rollout producers and learner consumers.

Owns every accepted group from the moment it is acknowledged to its producer until the learner
acknowledges the step that trained on it (contract 4), the admission tickets (contract 2) and the
memory bound (contract 7). Groups are kept as the frames they arrived in and sent on unchanged,
or, for a same-host producer's large groups, as regions of its arena that a same-host learner
reads itself (shm.py).
Every request is validated; a bad one gets an error reply and a counter, and the loop goes on.
The wire protocol is specified in docs/protocol.md; change the two together.

Bookkeeping that makes "nothing vanishes, nothing is trained twice" checkable: every accepted
group is, at any moment, exactly one of ready (`depth`), held for a consumer (`leased`),
acknowledged, already trained (a resend the learner said it trained), or dropped with a reason, so
`accepted == acknowledged + already_trained + dropped + depth + leased` always holds and
`snapshot()["balanced"]` says so. Ids of settled groups are remembered in a
bounded window (`seen_capacity` ids, `resend_window_s` seconds) so producer resends stay
idempotent without an id set that grows for ever.

A queue restart loses nothing: producers keep each group until it settles (the `status` op tells
them), and resend what a new queue instance does not know; the learner's hello lists the ids it
trained, so a resend of one of them settles without being trained twice (docs/faults.md).

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

from asyncrl.queue.admission import Admission
from asyncrl.queue.codec import (
    GROUP_FRAMES, PROTOCOL_VERSION, ProtocolError, pack, parse_groups, parse_packed, unpack_header,
)
from asyncrl.queue.consumers import ConsumerSide
from asyncrl.queue.shm import ShmArea
from asyncrl.queue.state import Entry, Lease, Parked, QueueObserver, QueueSettings, QueueStats, SettledIds, Step
from asyncrl.security import may

log = logging.getLogger("asyncrl.queue")

_PER_GROUP = 1 + GROUP_FRAMES


class QueueServer(ConsumerSide):
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
        self.instance = secrets.token_hex(8)
        """Names this queue process: a client that sees it change knows the queue restarted with nothing
        it held (producers resend what is unsettled, the learner says again what it trained)."""
        self.last_request = time.monotonic()
        self.shm: Optional[ShmArea] = None
        """Where same-host producers keep large groups' arrays; None when settings.shm_dir is unset or unusable."""
        if settings.shm_dir:
            try:
                self.shm = ShmArea(settings.shm_dir, self.instance, settings.max_message_bytes)
            except OSError as exc:
                log.warning("queue.shm_dir %s cannot be used (%s): every group's arrays travel in the messages",
                            settings.shm_dir, exc)
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
            "status": self._status,
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
                for obs in self.observers:
                    obs.tick(now)
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
        if role != "consumer" and name and self.shm is not None:
            self.shm.retire_owner(name)  # a client makes a new arena after each hello: the old one is not written again
        if role == "producer" and name:
            # A (re)started producer holds no tickets: free what its predecessor of that name held.
            self.admission.release(1 << 62, name, time.monotonic())
        elif role == "consumer" and name:
            self._consumer_started(name, header)
        return {
            "ok": True,
            "proto": PROTOCOL_VERSION,
            "instance": self.instance,
            **({"shm": self.shm.offer()} if self.shm is not None else {}),
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
        return {"ok": True, "granted": granted, "learner_version": self.learner_version, "closed": self.closed,
                "instance": self.instance}, []

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
        regions, arena = self._regions(header, count, packed, engine)
        need = count * _PER_GROUP - GROUP_FRAMES * sum(r is not None for r in regions)
        if not packed and len(frames) != need:
            raise ProtocolError("bad_frames", f"put of {count} group(s) needs {need} frames after the header, got {len(frames)}")
        if arena is not None:
            frames = self._with_regions(frames, regions)
        # Checked before anything is accepted, so that a bad field refuses the whole put.
        ask = (self._int(header, "want"), self._int(header, "version")) if "want" in header else None
        now = time.monotonic()
        try:
            if packed:
                parts = parse_packed(header.get("headers"), header.get("plens"), frames, count,
                                     self.settings.vocab_size, self.learner_version)
                # Copied out of the message so that each group's memory is freed when it settles.
                groups = [(p[0], p[6:8], None, [a.tobytes() for a in p[2:6]]) for p in parts]
            else:
                checked = parse_groups(frames, count, self.settings.vocab_size, self.learner_version)
                groups = [(h, (oldest, newest), frames[i * _PER_GROUP], frames[i * _PER_GROUP + 1 : (i + 1) * _PER_GROUP])
                          for i, (h, oldest, newest) in enumerate(checked)]
        except ProtocolError:
            # The whole message is refused; the producer will not resend it, so its tickets are spent.
            self.admission.settle(accepted=False, ticketed=ticketed, engine=engine, now=now, count=count)
            raise
        statuses = self._accept(groups, regions, arena)
        accepted = statuses.count("accepted")
        if accepted:
            self.admission.settle(accepted=True, ticketed=ticketed, engine=engine, now=now, count=accepted)
            self.stats.accepted += accepted
            self.stats.accepted_by_engine[engine] += accepted
            self._grew = True
        reply = {"ok": True, "statuses": statuses, "accepted": statuses.count("accepted")} if batched else {"ok": True, "status": statuses[0]}
        reply["instance"] = self.instance
        if arena is not None:
            reply["freed"] = self.shm.take_freed(arena.name)
        if ask is not None:
            reply.update(self._grant(*ask, engine, now))
        return reply, []

    def _regions(self, header: dict, count: int, packed: bool, engine: str) -> tuple[list, object]:
        """The put's arena and each group's region in it (None: arrays inline); see shm.py."""
        refs = header.get("shm")
        if refs is None:
            return [None] * count, None
        if self.shm is None:
            raise ProtocolError("bad_shm", "this queue offers no shared-memory arenas (queue.shm_dir is unset): send the arrays inline")
        if packed or not isinstance(refs, list) or len(refs) != count:
            raise ProtocolError("bad_shm", f"field 'shm' must be a list of {count} regions or nils, and not in a packed put")
        arena = self.shm.arena(header.get("arena"), engine)
        return [None if ref is None else self.shm.region(arena, ref) for ref in refs], arena

    @staticmethod
    def _with_regions(frames: list, regions: list) -> list:
        """The put's frames with each arena group's four arrays put back after its header frame."""
        out, at = [], 0
        for region in regions:
            if region is None:
                out.extend(frames[at : at + _PER_GROUP])
                at += _PER_GROUP
            else:
                out.append(frames[at])
                out.extend(region[1])
                at += 1
        return out

    def _grant(self, want: int, version: int, engine: str, now: float) -> dict:
        """Tickets asked for in a put (`want`, `version`), so a producer needs no separate ticket request."""
        # Unlike a ticket request, a version from the future is not an error here: the groups are already
        # accepted, and the producer learns the learner's version from this reply.
        granted = 0 if self.closed or version > self.learner_version else self.admission.grant(version, want, engine, now)
        return {"granted": granted, "learner_version": self.learner_version, "closed": self.closed}

    def _accept(self, groups: list, regions: list, arena) -> list[str]:
        """Hold each group of a put unless the queue knows its id or is full: per group 'accepted',
        'duplicate' or 'wait'. `groups`: (header, (oldest, newest) token versions, header frame or None,
        4 arrays) each; the oldest is the group's behaviour version. The caller counts the accepted ones
        and settles their tickets."""
        entries, ready, arrival = self._entries, self._ready, self._arrival
        statuses = []
        for (header, (oldest, newest), header_frame, arrays), region in zip(groups, regions):
            gid = header["id"]
            if self._known(gid):
                self.stats.duplicates += 1
                held = entries.get(gid)
                if region is not None and not (held and held.region and held.region[:2] == (arena.name, region[0])):
                    self.shm.unused(arena.name, region[0])  # a resend of a put already held names the same region: keep it
                statuses.append("duplicate")
                continue
            # A packed group has no header frame yet; msgpack of its header is about the same size.
            nbytes = sum(map(len, arrays)) + (len(header_frame) if header_frame is not None else 64 + 16 * len(header["lens"]))
            if self._full(nbytes):
                self.stats.waits += 1
                if region is not None:
                    self.shm.unused(arena.name, region[0])
                statuses.append("wait")
                continue
            entry = Entry(gid, header, arrays, nbytes, oldest, header_frame, None, newest)
            if region is not None:
                entry.region = (arena.name, region[0], [len(a) for a in arrays])
                self.shm.hold(arena, region[0])
                self.stats.shm_in += 1
            entries[gid] = entry
            self._bytes += nbytes
            heapq.heappush(ready, (oldest, next(arrival), gid))
            for obs in self.observers:
                obs.on_accept(entry)
            statuses.append("accepted")
        return statuses

    # -- settlement -------------------------------------------------------------------------

    def _status(self, header: dict, frames: list) -> tuple[dict, list]:
        """What became of each id: held, trained, dropped:<reason>, or unknown (a producer resends those)."""
        settled = self._settled
        outcomes = ["held" if gid in self._entries else settled.outcome(gid) or "unknown" for gid in self._ids(header, "ids")]
        reply = {"ok": True, "instance": self.instance, "outcomes": outcomes}
        if self.shm is not None:
            reply["shm"] = self.shm.offer()  # a producer that lost its arena (this queue restarted) learns the new place
            if "arena" in header:
                reply["freed"] = self.shm.take_freed(header["arena"], header.get("regions"))
        return reply, []

    def _settle(self, gid: str, now: float, outcome: str) -> Entry:
        """Forget a group's frames and remember its id and outcome for the resend window."""
        return self._settle_many([gid], now, outcome)[0]

    def _settle_many(self, gids: list[str], now: float, outcome: str) -> list[Entry]:
        entries = [self._entries.pop(gid) for gid in gids]
        self._bytes -= sum(e.nbytes for e in entries)
        self._settled.add_many(gids, now, outcome)
        for entry in entries:
            if entry.region is not None:
                self.shm.release(entry.region[0], entry.region[1])
        return entries

    def _drop(self, gid: str, reason: str) -> None:
        entry = self._settle(gid, time.monotonic(), f"dropped:{reason}")
        self.stats.dropped[reason] += 1
        self.admission.unusable()
        # The region is free from here on, but no producer hears of it before this thread replies.
        for obs in self.observers:
            obs.on_drop(entry, reason)

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
            "already_trained": s.already_trained,
            "redelivered": s.redelivered,
            "waits": s.waits,
            "shm_in": s.shm_in,
            "shm_out": s.shm_out,
            "dropped": dict(s.dropped),
            "accepted_by_engine": dict(s.accepted_by_engine),
            "rejected": dict(s.rejected),
            "staleness": {str(k): v for k, v in sorted(s.staleness.items())},
            "balanced": s.accepted == s.acknowledged + s.already_trained + dropped + depth + leased,
            "learner_version": self.learner_version,
            "learner_known": self.learner_known,
            "tickets_running": self.admission.running,
            "tickets_expired": self.admission.expired,
            "tickets_held": self.admission.held(),
            "usable": self.admission.usable,
            "ids_remembered": len(self._settled),
            "closed": self.closed,
            "instance": self.instance,
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
        if self.shm is not None:
            self.shm.close()

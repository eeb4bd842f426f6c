"""Clients of the transfer queue: `QueueProducer` for rollout servers, `QueueConsumer` for learners.

Each request waits for its reply with a timeout; on silence the client rebuilds its socket and
resends (the Lazy Pirate pattern), which is safe because group ids make puts idempotent. A peer
that stays silent past all retries becomes a `QueueTimeout` naming the address, never a hang.
Must never import torch.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import Counter
from typing import Callable, Optional

import zmq

from asyncrl.protocol import TrajectoryGroup
from asyncrl.queue.codec import (
    GROUP_FRAMES, PROTOCOL_VERSION, ProtocolError, decode_groups, decode_packed, encode_group, encode_packed,
    group_parts, pack, unpack_header,
)
from asyncrl.queue.shm import ArenaReader, ProducerArena, reachable
from asyncrl.security import dealer

MAX_STATUS_IDS = 4096
"""Most ids a producer asks about in one status request (the server takes up to 65,536)."""
PACK_TOKENS = 1 << 14
"""put_many packs a batch into 5 frames (instead of 5 per group) while groups average fewer response
tokens than this: per-frame costs dominate small groups, copies dominate large ones."""


log = logging.getLogger("asyncrl.queue")


class QueueTimeout(TimeoutError):
    pass


class QueueRequestError(RuntimeError):
    """The server refused a request; `code` is its counter name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class _Client:
    def __init__(self, address: str, name: str, timeout_s: float = 30.0, retries: int = 3, curve=None):
        """`curve`: an `asyncrl.security.Curve` to authenticate with, or None for plain loopback."""
        self.address = address
        self.curve = curve
        self.name = name
        self.timeout_s = timeout_s
        self.retries = retries
        self._ctx = zmq.Context.instance()
        self._req_ids = itertools.count(1)
        self.instance: Optional[str] = None
        """The queue instance that last answered with one (hello, put, status): a change means it restarted."""
        self.tries = 0
        """How many times the last request was sent (more than 1: an earlier try may have been taken)."""
        self._socket: Optional[zmq.Socket] = None
        self._connect()

    def _connect(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
        self._socket = dealer(self._ctx, self.address, self.curve, "queue")

    def request(self, op: str, fields: Optional[dict] = None, frames: list = ()) -> tuple[dict, list]:
        for attempt in range(self.retries + 1):
            self.tries = attempt + 1
            req = next(self._req_ids)
            header = {"proto": PROTOCOL_VERSION, "op": op, "req": req, **(fields or {})}
            self._socket.send_multipart([pack(header), *frames], copy=False)
            deadline = time.monotonic() + self.timeout_s
            while (left := deadline - time.monotonic()) > 0:
                if not self._socket.poll(int(left * 1000) + 1, zmq.POLLIN):
                    break
                reply_frames = self._socket.recv_multipart(copy=False)
                reply = unpack_header(reply_frames[0].bytes)
                if reply.get("req") != req:
                    continue  # a late answer to an earlier attempt
                if not reply.get("ok"):
                    raise QueueRequestError(str(reply.get("code")), f"queue at {self.address} refused {op}: {reply.get('error')}")
                if isinstance(reply.get("instance"), str) and reply["instance"] != self.instance:
                    if self.instance is not None:
                        log.warning("%s: the queue at %s restarted (instance %s, was %s)", self.name, self.address,
                                    reply["instance"], self.instance)
                    self._new_instance(reply["instance"])
                return reply, reply_frames[1:]
            if attempt < self.retries:
                log.warning("%s: queue at %s did not answer %r within %.0f s; reconnecting and resending (try %d of %d)",
                            self.name, self.address, op, self.timeout_s, attempt + 2, self.retries + 1)
            self._connect()
        raise QueueTimeout(
            f"queue at {self.address} did not answer {op!r} within {self.timeout_s:.0f} s, {self.retries + 1} tries; "
            "is `asyncrl queue` (or the learner) running and reachable?"
        )

    def _new_instance(self, instance: str) -> None:
        self.instance = instance

    def hello(self, role: str, version: Optional[int] = None, trained: Optional[list[str]] = None) -> dict:
        """Introduce this client. A consumer passes its policy version: the queue then hands back at
        once what a predecessor of the same name held, and forgets versions above it; and the ids it
        trained that a producer may still resend (see docs/faults.md)."""
        fields = {"role": role, "name": self.name}
        if version is not None:
            fields["version"] = version
        if trained is not None:
            fields["trained"] = list(trained)
        reply, _ = self.request("hello", fields)
        return reply

    def stats(self) -> dict:
        reply, _ = self.request("stats")
        return reply["stats"]

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None


class QueueProducer(_Client):
    """Used by rollout servers: ask for admission tickets, then hand over groups until accepted.

    Tickets are held under this producer's name; a producer silent for the queue's ticket_lease_s
    loses them, so a long pause between ticket and put must be covered by a fresh ticket request.

    An accepted group stays in `unsettled` until the queue says it settled (trained or dropped with
    a reason): `reconcile`, called by every put and by the rollout loop, asks at most every
    `reconcile_s`, and at once when a reply shows a new queue instance; groups the queue does not
    know (it restarted) are sent again. So a queue restart loses nothing (docs/faults.md). The
    buffer holds no more than the queue does plus what settled since the last look.
    """

    learner_version = 0
    """The learner's version as of the last ticket reply."""
    reconcile_s = 0.5

    def __init__(self, address: str, name: str, shm: bool = True, shm_min_bytes: int = 64 << 10,
                 arena_bytes: int = 128 << 20, **kwargs):
        """`shm`: write groups of at least `shm_min_bytes` array bytes into an arena of `arena_bytes` in
        the queue's shared-memory directory when this process can see it (shm.py); else, or when the
        arena is full, the arrays travel in the message."""
        super().__init__(address, name, **kwargs)
        self.shm = shm
        self.shm_min_bytes = shm_min_bytes
        self.arena_bytes = arena_bytes
        self.arena: Optional[ProducerArena] = None
        self.arena_lost = 0
        """Regions never reused: their put failed after a resend, so the queue may have taken one copy."""
        self._shm_dir: Optional[str] = None
        self._shm_failures = 0
        self.unsettled: dict[str, TrajectoryGroup] = {}
        """Accepted groups not yet settled, oldest first: what a restarted queue would be sent again."""
        self.outcomes: Counter = Counter()
        """How this producer's settled groups ended: 'trained', 'dropped:<reason>', or 'discarded:future_version'
        (made by weights of versions the learner lost when it resumed from an older checkpoint)."""
        self.resent = 0
        self._keep = True
        self._checked = time.monotonic()
        self._restarted = False

    def _new_instance(self, instance: str) -> None:
        self._restarted = self.instance is not None
        super()._new_instance(instance)

    def hello(self, role: str = "producer", version: Optional[int] = None, trained: Optional[list[str]] = None) -> dict:
        reply = super().hello(role, version, trained)
        self._use_offer(reply.get("shm"))
        return reply

    # -- the arena (shm.py) ------------------------------------------------------------------

    def _use_offer(self, offer) -> None:
        """Follow the queue's shared-memory offer: a new queue (or a first hello) means a new arena."""
        directory = reachable(offer) if self.shm and self._shm_failures < 3 else None
        if directory != self._shm_dir or directory is None:
            self._drop_arena()
        self._shm_dir = directory

    def _drop_arena(self) -> None:
        # Not unlinked: the queue may hold regions of it that a learner has still to read; the queue
        # removes it once they settle (or its directory at exit).
        if self.arena is not None:
            self.arena.close(unlink=False)
            self.arena = None

    def _encode(self, group: TrajectoryGroup) -> tuple[list, Optional[dict]]:
        """(frames, region): a large group's arrays go into the arena when the queue's directory is here."""
        if self._shm_dir is not None:
            header, parts = group_parts(group)
            if sum(dtype.itemsize * sum(len(a) for a in arrays) for dtype, arrays in parts) >= self.shm_min_bytes:
                if self.arena is None:
                    try:
                        self.arena = ProducerArena(self._shm_dir, self.name, self.arena_bytes)
                    except OSError as exc:
                        log.warning("%s: no arena in %s (%s); sending arrays in the messages", self.name, self._shm_dir, exc)
                        self._shm_dir = None
                ref = self.arena.write(parts) if self.arena is not None else None
                if ref is not None:
                    return [pack(header)], ref
        return encode_group(group), None

    def _put_request(self, fields: dict, frames: list, refs: list) -> Optional[dict]:
        """One put; frees the regions the queue reports it will not read again. None: the queue could
        not read the arena (it restarted), so the groups must be encoded and sent again."""
        used = [r["offset"] for r in refs if r is not None]
        if used:
            fields = {**fields, "arena": self.arena.name, "shm": refs}
        try:
            reply, _ = self.request("put", fields, frames)
        except QueueRequestError as exc:
            if used and self.tries == 1:
                for offset in used:  # a refused message: the queue kept nothing of it
                    self.arena.free(offset)
            elif used:
                self.arena_lost += len(used)  # an earlier try may have been taken: never write there again
            if exc.code != "bad_shm" or not used:
                raise
            self._shm_failures += 1
            log.warning("%s: the queue cannot read arena %s (%s); sending the arrays in the messages until it offers "
                        "its directory again", self.name, self.arena.name, exc)
            self._drop_arena()
            self._shm_dir = None
            self._restarted = True  # the next reconcile asks at once, and hears the queue's offer
            return None
        self._shm_failures = 0
        self._freed(reply)
        return reply

    def _freed(self, reply: dict) -> None:
        if self.arena is not None:
            for offset in reply.get("freed", ()):
                self.arena.free(offset)

    def _hold(self, group: TrajectoryGroup, status: str) -> None:
        if self._keep and status in ("accepted", "duplicate"):
            self.unsettled[group.group_id] = group

    def reconcile(self, force: bool = False) -> int:
        """Ask what became of the unsettled groups, forget the settled ones and send again those the
        queue does not know (it restarted). A no-op until `reconcile_s` passed, unless `force` or a
        restart was seen. Returns how many were sent again."""
        now = time.monotonic()
        if not self.unsettled or not (force or self._restarted or now - self._checked >= self.reconcile_s):
            return 0
        self._checked, self._restarted = now, False
        ids, resent = list(self.unsettled), 0
        # Oldest first, in chunks; a chunk that is all still held means the newer rest is held too.
        for start in range(0, len(ids), MAX_STATUS_IDS):
            chunk = ids[start : start + MAX_STATUS_IDS]
            try:
                reply, _ = self.request("status", {"ids": chunk, **({"arena": self.arena.name} if self.arena else {})})
            except QueueRequestError as exc:
                if exc.code != "bad_op":
                    raise
                # A queue from before the status op: it cannot say what settled, so keep nothing.
                log.warning("%s: the queue at %s has no 'status' op (an older asyncrl); unsettled groups are not kept, "
                            "and a restart of that queue loses what it held", self.name, self.address)
                self.unsettled.clear()
                self._keep = False
                return 0
            self._freed(reply)
            if "shm" in reply and self._shm_dir is None:
                self._use_offer(reply["shm"])
            unknown, held = [], 0
            for gid, outcome in zip(chunk, reply["outcomes"]):
                if outcome == "unknown":
                    unknown.append(gid)
                elif outcome == "held":
                    held += 1
                else:
                    del self.unsettled[gid]
                    self.outcomes[outcome] += 1
            if unknown:
                log.warning("%s: the queue at %s does not hold %d of its unsettled groups (it restarted); sending them again",
                            self.name, self.address, len(unknown))
                sent, finished = self._resend(unknown)
                resent += sent
                if not finished:
                    break
            if held == len(chunk):
                break
        self.resent += resent
        return resent

    def _resend(self, ids: list[str]) -> tuple[int, bool]:
        """Put `ids` again, without tickets; (how many were sent, False if the queue is not ready for them yet)."""
        sent = 0
        for gid in ids:
            try:
                self._send(self.unsettled[gid], ticketed=False, wait_s=0.01)
                sent += 1
            except QueueRequestError as exc:
                if exc.code != "future_version":
                    raise
                if not self.stats().get("learner_known", True):
                    # A new queue the learner has not spoken to yet: try the rest on a later reconcile.
                    self._restarted = True
                    self._checked = time.monotonic()
                    return sent, False
                log.warning("%s: group %s discarded: %s", self.name, gid, exc)
                del self.unsettled[gid]
                self.outcomes["discarded:future_version"] += 1
        return sent, True

    def ticket(self, version: int, want: int) -> tuple[int, bool]:
        """(granted, closed): how many groups may be started with weights of `version`."""
        reply, _ = self.request("ticket", {"version": version, "want": want, "engine": self.name})
        self.learner_version = int(reply.get("learner_version", self.learner_version))
        return int(reply["granted"]), bool(reply.get("closed"))

    def release(self, count: int) -> int:
        """Hand back tickets that will not be used (an engine stopping); returns how many the queue still held."""
        if count <= 0:
            return 0
        reply, _ = self.request("release", {"count": count, "engine": self.name})
        return int(reply.get("released", 0))

    def put(self, group: TrajectoryGroup, ticketed: bool = True, wait_s: float = 0.01) -> str:
        """Send until the queue holds it; returns 'accepted' or 'duplicate'. Waits while the queue is full."""
        status = self._send(group, ticketed, wait_s)
        self.reconcile()
        return status

    def _send(self, group: TrajectoryGroup, ticketed: bool, wait_s: float) -> str:
        pause = wait_s
        while True:
            frames, ref = self._encode(group)
            reply = self._put_request({"ticketed": ticketed, "engine": self.name}, frames, [ref])
            if reply is None:
                continue  # the arena was dropped: sent again with the arrays in the message
            if reply["status"] != "wait":
                self._hold(group, reply["status"])
                return reply["status"]
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def put_many(self, groups: list[TrajectoryGroup], ticketed: bool = True, wait_s: float = 0.01) -> list[str]:
        """Send several groups per message (far fewer round trips for small groups) until each is held.

        Returns each group's final status, 'accepted' or 'duplicate'. Groups told to wait are resent,
        alone with the others that waited, after a pause that grows while the queue stays full.
        """
        statuses = self._put_many(groups, ticketed, wait_s, None)[0]
        self.reconcile()
        return statuses

    def put_and_ticket(self, groups: list[TrajectoryGroup], version: int, want: int,
                       ticketed: bool = True, wait_s: float = 0.01) -> tuple[list[str], int, bool]:
        """put_many, asking in the same message for `want` tickets at `version`: (statuses, granted, closed).

        Saves the ticket round trip of a producer that generates while it sends."""
        statuses, reply = self._put_many(groups, ticketed, wait_s, {"want": want, "version": version})
        self.reconcile()
        self.learner_version = int(reply.get("learner_version", self.learner_version))
        return statuses, int(reply.get("granted", 0)), bool(reply.get("closed"))

    def _put_many(self, groups, ticketed: bool, wait_s: float, ask: Optional[dict]) -> tuple[list[str], dict]:
        packed = bool(groups) and sum(len(s.tokens) for g in groups for s in g.samples) < PACK_TOKENS * len(groups)
        statuses: list[Optional[str]] = [None] * len(groups)
        pending = list(range(len(groups)))
        pause, first = wait_s, {}
        while pending:
            fields = {"ticketed": ticketed, "engine": self.name, "groups": len(pending)}
            refs = [None] * len(pending)
            if packed:
                headers, plens, frames = encode_packed([groups[i] for i in pending])
                fields.update(packed=True, headers=headers, plens=plens)
            else:
                frames = []  # encoded at each try: the queue frees the arena regions of groups told to wait
                for k, i in enumerate(pending):
                    group_frames, refs[k] = self._encode(groups[i])
                    frames.extend(group_frames)
            if ask is not None and not first:
                fields.update(ask)  # tickets are asked for once, in the first message
            reply = self._put_request(fields, frames, refs)
            if reply is None:
                continue  # the arena was dropped: sent again with the arrays in the messages
            first = first or reply
            waiting = []
            for i, status in zip(pending, reply["statuses"]):
                if status == "wait":
                    waiting.append(i)
                else:
                    statuses[i] = status
                    self._hold(groups[i], status)
            if len(waiting) == len(pending):
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
            else:
                pause = wait_s
            pending = waiting
        return statuses, first  # type: ignore[return-value]


class QueueConsumer(_Client):
    """Used by learners: take a step's batch under a lease, acknowledge it after the step."""

    def __init__(
        self, address: str, name: str, vocab_size: Optional[int] = None, rank: Optional[int] = None, world: int = 1,
        verify: bool = False, shm: bool = True, **kwargs
    ):
        """`rank`/`world`: this learner's data-parallel rank; each rank then receives its whole-group share
        (groups / world) of the same step's batch. None keeps the plain get: the whole batch to this consumer.
        `verify`: check every array again (NaN, vocabulary, versions); off by default, since the server
        validated each group when it was put and sends its frames on unchanged. Headers and sizes are
        always checked. `shm`: read large groups' arrays from their producer's arena when this process
        sees the queue's shared-memory directory (shm.py); learned at hello."""
        super().__init__(address, name, **kwargs)
        self.shm = shm
        self._reader: Optional[ArenaReader] = None
        self.vocab_size = vocab_size
        self.rank = rank
        self.world = world
        self.verify = verify
        self.trained_ids: Callable[[], list[str]] = list
        """The ids of groups the learner trained that a producer may still resend; the learner sets it.
        Told to the queue in each consumer hello, so a restarted queue never delivers them again."""

    def hello(self, role: str = "consumer", version: Optional[int] = None, trained: Optional[list[str]] = None) -> dict:
        if role == "consumer" and trained is None:
            trained = self.trained_ids()
        reply = super().hello(role, version, trained)
        directory = reachable(reply.get("shm")) if self.shm else None
        if directory is None or self._reader is None or self._reader.directory != directory:
            self._reader = ArenaReader(directory) if directory else None
        return reply

    def set_version(self, version: int) -> None:
        self.request("version", {"version": version})

    def try_get(self, version: int, groups: int, wait_ms: int = 0,
                ack: Optional[int] = None) -> tuple[Optional[int], list[TrajectoryGroup], bool]:
        """(lease, groups, closed): an empty list when fewer than `groups` are ready, after waiting up to
        `wait_ms` for them (the server holds the request and answers as soon as they are).

        `groups` is the whole step's batch; with a rank set, this rank receives groups / world of them.
        `ack`: the previous step's lease, acknowledged by the same message (saves a round trip per step)."""
        # One token per logical get, the same in its resends: a reply lost to a timeout does not
        # leave behind a lease that nobody holds (the queue answers the resend with that lease).
        fields = {"version": version, "groups": groups, "consumer": self.name, "packed": True, "token": uuid.uuid4().hex}
        if wait_ms:
            fields["wait_ms"] = int(wait_ms)
        if self.rank is not None:
            fields.update(rank=self.rank, world=self.world)
        if self.instance is not None:
            fields["instance"] = self.instance  # said hello to this one: a restarted queue refuses the get
        if ack is not None:
            fields["ack"] = int(ack)
        if self._reader is not None:
            fields["shm"] = True
        try:
            reply, frames = self.request("get", fields)
        except QueueRequestError as exc:
            if exc.code != "instance_changed":
                raise
            # Before a restarted queue hands out anything, it must hear what this learner trained.
            self.hello("consumer", version)
            fields["instance"] = self.instance
            fields["shm"] = self._reader is not None
            reply, frames = self.request("get", fields)
        count = int(reply["groups"])
        if count == 0:
            return None, [], bool(reply.get("closed"))
        buffers = [f.buffer for f in frames]
        if "shm" in reply:
            try:
                buffers = self._read_regions(reply["shm"], buffers, count)
            except (ProtocolError, OSError) as exc:
                # Asking again with the same token gets the same lease, now with the arrays in the message.
                log.warning("%s: cannot read the arena regions of a batch (%s); reading from messages from now on", self.name, exc)
                self._reader = None
                reply, frames = self.request("get", {**fields, "shm": False})
                buffers = [f.buffer for f in frames]
        if reply.get("packed"):
            batch = decode_packed(reply.get("headers"), reply.get("plens"), buffers, count, self.vocab_size, check=self.verify)
        else:
            if len(buffers) != count * (1 + GROUP_FRAMES):
                raise ProtocolError("bad_frames", f"batch reply has {len(buffers)} frames for {count} groups")
            batch = decode_groups(buffers, count, self.vocab_size, check=self.verify)
        return int(reply["lease"]), batch, False

    def _read_regions(self, refs, buffers: list, count: int) -> list:
        """A reply's frames with each arena group's four arrays read (copied) from its region."""
        if not isinstance(refs, list) or len(refs) != count:
            raise ProtocolError("bad_shm", f"field 'shm' of a batch reply must list {count} regions or nils")
        out, at = [], 0
        for ref in refs:
            if ref is None:
                out.extend(buffers[at : at + 1 + GROUP_FRAMES])
                at += 1 + GROUP_FRAMES
            else:
                out.append(buffers[at])
                out.extend(self._reader.frames(ref))
                at += 1
        if at != len(buffers):
            raise ProtocolError("bad_frames", f"batch reply has {len(buffers)} frames for its {count} groups and regions")
        return out

    def get_batch(
        self, version: int, groups: int, timeout_s: float, should_stop=lambda: False, poll_s: float = 0.002
    ) -> tuple[Optional[int], list[TrajectoryGroup]]:
        """Wait for a full batch; (None, []) if `should_stop` turns true first."""
        deadline = time.monotonic() + timeout_s
        pause = poll_s
        while not should_stop():
            # Polling rather than a long-poll get (try_get's wait_ms): a parked get cuts the batch the
            # moment `groups` are ready, which lets a group from a newer ticket overtake a slower engine's
            # older one and pushes that one past K (a stale drop). Polling gives stragglers a few ms.
            lease, batch, _ = self.try_get(version, groups)
            if batch:
                return lease, batch
            if time.monotonic() > deadline:
                raise QueueTimeout(
                    f"no batch of {groups} groups from the queue at {self.address} within {timeout_s:.0f} s; "
                    "are rollout servers running and connected to it?"
                )
            time.sleep(pause)
            pause = min(pause * 1.5, 0.02)
        return None, []

    def ack(self, lease: int) -> int:
        reply, _ = self.request("ack", {"lease": lease})
        return int(reply.get("acknowledged", 0))

    def close_queue(self) -> None:
        """Tell producers the run is over: tickets are refused from now on."""
        self.request("close")


def queue_metrics(stats: dict) -> dict[str, float]:
    """Flatten a `stats` reply into `{"queue/<name>": number}` for a metrics log line.

    Counters by reason become `queue/dropped_<reason>` and `queue/rejected_<code>`; the staleness
    histogram becomes `queue/staleness_<k>` plus `queue/staleness_mean` of trained groups.
    """
    flat: dict[str, float] = {}
    for key, value in stats.items():
        if isinstance(value, bool):
            flat[f"queue/{key}"] = float(value)
        elif isinstance(value, (int, float)):
            flat[f"queue/{key}"] = value
        elif key in ("dropped", "rejected", "staleness") and isinstance(value, dict):
            for name, count in value.items():
                flat[f"queue/{key}_{name}"] = count
    histogram = {int(k): v for k, v in stats.get("staleness", {}).items()}
    if histogram:
        flat["queue/staleness_mean"] = sum(k * v for k, v in histogram.items()) / sum(histogram.values())
    return flat

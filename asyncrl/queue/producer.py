"""The producer's side of the transfer queue, used by rollout servers: tickets, puts until held,
and the unsettled groups kept until the queue says they settled (so a queue restart loses nothing).
Large groups go through an arena in the queue's shared-memory directory when this process can see
it (shm.py). Must never import torch.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from asyncrl.protocol import TrajectoryGroup
from asyncrl.queue.codec import array_bytes, encode_group, encode_packed, group_parts, pack
from asyncrl.queue.requests import Client, Pending, QueueRequestError
from asyncrl.queue.shm import ProducerArena, reachable

MAX_STATUS_IDS = 4096
"""Most ids a producer asks about in one status request (the server takes up to 65,536)."""
PACK_TOKENS = 1 << 14
"""put_many packs a batch into 5 frames (instead of 5 per group) while groups average fewer response
tokens than this: per-frame costs dominate small groups, copies dominate large ones."""

log = logging.getLogger("asyncrl.queue")


class QueueProducer(Client):
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
        self._held_regions: set[int] = set()
        """Offsets of arena regions the queue said it holds (accepted puts), until it frees them."""
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
        self._drop_arena()  # the queue stops taking a producer's arena at its hello: the next put makes a new one
        reply = super().hello(role, version, trained)
        self._use_offer(reply.get("shm"))
        return reply

    # -- the arena (shm.py) ------------------------------------------------------------------

    def _use_offer(self, offer) -> None:
        """Follow the queue's shared-memory offer (hello, or status after the arena was dropped)."""
        directory = reachable(offer) if self.shm and self._shm_failures < 3 else None
        if directory != self._shm_dir:
            self._drop_arena()
        self._shm_dir = directory

    def _drop_arena(self) -> None:
        # Not unlinked: the queue may hold regions of it that a learner has still to read; the queue
        # removes it once they settle (or its directory at exit).
        if self.arena is not None:
            self.arena.close(unlink=False)
            self.arena = None
            self._held_regions.clear()

    def _encode(self, group: TrajectoryGroup) -> tuple[list, Optional[dict]]:
        """(frames, region): a large group's arrays go into the arena when the queue's directory is here."""
        if self._shm_dir is not None and array_bytes(group) >= self.shm_min_bytes:
            if self.arena is None:
                try:
                    self.arena = ProducerArena(self._shm_dir, self.name, self.arena_bytes)
                except OSError as exc:
                    log.warning("%s: no arena in %s (%s); sending arrays in the messages", self.name, self._shm_dir, exc)
                    self._shm_dir = None
            if self.arena is not None:
                header, parts = group_parts(group)
                ref = self.arena.write(parts)
                if ref is not None:
                    return [pack(header)], ref
        return encode_group(group), None

    def _put_request(self, fields: dict, frames: list, refs: list) -> Optional[dict]:
        """One put; frees the regions the queue reports it will not read again. None: the queue could
        not read the arena (it restarted), so the groups must be encoded and sent again."""
        return self._put_reply(*self._put_send(fields, frames, refs))

    def _put_send(self, fields: dict, frames: list, refs: list) -> tuple[Pending, list, list]:
        used = [r["offset"] for r in refs if r is not None]
        if used:
            fields = {**fields, "arena": self.arena.name, "shm": refs}
        return self.send("put", fields, frames), refs, used

    def _put_reply(self, request: Pending, refs: list, used: list) -> Optional[dict]:
        try:
            reply, _ = self.wait(request)
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
        if used:
            freed = set(reply.get("freed", ()))
            statuses = reply["statuses"] if "statuses" in reply else [reply.get("status")]
            self._held_regions.update(ref["offset"] for ref, status in zip(refs, statuses)
                                      if ref is not None and status in ("accepted", "duplicate") and ref["offset"] not in freed)
        self._freed(reply)
        return reply

    def _freed(self, reply: dict) -> None:
        if self.arena is not None:
            for offset in reply.get("freed", ()):
                self.arena.free(offset)
                self._held_regions.discard(offset)

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
                fields = {"ids": chunk}
                if self.arena is not None:
                    # What it believes the queue holds: any the queue does not is told free again.
                    fields.update(arena=self.arena.name, regions=sorted(self._held_regions)[: 1 << 16])
                reply, _ = self.request("status", fields)
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
        statuses = self._finish(self._start(groups, ticketed, wait_s, None))[0]
        self.reconcile()
        return statuses

    def put_and_ticket(self, groups: list[TrajectoryGroup], version: int, want: int,
                       ticketed: bool = True, wait_s: float = 0.01) -> tuple[list[str], int, bool]:
        """put_many, asking in the same message for `want` tickets at `version`: (statuses, granted, closed).

        Saves the ticket round trip of a producer that generates while it sends."""
        return self.finish_put(self.send_put(groups, version, want, ticketed, wait_s))

    def send_put(self, groups: list[TrajectoryGroup], version: int, want: int,
                 ticketed: bool = True, wait_s: float = 0.01) -> "BatchPut":
        """put_and_ticket's first message, sent without waiting for the reply: `finish_put` takes it (and
        sends again any groups the queue told to wait). A producer builds its next batch meanwhile, and
        may send it too before finishing this one: the queue answers each message in turn."""
        return self._start(groups, ticketed, wait_s, {"want": want, "version": version})

    def finish_put(self, put: "BatchPut") -> tuple[list[str], int, bool]:
        """(statuses, granted, closed) of a `send_put`, once every group is held."""
        statuses, reply = self._finish(put)
        self.reconcile()
        self.learner_version = int(reply.get("learner_version", self.learner_version))
        return statuses, int(reply.get("granted", 0)), bool(reply.get("closed"))

    def _start(self, groups: list[TrajectoryGroup], ticketed: bool, wait_s: float, ask: Optional[dict]) -> "BatchPut":
        packed = bool(groups) and sum(len(s.tokens) for g in groups for s in g.samples) < PACK_TOKENS * len(groups)
        put = BatchPut(groups, ticketed, wait_s, ask, packed, [None] * len(groups), list(range(len(groups))))
        if put.pending:
            self._send_pending(put)
        return put

    def _send_pending(self, put: "BatchPut") -> None:
        """One message holding the groups of `put` not yet held."""
        fields = {"ticketed": put.ticketed, "engine": self.name, "groups": len(put.pending)}
        refs = [None] * len(put.pending)
        if put.packed:
            headers, plens, frames = encode_packed([put.groups[i] for i in put.pending])
            fields.update(packed=True, headers=headers, plens=plens)
        else:
            frames = []  # encoded at each try: the queue frees the arena regions of groups told to wait
            for k, i in enumerate(put.pending):
                group_frames, refs[k] = self._encode(put.groups[i])
                frames.extend(group_frames)
        if put.ask is not None and not put.first:
            fields.update(put.ask)  # tickets are asked for once, in the first message
        put.sent = self._put_send(fields, frames, refs)

    def _finish(self, put: "BatchPut") -> tuple[list[str], dict]:
        pause = put.wait_s
        while put.pending:
            reply = self._put_reply(*put.sent)
            if reply is not None:  # None: the arena was dropped: sent again with the arrays in the messages
                put.first = put.first or reply
                waiting = []
                for i, status in zip(put.pending, reply["statuses"]):
                    if status == "wait":
                        waiting.append(i)
                    else:
                        put.statuses[i] = status
                        self._hold(put.groups[i], status)
                if len(waiting) == len(put.pending):
                    time.sleep(pause)
                    pause = min(pause * 2, 0.5)
                else:
                    pause = put.wait_s
                put.pending = waiting
            if put.pending:
                self._send_pending(put)
        return put.statuses, put.first


@dataclass
class BatchPut:
    """A batch of groups being put (see QueueProducer.send_put)."""

    groups: list[TrajectoryGroup]
    ticketed: bool
    wait_s: float
    ask: Optional[dict]
    """Tickets asked for in the first message: {"want": n, "version": v}."""
    packed: bool
    statuses: list
    pending: list[int]
    """Indices of the groups not yet held."""
    first: dict = field(default_factory=dict)
    """The first message's reply (it holds the tickets granted)."""
    sent: Optional[tuple] = None
    """The message in flight, as _put_send returned it."""

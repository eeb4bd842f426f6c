"""Clients of the transfer queue: `QueueConsumer` for learners (here) and `QueueProducer` for
rollout servers (producer.py, imported here too), both on requests.py's Lazy Pirate requests.
Must never import torch.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Callable, Optional

from asyncrl.protocol import TrajectoryGroup
from asyncrl.queue.codec import GROUP_FRAMES, ProtocolError, decode_groups, decode_packed
from asyncrl.queue.producer import QueueProducer
from asyncrl.queue.requests import Client, Pending, QueueRequestError, QueueTimeout
from asyncrl.queue.shm import ArenaReader, reachable

__all__ = ["QueueConsumer", "QueueProducer", "QueueRequestError", "QueueTimeout", "queue_metrics"]

log = logging.getLogger("asyncrl.queue")


class QueueConsumer(Client):
    """Used by learners: take a step's batch under a lease, acknowledge it after the step."""

    def __init__(
        self, address: str, name: str, vocab_size: Optional[int] = None, rank: Optional[int] = None, world: int = 1,
        verify: bool = False, shm: bool = True, shm_views: bool = False, **kwargs
    ):
        """`rank`/`world`: this learner's data-parallel rank; each rank then receives its whole-group share
        (groups / world) of the same step's batch. None keeps the plain get: the whole batch to this consumer.
        `verify`: check every array again (NaN, vocabulary, versions); off by default, since the server
        validated each group when it was put and sends its frames on unchanged. Headers and sizes are
        always checked. `shm`: read large groups' arrays from their producer's arena when this process
        sees the queue's shared-memory directory (shm.py); learned at hello. `shm_views`: hand those
        arrays out as read-only views of the arena instead of copies, valid only until the lease is
        acknowledged (the producer then writes the region again): for a caller that copies what it
        keeps before acknowledging, as the learner does when it builds its tensors."""
        super().__init__(address, name, **kwargs)
        self.shm = shm
        self.shm_views = shm_views
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
            self._close_reader()
            self._reader = ArenaReader(directory) if directory else None
        return reply

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def close(self) -> None:
        self._close_reader()
        super().close()

    def set_version(self, version: int) -> None:
        self.request("version", {"version": version})

    def try_get(self, version: int, groups: int, wait_ms: int = 0,
                ack: Optional[int] = None) -> tuple[Optional[int], list[TrajectoryGroup], bool]:
        """(lease, groups, closed): an empty list when fewer than `groups` are ready, after waiting up to
        `wait_ms` for them (the server holds the request and answers as soon as they are).

        `groups` is the whole step's batch; with a rank set, this rank receives groups / world of them.
        `ack`: the previous step's lease, acknowledged by the same message (saves a round trip per step)."""
        return self.take_batch(self.request_batch(version, groups, wait_ms, ack))

    def request_batch(self, version: int, groups: int, wait_ms: int = 0, ack: Optional[int] = None) -> Pending:
        """try_get's request, sent without waiting: `take_batch` takes the reply. With it a learner can ask
        for its next step's batch (`version` + 1) before it trains this one, so the batch travels meanwhile
        (the benchmark's consumer does; `Trainer` still asks after each step)."""
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
        return self.send("get", fields)

    def take_batch(self, request: Pending) -> tuple[Optional[int], list[TrajectoryGroup], bool]:
        """The reply to `request_batch`, as try_get returns it."""
        fields = request.fields
        try:
            reply, frames = self.wait(request)
        except QueueRequestError as exc:
            if exc.code != "instance_changed":
                raise
            # Before a restarted queue hands out anything, it must hear what this learner trained.
            self.hello("consumer", fields["version"])
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
                self._close_reader()
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
        """A reply's frames with each arena group's four arrays read from its region (copied unless shm_views)."""
        if not isinstance(refs, list) or len(refs) != count:
            raise ProtocolError("bad_shm", f"field 'shm' of a batch reply must list {count} regions or nils")
        out, at = [], 0
        for ref in refs:
            if ref is None:
                out.extend(buffers[at : at + 1 + GROUP_FRAMES])
                at += 1 + GROUP_FRAMES
            else:
                out.append(buffers[at])
                out.extend(self._reader.frames(ref, copy=not self.shm_views))
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

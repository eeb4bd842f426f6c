"""Requests to the transfer queue: one DEALER socket, replies matched by id, the Lazy Pirate pattern.

Each request waits for its reply with a timeout; on silence the client rebuilds its socket and
resends, which is safe because group ids make puts idempotent and get tokens make gets idempotent.
A peer that stays silent past all retries becomes a `QueueTimeout` naming the address, never a
hang. The base of `QueueProducer` (producer.py) and `QueueConsumer` (client.py). Must never import torch.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Optional

import zmq

from asyncrl.queue.codec import PROTOCOL_VERSION, pack, unpack_header
from asyncrl.security import dealer

log = logging.getLogger("asyncrl.queue")


class QueueTimeout(TimeoutError):
    pass


class QueueRequestError(RuntimeError):
    """The server refused a request; `code` is its counter name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Pending:
    """A request sent and not yet answered (see Client.send)."""

    op: str
    fields: dict
    frames: list
    req: int = 0
    tries: int = 0
    deadline: float = 0.0


class Client:
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
        self._outstanding: dict[int, Pending] = {}
        """Sent requests not yet answered, by request id."""
        self._early: dict[int, tuple[dict, list]] = {}
        """Replies that came while waiting for another request's."""
        self._connect()

    def _connect(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
        self._socket = dealer(self._ctx, self.address, self.curve, "queue")

    def request(self, op: str, fields: Optional[dict] = None, frames: list = ()) -> tuple[dict, list]:
        """Send a request and wait for its reply: (reply header, reply frames)."""
        return self.wait(self.send(op, fields, frames))

    def send(self, op: str, fields: Optional[dict] = None, frames: list = ()) -> "Pending":
        """Send a request without waiting; `wait` takes its reply. Several may be outstanding at once
        (the queue answers each in turn), so a client can prepare its next message meanwhile."""
        pending = Pending(op, fields or {}, list(frames))
        self._transmit(pending)
        return pending

    def _transmit(self, pending: "Pending") -> None:
        pending.req = next(self._req_ids)
        pending.tries += 1
        pending.deadline = time.monotonic() + self.timeout_s
        header = {"proto": PROTOCOL_VERSION, "op": pending.op, "req": pending.req, **pending.fields}
        self._socket.send_multipart([pack(header), *pending.frames], copy=False)
        self._outstanding[pending.req] = pending

    def wait(self, pending: "Pending") -> tuple[dict, list]:
        """The reply to a sent request. A reply to another outstanding request is kept for its own wait;
        on silence past the timeout the socket is rebuilt and every outstanding request sent again."""
        try:
            while True:
                if pending.req in self._early:
                    reply, frames = self._early.pop(pending.req)
                    return self._answer(pending, reply), frames
                left = pending.deadline - time.monotonic()
                if left > 0 and self._socket.poll(int(left * 1000) + 1, zmq.POLLIN):
                    reply_frames = self._socket.recv_multipart(copy=False)
                    reply = unpack_header(reply_frames[0].bytes)
                    req = reply.get("req")
                    if req == pending.req:
                        return self._answer(pending, reply), reply_frames[1:]
                    if isinstance(req, int) and req in self._outstanding:
                        self._early[req] = (reply, reply_frames[1:])
                    continue  # else a late answer to an earlier try
                if time.monotonic() < pending.deadline:
                    continue
                self._retry(pending)
        finally:
            self.tries = pending.tries
            self._outstanding.pop(pending.req, None)
            self._early.pop(pending.req, None)

    def _retry(self, pending: "Pending") -> None:
        if pending.tries > self.retries:
            raise QueueTimeout(
                f"queue at {self.address} did not answer {pending.op!r} within {self.timeout_s:.0f} s, {pending.tries} tries; "
                "is `asyncrl queue` (or the learner) running and reachable?"
            )
        log.warning("%s: queue at %s did not answer %r within %.0f s; reconnecting and resending (try %d of %d)",
                    self.name, self.address, pending.op, self.timeout_s, pending.tries + 1, self.retries + 1)
        # A new socket hears no reply to anything sent on the old one: every request not yet answered goes
        # again (replies already kept for their own wait stay kept).
        waiting = sorted((p for p in self._outstanding.values() if p.req not in self._early), key=lambda p: p.req)
        for other in waiting:
            del self._outstanding[other.req]
        self._connect()
        for other in waiting:
            self._transmit(other)

    def _answer(self, pending: "Pending", reply: dict) -> dict:
        if not reply.get("ok"):
            raise QueueRequestError(str(reply.get("code")), f"queue at {self.address} refused {pending.op}: {reply.get('error')}")
        if isinstance(reply.get("instance"), str) and reply["instance"] != self.instance:
            if self.instance is not None:
                log.warning("%s: the queue at %s restarted (instance %s, was %s)", self.name, self.address,
                            reply["instance"], self.instance)
            self._new_instance(reply["instance"])
        return reply

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



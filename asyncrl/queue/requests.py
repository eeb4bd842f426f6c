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
        self._pending: Optional[tuple[str, dict, list]] = None
        """(op, fields, frames) of the request sent and not yet answered (begin/complete)."""
        self._req = 0
        self._deadline = 0.0
        self._connect()

    def _connect(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
        self._socket = dealer(self._ctx, self.address, self.curve, "queue")

    def request(self, op: str, fields: Optional[dict] = None, frames: list = ()) -> tuple[dict, list]:
        """Send a request and wait for its reply: (reply header, reply frames)."""
        self.begin(op, fields, frames)
        return self.complete()

    def begin(self, op: str, fields: Optional[dict] = None, frames: list = ()) -> None:
        """Send a request without waiting; `complete` waits for its reply. One request at a time:
        between the two the caller may do its own work (encode the next batch), not send another."""
        if self._pending is not None:
            raise RuntimeError(f"{self.name}: a {self._pending[0]!r} request is still waiting for its reply; complete() it first")
        self._pending = (op, dict(fields or {}), list(frames))
        self.tries = 0
        self._send_pending()

    def _send_pending(self) -> None:
        op, fields, frames = self._pending
        self.tries += 1
        self._req = next(self._req_ids)
        header = {"proto": PROTOCOL_VERSION, "op": op, "req": self._req, **fields}
        self._socket.send_multipart([pack(header), *frames], copy=False)
        self._deadline = time.monotonic() + self.timeout_s

    def complete(self) -> tuple[dict, list]:
        """Wait for the reply to the request `begin` sent, resending it (Lazy Pirate) on silence."""
        if self._pending is None:
            raise RuntimeError(f"{self.name}: no request is waiting for a reply")
        op = self._pending[0]
        try:
            while True:
                while (left := self._deadline - time.monotonic()) > 0:
                    if not self._socket.poll(int(left * 1000) + 1, zmq.POLLIN):
                        break
                    reply_frames = self._socket.recv_multipart(copy=False)
                    reply = unpack_header(reply_frames[0].bytes)
                    if reply.get("req") != self._req:
                        continue  # a late answer to an earlier attempt
                    if not reply.get("ok"):
                        raise QueueRequestError(str(reply.get("code")), f"queue at {self.address} refused {op}: {reply.get('error')}")
                    if isinstance(reply.get("instance"), str) and reply["instance"] != self.instance:
                        if self.instance is not None:
                            log.warning("%s: the queue at %s restarted (instance %s, was %s)", self.name, self.address,
                                        reply["instance"], self.instance)
                        self._new_instance(reply["instance"])
                    return reply, reply_frames[1:]
                self._connect()
                if self.tries > self.retries:
                    raise QueueTimeout(
                        f"queue at {self.address} did not answer {op!r} within {self.timeout_s:.0f} s, {self.tries} tries; "
                        "is `asyncrl queue` (or the learner) running and reachable?"
                    )
                log.warning("%s: queue at %s did not answer %r within %.0f s; reconnecting and resending (try %d of %d)",
                            self.name, self.address, op, self.timeout_s, self.tries + 1, self.retries + 1)
                self._send_pending()
        finally:
            self._pending = None

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



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



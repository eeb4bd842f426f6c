"""Engine side of weight publication: fetch a newer version whole, verify it, or keep the old one.

`poll` asks the learner for anything newer than the version held. A reply that fails
verification, or none within the timeout, leaves the engine on its current weights (contract 6)
and the next poll asks again. Must never import learner code.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import zmq

from asyncrl.queue.codec import pack, unpack_header
from asyncrl.weights.codec import WeightsError, decode_state

log = logging.getLogger("asyncrl.weights")


class WeightReceiver:
    def __init__(self, address: str, engine_id: str, timeout_s: float = 30.0):
        self.address = address
        self.engine_id = engine_id
        self.timeout_s = timeout_s
        self.failures = 0
        self._ctx = zmq.Context.instance()
        self._socket: Optional[zmq.Socket] = None
        self._connect()

    def _connect(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
        self._socket = self._ctx.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.address)

    def poll(self, have: int) -> Optional[tuple[int, dict[str, torch.Tensor]]]:
        """(version, state) when the learner has a version newer than `have`, else None."""
        self._socket.send_multipart([pack({"have": have, "engine": self.engine_id})])
        if not self._socket.poll(int(self.timeout_s * 1000), zmq.POLLIN):
            self.failures += 1
            self._connect()  # drop the unanswered request so the next poll starts clean
            return None
        manifest_frame, *frames = self._socket.recv_multipart(copy=False)
        manifest = unpack_header(manifest_frame.bytes, max_bytes=64 << 20)
        if not manifest.get("ok") or manifest.get("unchanged"):
            return None
        try:
            state = decode_state(manifest, [f.buffer for f in frames])
        except (WeightsError, KeyError, TypeError) as exc:
            self.failures += 1
            log.warning("weights version %s from %s rejected, staying on %d: %s", manifest.get("version"), self.address, have, exc)
            return None
        return int(manifest["version"]), state

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None

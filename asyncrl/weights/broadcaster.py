"""Learner side of weight publication: serves the newest complete version to any engine that asks.

A background thread owns a ROUTER socket. `publish` snapshots the model's tensors into an encoded
version and swaps it in whole, so an engine only ever receives a complete version. Engines ask
with the version they hold and get the newer one, or a short 'unchanged' answer, and report the
version they run, so the learner knows every engine's version. Must never import rollout code.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
import zmq

from asyncrl.queue.codec import pack, unpack_header
from asyncrl.weights.codec import encode_state

log = logging.getLogger("asyncrl.weights")


class WeightBroadcaster:
    def __init__(self, address: str):
        self._ctx = zmq.Context.instance()
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._lock = threading.Lock()
        self._current: tuple[dict, list[bytes]] | None = None
        self.engine_versions: dict[str, int] = {}
        self.rejected = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="weights", daemon=True)
        self._thread.start()

    @property
    def version(self) -> int:
        with self._lock:
            return -1 if self._current is None else self._current[0]["version"]

    def publish(self, model: torch.nn.Module, version: int) -> float:
        """Snapshot the model as `version`; returns the seconds the snapshot took."""
        start = time.perf_counter()
        with torch.no_grad():
            encoded = encode_state(dict(model.state_dict()), version)
        with self._lock:
            self._current = encoded
        return time.perf_counter() - start

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(100, zmq.POLLIN):
                continue
            identity, *body = self._socket.recv_multipart()
            try:
                header = unpack_header(body[0]) if body else {}
                have = header.get("have")
                engine = str(header.get("engine", "?"))
                if not isinstance(have, int) or isinstance(have, bool):
                    raise ValueError(f"field 'have' must be an integer, got {have!r}")
            except ValueError as exc:
                self.rejected += 1
                self._socket.send_multipart([identity, pack({"ok": False, "error": str(exc)})])
                continue
            self.engine_versions[engine] = have
            with self._lock:
                current = self._current
            if current is None or current[0]["version"] <= have:
                latest = -1 if current is None else current[0]["version"]
                self._socket.send_multipart([identity, pack({"ok": True, "version": latest, "unchanged": True})])
                continue
            manifest, frames = current
            self._socket.send_multipart([identity, pack({"ok": True, **manifest}), *frames], copy=False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._socket.close(0)

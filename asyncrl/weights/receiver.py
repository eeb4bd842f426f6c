"""Engine side of weight publication: fetch a newer version whole and verified, or keep the old one.

`fetch` asks the learner for any version other than the one held (newer, or older after the learner
resumed from a checkpoint) and returns it only once every
bucket has arrived and passed its checksum (over ``ipc`` on CUDA: the learner's sums of its bytes,
computed on the device; over nccl: its size); a bucket that is damaged, missing, late, or whose ipc
handle cannot be opened leaves the engine on its current weights (contract 6), and the next call
asks again from scratch. An ``ipc`` fetch says where the engine runs (``host``: boot and
namespaces; ``gpus``: the UUIDs it sees), so a learner elsewhere answers over zmq instead. Every
answer carries the learner's newest version (`learner_version`), which the staleness gate uses.
`ack` tells the learner which version the engine now runs.

`Prefetcher` runs a receiver on a thread so an engine keeps generating while a version
downloads; the engine only stops for the swap itself. Must never import learner or rollout code.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

import torch
import zmq

from asyncrl.queue.codec import ProtocolError, pack, unpack_header
from asyncrl.security import dealer
from asyncrl.weights.codec import WeightsError, tensors_from_buckets, verify_bucket
from asyncrl.weights.ipc import host_identity, open_buckets
from asyncrl.weights.ipc_handles import visible_gpus
from asyncrl.weights.transport import TRANSPORTS, GroupReceiver, map_buckets

log = logging.getLogger("asyncrl.weights")

Fetched = tuple[dict, list]
"""(manifest, bucket buffers) of one complete, verified version."""


class WeightReceiver:
    def __init__(self, address: str, engine_id: str, timeout_s: float = 30.0, transport: str = "zmq",
                 group: Optional[GroupReceiver] = None, curve=None):
        """`curve`: an `asyncrl.security.Curve`; the learner must then prove its key (only it publishes)."""
        if transport not in TRANSPORTS:
            raise WeightsError(f"weights.transport={transport!r}; choose one of {', '.join(TRANSPORTS)}")
        if transport in ("gloo", "nccl") and group is None:
            raise WeightsError(f"weights.transport={transport!r} needs a GroupReceiver (see transport.open_group)")
        self.address = address
        self.engine_id = engine_id
        self.timeout_s = timeout_s
        self.transport = transport
        self.group = group
        self.curve = curve
        self.failures = 0
        self.learner_version = -1
        self.cancel = threading.Event()
        """Set to make a waiting fetch give up within 0.1 s (shutting down)."""
        self._ctx = zmq.Context.instance()
        self._socket: Optional[zmq.Socket] = None
        self._connect()

    def _connect(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
        self._socket = dealer(self._ctx, self.address, self.curve, "weights")

    def _fail(self, have: int, why: str) -> None:
        self.failures += 1
        log.warning("%s: weights fetch failed, staying on version %d and asking again: %s", self.engine_id, have, why)
        self._connect()  # drops whatever is still in flight, so the next request starts clean

    def _recv(self, have: int, awaited: str = "answer") -> Optional[list[zmq.Frame]]:
        """The next message, or None after `timeout_s`; `awaited` names it in the log (a cut transfer says which bucket)."""
        deadline = time.monotonic() + self.timeout_s
        while not self._socket.poll(100, zmq.POLLIN):
            if self.cancel.is_set():
                self._connect()
                return None
            if time.monotonic() > deadline:
                self._fail(have, f"no {awaited} within {self.timeout_s} s from {self.address}")
                return None
        return self._socket.recv_multipart(copy=False)

    def fetch(self, have: int, running: Optional[int] = None) -> Optional[Fetched]:
        """The learner's version if it differs from `have`, complete and verified; else None."""
        request = {"op": "fetch", "have": have, "running": have if running is None else running,
                   "engine": self.engine_id, "transport": self.transport}
        if self.group is not None and self.group.failed is not None:
            request["transport"] = "zmq"  # the group broke; fetch the bytes over the socket instead
        if request["transport"] == "ipc":
            request.update(host=host_identity(), gpus=list(visible_gpus()))
        self._socket.send_multipart([pack(request)])
        frames = self._recv(have)
        if frames is None:
            return None
        try:
            manifest = unpack_header(frames[0].bytes, max_bytes=64 << 20)
        except ProtocolError as exc:
            self._fail(have, str(exc))
            return None
        if not manifest.get("ok"):
            self._fail(have, f"learner refused the request: {manifest.get('error')}")
            return None
        version = manifest.get("version")
        if isinstance(version, int):
            self.learner_version = version  # the learner's word, even backwards (resumed from a checkpoint)
        if manifest.get("unchanged"):
            return self.group.take(have) if request["transport"] in ("gloo", "nccl") else None
        try:
            if manifest.get("transport") == "shm":
                buffers = map_buckets(manifest["path"], manifest)
                for index, buf in enumerate(buffers):
                    verify_bucket(manifest, index, buf)
            elif manifest.get("transport") == "ipc":
                buffers = open_buckets(manifest)
            else:
                buffers = self._stream(manifest, have)
                if buffers is None:
                    return None
        except (WeightsError, OSError, KeyError, TypeError) as exc:
            self._fail(have, f"version {version} rejected: {exc}")
            return None
        return manifest, buffers

    def _stream(self, manifest: dict, have: int) -> Optional[list]:
        """Receive and verify the buckets as they arrive (checksumming overlaps the transfer)."""
        buffers = []
        count = len(manifest["buckets"])
        for index in range(count):
            frames = self._recv(have, f"bucket {index + 1} of {count} of version {manifest['version']}")
            if frames is None:
                return None
            header = unpack_header(frames[0].bytes)
            if header.get("version") != manifest["version"] or header.get("bucket") != index or len(frames) != 2:
                raise WeightsError(f"expected bucket {index} of version {manifest['version']}, got {header}")
            verify_bucket(manifest, index, frames[1].buffer)
            buffers.append(frames[1].buffer)
        return buffers

    def poll(self, have: int) -> Optional[tuple[int, dict[str, torch.Tensor]]]:
        """(version, state) when the learner has a verified version other than `have`, else None."""
        fetched = self.fetch(have)
        if fetched is None:
            return None
        manifest, buffers = fetched
        return int(manifest["version"]), tensors_from_buckets(manifest, buffers)

    def ack(self, version: int) -> bool:
        """Tell the learner this engine now runs `version`; False if it did not answer in time."""
        self._socket.send_multipart([pack({"op": "ack", "engine": self.engine_id, "version": version})])
        frames = self._recv(version)
        return frames is not None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None


class Prefetcher:
    """Runs a WeightReceiver on its own thread and holds the newest verified version until taken.

    The engine's loop calls `ready()` between decode steps (cheap, no I/O) and `take()` when it is
    ready to swap; `running(v)` reports the version it then runs, which the thread acknowledges.
    """

    def __init__(self, receiver: WeightReceiver, running: int = -1, interval_s: float = 0.05):
        self.receiver = receiver
        self.interval_s = interval_s
        self._running = running
        self._acked = running
        self._staged: Optional[tuple[int, dict[str, torch.Tensor]]] = None
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"weights-{receiver.engine_id}", daemon=True)
        self._thread.start()

    @property
    def learner_version(self) -> int:
        return self.receiver.learner_version

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                running = self._running
                # The staged version, when there is one, even if older than the running one: a
                # learner resumed from a checkpoint went back, and the engine must follow it.
                have = self._staged[0] if self._staged else running
            if running != self._acked and self.receiver.ack(running):
                self._acked = running
            fetched = self.receiver.fetch(have, running)
            if fetched is not None:
                manifest, buffers = fetched
                staged = (int(manifest["version"]), tensors_from_buckets(manifest, buffers))
                with self._lock:
                    self._staged = staged  # replaces an older staged version that was never taken
                    self._arrived.notify_all()
                continue
            self._stop.wait(self.interval_s)

    def ready(self) -> bool:
        with self._lock:
            return self._staged is not None

    def take(self) -> Optional[tuple[int, dict[str, torch.Tensor]]]:
        with self._lock:
            staged, self._staged = self._staged, None
            return staged

    def wait(self, timeout_s: float, stop: Callable[[], bool] = lambda: False) -> bool:
        """Block until a version is staged (True) or timeout/stop (False)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._staged is None and not stop():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._arrived.wait(min(left, 0.05))
            return self._staged is not None

    def running(self, version: int) -> None:
        with self._lock:
            self._running = version

    def close(self) -> None:
        self._stop.set()
        self.receiver.cancel.set()
        self._thread.join(timeout=5)
        self.receiver.close()

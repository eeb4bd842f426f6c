"""Learner side of weight publication: keeps the newest complete version and serves it to engines.

`publish` copies the model out bucket by bucket (see codec.iter_buckets) into a new `Published`
version and only then makes it current, so an engine only ever sees complete versions. A
background thread owns a ROUTER socket and answers two requests:

- ``fetch`` {have, running, engine, transport}: 'unchanged' (with the learner's newest version,
  which engines use for their staleness gate), or the manifest followed by one message per bucket
  (``zmq``), or the manifest and the shared-memory file to map (``shm``), or the manifest and one
  cross-process tensor handle per bucket (``ipc``, reduced anew for each fetch: see weights/ipc.py;
  only to an engine whose ``host`` is the learner's and whose ``gpus`` include the buckets' GPU,
  others get ``zmq``).
  Engines in a gloo/nccl group get the data pushed by `GroupPublisher` and use fetch only to learn
  the version.
- ``ack`` {engine, version}: the engine now runs `version`.

`engine_versions` is what every engine last said it runs. Must never import rollout code.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterable, Optional, Union

import torch
import zmq

from asyncrl.queue.codec import pack, unpack_header
from asyncrl.weights.codec import DEFAULT_BUCKET_BYTES
from asyncrl.weights.ipc import IpcVersion, host_identity
from asyncrl.weights.ipc_drain import GRACE_S, Draining
from asyncrl.weights.transport import GroupPublisher, Published, snapshot

log = logging.getLogger("asyncrl.weights")

KEEP_SHARED = 2
"""Versions kept in shared memory (a file, ipc buffers): the newest and the one before, so an engine
that got the previous manifest a moment before a publish can still map its file or open its handles.
Older ipc versions then drain (`ipc_drain.Draining`) before they are freed."""


def named_tensors(model: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """The model's state, each storage once: tied tensors (an output head sharing the embedding)
    are sent under their first name only, and engines re-tie them."""
    seen = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        yield name, tensor


class WeightBroadcaster:
    def __init__(self, address: str, bucket_bytes: int = DEFAULT_BUCKET_BYTES, shm_dir: Optional[str] = None,
                 group: Optional[GroupPublisher] = None, curve=None, ipc: bool = False, ipc_grace_s: float = GRACE_S):
        """`curve`: an `asyncrl.security.Curve`; serves with the learner's key to authorized engines only.
        `ipc`: also keep each version on the model's device for ``ipc`` engines (weights/ipc.py);
        `ipc_grace_s`: how long after its last send a discarded ipc version is freed (ipc_drain.py)."""
        self.bucket_bytes = bucket_bytes
        self.shm_dir = shm_dir
        self.ipc = ipc
        self.ipc_off: Optional[str] = None
        """Why this learner stopped sending ipc handles (torch failed to share a bucket), or None."""
        self._draining = Draining(ipc_grace_s)
        self._host = host_identity()
        self.group = group
        self._ctx = zmq.Context.instance()
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # Bucket frames reference the published buffers (zero copy), so queueing them costs no
        # memory; a bounded queue would make ZeroMQ silently drop buckets to a slow engine.
        self._socket.setsockopt(zmq.SNDHWM, 0)
        if curve is not None:
            curve.server(self._socket, "weights")
        self._socket.bind(address)
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._lock = threading.Lock()
        self._current: Optional[Published] = None
        self._kept: list[Published] = []
        self.engine_versions: dict[str, int] = {}
        self.rejected = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="weights", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, wc, group: Optional[GroupPublisher] = None, curve=None) -> "WeightBroadcaster":
        """From `asyncrl.config.WeightsConfig`."""
        return cls(wc.address, bucket_bytes=wc.bucket_bytes, shm_dir=wc.shm_dir, group=group, curve=curve, ipc=wc.ipc)

    @property
    def ipc_released(self) -> int:
        """CUDA reference counters this learner released itself: replies no engine took (ipc_drain.py)."""
        return self._draining.released

    @property
    def version(self) -> int:
        with self._lock:
            return -1 if self._current is None else self._current.version

    def publish(self, model: Union[torch.nn.Module, Iterable[tuple[str, torch.Tensor]]], version: int) -> float:
        """Snapshot `model` (a module, or (name, tensor) pairs such as a ZeRO-3 gathering generator)
        as `version`; returns the seconds it took. The version is served only once complete."""
        start = time.perf_counter()
        tensors = named_tensors(model) if isinstance(model, torch.nn.Module) else model
        with torch.no_grad():
            try:
                published = snapshot(tensors, version, self.bucket_bytes, self.shm_dir, self.ipc)
            except (OSError, RuntimeError) as exc:  # RuntimeError: torch's, shared memory or the device full
                if (self.shm_dir is None and not self.ipc) or not isinstance(model, torch.nn.Module):
                    raise
                log.warning("cannot keep version %d in shared memory (%s); keeping it in the learner's memory, "
                            "engines fetch over zmq", version, exc)
                published = snapshot(named_tensors(model), version, self.bucket_bytes, None)
        with self._lock:
            self._current = published
            if published.shared:
                self._kept.append(published)
                while len(self._kept) > KEEP_SHARED:
                    self._retire(self._kept.pop(0))
        if self.group is not None:
            self.group.offer(published)
        return time.perf_counter() - start

    def _retire(self, published: Published) -> None:
        if published.ipc is not None:
            self._draining.add(published.ipc, time.monotonic())
        published.discard()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._draining.sweep(time.monotonic())
            if not self._socket.poll(100, zmq.POLLIN):
                continue
            identity, *body = self._socket.recv_multipart()
            try:
                header = unpack_header(body[0]) if body else {}
                self._answer(identity, header)
            except ValueError as exc:
                self.rejected += 1
                self._socket.send_multipart([identity, pack({"ok": False, "error": str(exc)})])

    def _answer(self, identity: bytes, header: dict) -> None:
        op = header.get("op", "fetch")
        engine = str(header.get("engine", "?"))
        if op == "ack":
            self.engine_versions[engine] = _integer(header, "version")
            self._socket.send_multipart([identity, pack({"ok": True})])
            return
        if op != "fetch":
            raise ValueError(f"unknown op {op!r}; expected 'fetch' or 'ack'")
        have = _integer(header, "have")
        self.engine_versions[engine] = _integer(header, "running") if "running" in header else have
        with self._lock:
            current = self._current
        transport = header.get("transport", "zmq")
        # Any version other than `have` is sent, an older one too: a learner resumed from a
        # checkpoint is behind its engines, whose weights it no longer has.
        if current is None or current.version == have or transport in ("gloo", "nccl"):
            latest = -1 if current is None else current.version
            self._socket.send_multipart([identity, pack({"ok": True, "version": latest, "unchanged": True})])
            return
        if transport == "shm" and current.path is not None:
            self._socket.send_multipart([identity, pack({"ok": True, "transport": "shm", "path": current.path, **current.manifest})])
            return
        if transport == "ipc" and self._send_handles(identity, header, current):
            return
        self._socket.send_multipart([identity, pack({"ok": True, "transport": "zmq", **current.manifest})])
        for index, buf in enumerate(current.buffers):
            self._socket.send_multipart([identity, pack({"version": current.version, "bucket": index}), buf], copy=False)

    def _send_handles(self, identity: bytes, header: dict, current: Published) -> bool:
        """Answer with one handle per ipc bucket; False (the caller sends over zmq) when this version
        has none, the engine cannot open them, or torch cannot share them."""
        version = current.ipc  # read once: a publish may discard this version meanwhile
        if version is None or self.ipc_off is not None or not self._reaches(header, version):
            return False
        now = time.monotonic()
        try:
            handles = self._share(version, now)
        except Exception as exc:
            # Off for good: a reduction that failed inside torch may have taken a reference counter
            # this code cannot name, and each would pin a version's buckets in the learner's memory.
            self.ipc_off = f"{type(exc).__name__}: {exc}"
            log.warning("cannot share version %d's buckets over ipc (%s); engines fetch over zmq from now on",
                        current.version, self.ipc_off)
            return False
        if handles is None:
            return False
        reply = {"ok": True, "transport": "ipc", "handles": handles, "open_by": now + self._draining.open_window_s}
        self._socket.send_multipart([identity, pack({**reply, **current.manifest})])
        return True

    def _share(self, version: IpcVersion, now: float) -> Optional[list]:
        """One reply's handles (a method so that a test double can make torch's reduction fail)."""
        return version.share(now)

    def _reaches(self, header: dict, version: IpcVersion) -> bool:
        """Whether the asking engine shares this host (boot, IPC and time namespace) and sees the buckets' GPUs."""
        gpus = header.get("gpus")
        return (self._host is not None and header.get("host") == self._host
                and isinstance(gpus, list) and all(gpu in gpus for gpu in version.gpus))

    def close(self) -> None:
        """Stop serving and free every version; ipc versions still in their grace period are dropped
        unsettled (an engine may be copying one: torch's limbo keeps it until the learner exits)."""
        self._stop.set()
        self._thread.join(timeout=2)
        self._socket.close(0)
        if self.group is not None:
            self.group.close()
        for published in self._kept:
            self._retire(published)
        self._kept.clear()
        self._draining.close(time.monotonic())


def _integer(header: dict, key: str) -> int:
    value = header.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"field {key!r} must be an integer, got {value!r}")
    return value

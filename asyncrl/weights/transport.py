"""How the bytes of a weight version travel: where the learner keeps them and how an engine gets them.

One control plane, three data planes. Every engine talks to the learner's broadcaster over one
ZeroMQ socket (ask for anything newer than what it holds, acknowledge what it runs); the buckets
then come by the transport that engine chose (`weights.transport`):

- ``zmq``: the buckets stream over that same socket, one message per bucket, zero-copy on the
  learner side. Works on CPU and across hosts; the default.
- ``shm``: the learner keeps each version in one file under a shared-memory directory (/dev/shm);
  an engine on the same host maps it and copies straight from the page cache, so the bytes are
  written once however many engines read them. An engine falls back to ``zmq`` when the learner
  keeps no file (another host, or the learner was started without a shared-memory directory).
- ``ipc``: the learner also keeps each version as one flat uint8 tensor per bucket on its device
  (`weights.ipc`); an engine on the same host opens them through torch's cross-process handles
  (CUDA IPC on a GPU) and copies them (`asyncrl.weights.ipc`). Falls back to ``zmq`` when the
  learner keeps none, or the engine is on another host (or container) or cannot see its GPU.
- ``gloo`` / ``nccl``: a torch.distributed group of the learner (rank 0) and the engines, built
  from a TCPStore rendezvous without touching the default process group (the stateless-group
  scheme vLLM and SGLang accept for weight updates). The learner pushes each new version as one
  broadcast of the manifest and one per bucket, from a thread, so training never waits on it.

Never imports learner or rollout code.
"""

from __future__ import annotations

import datetime
import logging
import mmap
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Iterable, Optional
from urllib.parse import urlparse

import msgpack
import torch
import torch.distributed as dist

from asyncrl.weights.codec import WeightsError, iter_buckets, make_manifest, verify_bucket
from asyncrl.weights.ipc import DeviceBuckets, IpcVersion

log = logging.getLogger("asyncrl.weights")

TRANSPORTS = ("zmq", "shm", "ipc", "gloo", "nccl")


@dataclass
class Published:
    """One complete version as the learner keeps it: manifest and one buffer per bucket."""

    manifest: dict
    buffers: list
    path: Optional[str] = None
    """The shared-memory file holding the buckets back to back, when there is one."""
    ipc: Optional[IpcVersion] = None
    """The buckets again as flat uint8 tensors on the learner's device, for ``ipc`` engines, when kept."""

    @property
    def version(self) -> int:
        return self.manifest["version"]

    @property
    def shared(self) -> bool:
        """Whether engines reach this version outside the learner's socket (a file or ipc buffers)."""
        return self.path is not None or self.ipc is not None

    def discard(self) -> None:
        """Unlink the file and stop serving the ipc buffers (the broadcaster hands them to
        `ipc_drain.Draining` first); engines that mapped the file keep their mapping."""
        self.ipc = None
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def snapshot(named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, bucket_bytes: int,
             shm_dir: Optional[str] = None, ipc: bool = False) -> Published:
    """Copy a version out of the learner bucket by bucket, into memory or into one shared-memory file,
    and with `ipc` also into one flat tensor per bucket on the tensors' device.

    With a file, each bucket is written and dropped, so the only full-size host copy is the file.
    """
    device = DeviceBuckets() if ipc else None
    buckets = device.buckets(named_tensors, bucket_bytes) if device else iter_buckets(named_tensors, bucket_bytes)
    if shm_dir is None:
        buckets = list(buckets)
        return Published(make_manifest(version, buckets), [b.data for b in buckets], ipc=device.finish() if device else None)
    path = os.path.join(shm_dir, f"asyncrl-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}-v{version}")
    metas = []
    try:
        with open(path, "wb") as f:
            for bucket in buckets:
                f.write(bucket.data)
                metas.append(bucket.meta())
        manifest = {"version": version, "buckets": metas, "nbytes": sum(m["nbytes"] for m in metas)}
        return Published(manifest, map_buckets(path, manifest), path, ipc=device.finish() if device else None)
    except BaseException:
        if os.path.exists(path):
            os.unlink(path)
        raise


def map_buckets(path: str, manifest: dict) -> list[memoryview]:
    """Read-only views of each bucket of a version file (no copy)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != manifest["nbytes"]:
            raise WeightsError(f"shared-memory file {path} holds {size} bytes, the manifest says {manifest['nbytes']}")
        whole = memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)) if size else memoryview(b"")
    views, offset = [], 0
    for meta in manifest["buckets"]:
        views.append(whole[offset : offset + meta["nbytes"]])
        offset += meta["nbytes"]
    return views


# --- torch.distributed (gloo on CPU, nccl on GPU) --------------------------------------------------


def open_group(init: str, rank: int, world_size: int, backend: str = "gloo", timeout_s: float = 60.0):
    """A process group of the learner (rank 0) and engines (1..world_size-1), outside the default group.

    `init` is tcp://host:port where rank 0 listens for the rendezvous. Every collective times out
    after timeout_s, so a peer that died makes the others fail loudly instead of hanging.
    """
    if backend not in ("gloo", "nccl"):
        raise WeightsError(f"backend {backend!r}: use 'gloo' (CPU) or 'nccl' (GPU)")
    if not 0 <= rank < world_size:
        raise WeightsError(f"rank {rank} is outside the group of {world_size}; the learner is 0, engines 1..{world_size - 1}")
    url = urlparse(init)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise WeightsError(f"weights group address {init!r} must look like tcp://127.0.0.1:29600")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(url.hostname, url.port, world_size, rank == 0, timeout=timeout)
    store = dist.PrefixStore("asyncrl-weights", store)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise WeightsError("backend 'nccl' needs a CUDA device; use 'gloo' on CPU")
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def open_engine_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
                      backend: str = "nccl", timeout_s: float = 600.0):
    """A process group formed the way an engine server forms its side of a weight-update group
    (SGLang's `/init_weights_update_group`; vLLM, verl and AReaL do the same): torch's tcp://
    rendezvous at master_address:master_port (rank 0 hosts the store), a PrefixStore named after
    the group, and torch's own process-group constructor, so both sides derive the same store keys.
    It is not torch's default group, and is registered under `group_name` (once per process).

    The constructor is private torch API (`_new_process_group_helper`); it is what the engines call,
    and matching them is the point. A peer that never joins is an error after timeout_s.
    """
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    if backend not in ("gloo", "nccl"):
        raise WeightsError(f"engine group backend {backend!r}: use 'nccl' (GPU) or 'gloo' (CPU, tests)")
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}  # what dist.broadcast(group=...) looks up
    return group


def broadcast(group, tensor: torch.Tensor) -> None:
    """Rank 0's tensor into every rank's `tensor`, in `group` (a group from open_group or open_engine_group)."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def _device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def group_send(group, backend: str, published: Published) -> None:
    """Rank 0: push one version to every rank (manifest length, manifest, then each bucket)."""
    device = _device(backend)
    header = msgpack.packb(published.manifest, use_bin_type=True)
    broadcast(group, torch.tensor([len(header)], dtype=torch.int64, device=device))
    broadcast(group, torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device))
    for buf in published.buffers:
        if len(buf):
            broadcast(group, torch.frombuffer(bytearray(buf) if device.type == "cpu" else buf, dtype=torch.uint8).to(device))


def group_receive(group, backend: str) -> tuple[dict, list]:
    """Ranks > 0: receive one version; CPU buckets are checksummed, NCCL ones are size-checked."""
    device = _device(backend)
    length = torch.zeros(1, dtype=torch.int64, device=device)
    broadcast(group, length)
    header = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    broadcast(group, header)
    manifest = msgpack.unpackb(header.cpu().numpy().tobytes(), raw=False, strict_map_key=True)
    buffers = []
    for index, meta in enumerate(manifest["buckets"]):
        data = torch.empty(meta["nbytes"], dtype=torch.uint8, device=device)
        if meta["nbytes"]:
            broadcast(group, data)
        if device.type == "cpu":
            # CPU: verify like any other transport. NCCL checks its own transfers; copying a
            # bucket back to the host only to checksum it would cost more than the broadcast.
            verify_bucket(manifest, index, data.numpy())
            buffers.append(data.numpy())
        else:
            buffers.append(data)
    return manifest, buffers


class GroupPublisher:
    """Learner side of a gloo/nccl group: a thread that pushes the newest published version."""

    def __init__(self, group, backend: str):
        self.group, self.backend = group, backend
        self.sent = -1
        self.failed: Optional[str] = None
        self._pending: Optional[Published] = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="weights-group", daemon=True)
        self._thread.start()

    def offer(self, published: Published) -> None:
        with self._cond:
            self._pending = published  # a newer version replaces one not yet sent: engines want the newest
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                published, self._pending = self._pending, None
            try:
                group_send(self.group, self.backend, published)
                self.sent = published.version
            except Exception as exc:  # a peer died or timed out; the group is unusable from here on
                self.failed = f"{type(exc).__name__}: {exc}"
                log.error("weights group broken at version %d, engines must fetch over zmq: %s", published.version, exc)
                return

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=1)


class GroupReceiver:
    """Engine side of a gloo/nccl group: a thread that receives each pushed version, verified."""

    def __init__(self, group, backend: str):
        self.group, self.backend = group, backend
        self.failed: Optional[str] = None
        self._latest: Optional[tuple[dict, list]] = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="weights-group", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                received = group_receive(self.group, self.backend)
            except WeightsError as exc:
                log.warning("weights version over the group rejected: %s", exc)
                continue
            except Exception as exc:
                self.failed = f"{type(exc).__name__}: {exc}"
                log.error("weights group broken, falling back to zmq: %s", exc)
                return
            with self._lock:
                self._latest = received

    def take(self, have: int) -> Optional[tuple[dict, list]]:
        with self._lock:
            latest = self._latest
        if latest is None or latest[0]["version"] <= have:
            return None
        return latest

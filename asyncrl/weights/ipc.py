"""The ``ipc`` transport: an engine on the learner's host opens the learner's own copy of each bucket
through torch's cross-process tensor handles and copies it into its own memory.

With `weights.ipc` on, the learner keeps each published version a second time, as one flat uint8
tensor per bucket on the model's device (`DeviceBuckets` → `IpcVersion`): device memory for a GPU
learner (CUDA IPC), a named shared-memory file for a CPU one (torch's ``file_system`` sharing; a
file descriptor would need a Unix socket to travel). For each fetch the learner reduces those
tensors with torch's own reduction and sends only primitive fields in the msgpack reply, never
pickle (contract 5; the wire form is `ipc_handles`). The engine rebuilds each bucket with torch's
own rebuild function, copies it at once onto its own device, checks the copy and drops the view.

Why copy at once: the learner keeps only its newest versions (`broadcaster.KEEP_SHARED`) and lets
go of older ones through `ipc_drain.Draining`. A CUDA bucket that an engine still holds stays out
of the learner's allocator (torch's "limbo", counted per send by torch's cross-process reference
counter) until the engine lets go; an engine holding views would pin old versions there.

What each side checks: the learner sends handles only to an engine on its host (`host_identity`:
same boot, IPC and time namespace) that can see its GPU (by UUID), and tells it until when it may
open them (``open_by``, on the host's monotonic clock); later the learner may free them. The engine
checks every field before opening anything, and every copy against the bucket's `bucket_sums`
(computed by the learner at publish, on its device): on CUDA that is the check instead of the
host-side xxh3, which would copy the bucket to the host; on CPU both run.

Never imports learner or rollout code.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import reduce_tensor

from asyncrl.weights.codec import Bucket, WeightsError, iter_buckets, raw_bytes, verify_bucket
from asyncrl.weights.ipc_handles import Handle, Parsed, encode, gpu_uuid, parse, release

SUM_ROW = 4096
"""`bucket_sums` weighs each row of this many bytes by its position, so swapped rows or buckets show."""

SUM_CHUNK = 2048 * SUM_ROW
"""Bytes summed per step: they are widened to int64 first, so a step needs 8x this in temporaries."""


def host_identity() -> Optional[dict]:
    """What an engine must share with the learner to open its handles: the boot (another host or a
    reboot never matches), the IPC namespace (CUDA IPC and /dev/shm; containers without
    ``--ipc=host`` differ) and the time namespace (``open_by`` is a monotonic-clock time). None off Linux."""
    identity = _host_identity()
    return dict(identity) if identity is not None else None


@functools.cache
def _host_identity() -> Optional[tuple]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            identity = {"boot_id": f.read().strip()}
    except OSError:
        return None
    for name in ("ipc", "time"):
        try:
            identity[f"{name}_ns"] = os.stat(f"/proc/self/ns/{name}").st_ino
        except OSError:  # an old kernel (no time namespaces) or a locked-down /proc: the boot alone
            pass
    return tuple(identity.items())


def bucket_sums(bucket: torch.Tensor) -> list[int]:
    """[sum of the bytes, sum of each SUM_ROW-byte row's sum times (its index mod 65521) + 1] of a
    flat uint8 tensor, computed where it lives: two reductions, cheap next to a copy, and they
    differ for another bucket's bytes or rows in another order. The weights wrap so that neither
    sum overflows int64 below 512 GiB."""
    total = torch.zeros((), dtype=torch.int64, device=bucket.device)
    weighted = torch.zeros((), dtype=torch.int64, device=bucket.device)
    for start in range(0, bucket.numel(), SUM_CHUNK):
        part = bucket[start : start + SUM_CHUNK].to(torch.int64)
        if part.numel() % SUM_ROW:  # the last row, zero-filled
            part = F.pad(part, (0, SUM_ROW - part.numel() % SUM_ROW))
        rows = part.view(-1, SUM_ROW).sum(dim=1)
        first = start // SUM_ROW
        weights = torch.arange(first, first + rows.numel(), device=bucket.device) % 65521 + 1
        total += rows.sum()
        weighted += (rows * weights).sum()
    return torch.stack([total, weighted]).tolist()


# --- learner side ---------------------------------------------------------------------------------


class DeviceBuckets:
    """Builds, next to `iter_buckets`' host buckets, the same buckets as flat uint8 tensors on the
    device the tensors live on, with the same byte layout (so one manifest describes both)."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self._pending: list[torch.Tensor] = []

    def buckets(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
        """`iter_buckets(named_tensors, bucket_bytes)`, each bucket mirrored before it is handed on."""
        for bucket in iter_buckets(self._keep(named_tensors), bucket_bytes):
            self._close(len(bucket.tensors), len(bucket.data))
            yield bucket

    def _keep(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        # A copy of each tensor's bytes on its own device: the pair may be a gathered parameter
        # (ZeRO-3) that is only valid until the next one is asked for.
        for name, tensor in named_tensors:
            self._pending.append(raw_bytes(tensor).clone())
            yield name, tensor

    def _close(self, count: int, nbytes: int) -> None:
        # iter_buckets finishes a bucket when the next tensor does not fit, so that tensor's copy
        # may already be pending: the bucket is the oldest `count` copies.
        parts, self._pending = self._pending[:count], self._pending[count:]
        buffer = _allocate(nbytes, parts[0].device)
        offset = 0
        for part in parts:
            buffer[offset : offset + part.numel()].copy_(part)
            offset += part.numel()
        self.buffers.append(buffer)

    def finish(self) -> "IpcVersion":
        """The buckets with their sums, complete on their device before any engine is told about them."""
        for device in {b.device for b in self.buffers if b.is_cuda}:
            torch.cuda.synchronize(device)
        gpus = sorted({gpu_uuid(b.device.index) for b in self.buffers if b.is_cuda})
        return IpcVersion(self.buffers, [bucket_sums(b) for b in self.buffers], gpus)


def _allocate(nbytes: int, device: torch.device) -> torch.Tensor:
    if device.type != "cpu" or nbytes == 0:  # an empty file cannot be mapped; empty buckets are not shared
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    storage = torch.UntypedStorage._new_using_filename_cpu(nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


@dataclass
class IpcVersion:
    """One version's buckets as the learner keeps them for ipc engines, and what it handed out."""

    buffers: list[torch.Tensor]
    sums: list[list[int]]
    """`bucket_sums` of each bucket, sent with its handle."""
    gpus: list[str]
    """UUIDs of the GPUs the buckets are on; empty for CPU buckets."""
    sent: list[tuple[bytes, int]] = field(default_factory=list)
    """(reference-counter file, slot) of every CUDA handle handed out, for `ipc_drain.Draining`."""
    last_sent: float = float("-inf")
    """time.monotonic() of the last `share`."""

    def share(self, now: float) -> Optional[list[Handle]]:
        """One handle per bucket, for one reply; None when the version was let go meanwhile (a publish
        retired it). On CUDA each call takes a new reference counter per bucket, given back by the
        engine (or by `Draining` if it never does); if torch fails midway, the counters taken so
        far are given back here and the error raised."""
        buffers = self.buffers  # read once: `Draining.add` may let go of them on the publishing thread
        if len(buffers) != len(self.sums):
            return None
        self.last_sent = now
        handles: list[Handle] = []
        try:
            for buffer, sums in zip(buffers, self.sums):
                handles.append({**encode(*reduce_tensor(buffer)), "sums": sums} if buffer.numel() else None)
                if handles[-1] is not None and handles[-1]["kind"] == "cuda":
                    self.sent.append((handles[-1]["ref_counter_handle"], handles[-1]["ref_counter_offset"]))
        except Exception:
            release(handles)
            raise
        return handles


# --- engine side: open, copy, check ---------------------------------------------------------------


def open_buckets(reply: dict) -> list[torch.Tensor]:
    """Every bucket of an ipc `reply` (the manifest with ``handles`` and ``open_by``) copied out of the
    learner's memory onto this process's current device, checked; WeightsError (naming the bucket)
    if a handle is malformed, late or cannot be opened, or its bytes are wrong. The CUDA reference
    counters of handles not opened are given back."""
    handles = reply.get("handles")
    parsed, open_by = _parse_all(reply, handles)
    buffers = []
    for index, one in enumerate(parsed):
        buffers.append(_open(reply, handles, index, one, open_by))
    return buffers


def _parse_all(reply: dict, handles) -> tuple[list[Parsed], float]:
    metas = reply["buckets"]
    if not isinstance(handles, list) or len(handles) != len(metas):
        release(handles if isinstance(handles, list) else [])
        raise WeightsError(f"the reply holds {len(handles) if isinstance(handles, list) else 'no'} handles "
                           f"for {len(metas)} buckets")
    open_by = reply.get("open_by")
    try:
        if not isinstance(open_by, float):
            raise TypeError(f"open_by must be a time, got {open_by!r}")
        return [parse(handle, meta["nbytes"]) for handle, meta in zip(handles, metas)], open_by
    except (TypeError, ValueError) as exc:  # every field checked before anything is opened
        release(handles)
        raise WeightsError(f"malformed handle in the reply: {exc}") from None


def _open(reply: dict, handles: list, index: int, parsed: Parsed, open_by: float) -> torch.Tensor:
    late = time.monotonic() - open_by
    if late > 0:
        release(handles[index:])
        raise WeightsError(f"bucket {index}: the reply is {late:.1f} s past its open_by, after which the "
                           "learner may free it; asking again")
    try:
        view = parsed.rebuild(*parsed.args)
    except Exception as exc:  # torch's error for a file that is gone or a handle it cannot map
        release(handles[index:])  # this one too: torch failed before taking over its counter
        raise WeightsError(f"bucket {index}: cannot open the learner's handle ({type(exc).__name__}: {exc}); "
                           "stale (the learner dropped that version) or not on this host") from None
    try:
        return _copy(reply, index, view, parsed.sums)
    except BaseException:
        release(handles[index + 1 :])  # not this one: torch gives its counter back when `view` goes
        raise


def _copy(reply: dict, index: int, view: torch.Tensor, sums: list[int]) -> torch.Tensor:
    """A copy of `view` on this process's current device; `view` goes out of scope on return, which
    gives the learner its bucket back."""
    target = torch.device("cuda", torch.cuda.current_device()) if view.is_cuda else torch.device("cpu")
    try:
        own = torch.empty(view.numel(), dtype=torch.uint8, device=target).copy_(view)
        got = bucket_sums(own)  # waits for the copy, so it is complete before the view is dropped
    except RuntimeError as exc:
        raise WeightsError(f"bucket {index}: cannot copy it out of the learner's memory ({exc})") from None
    if got != sums:
        raise WeightsError(f"bucket {index}: sums {got} after the copy, the learner sent {sums}; "
                           "the handle opened other memory (another bucket, or freed and reused)")
    if not own.is_cuda:
        verify_bucket(reply, index, own.numpy())
    return own

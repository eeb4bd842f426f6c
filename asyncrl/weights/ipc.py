"""The ``ipc`` transport: an engine on the learner's host opens the learner's own copy of each bucket
through torch's cross-process tensor handles and copies it into its own memory.

With `weights.ipc` on, the learner keeps each published version a second time, as one flat uint8
tensor per bucket on the model's device (`DeviceBuckets`): device memory for a GPU learner (CUDA
IPC), a named shared-memory file for a CPU one (torch's ``file_system`` sharing; a file descriptor
would need a Unix socket to travel). For each fetch the broadcaster reduces those tensors with
torch's own reduction (`torch.multiprocessing.reductions.reduce_tensor`) and sends only the
primitive fields (ints, bytes, lists) in the msgpack reply, never pickle (contract 5). The engine
puts back the fixed classes (torch.Tensor, TypedStorage, uint8), rebuilds each bucket with torch's
own rebuild function, copies it at once and drops the shared view.

Why copy at once: the learner keeps only its newest versions (`broadcaster.KEEP_SHARED`). A CPU
bucket's file is unlinked when the learner and every engine have let go of it; a CUDA bucket that
the learner drops while an engine still holds it stays out of the learner's allocator (torch's
"limbo", counted per send by torch's cross-process reference counter) until the engine lets go.
An engine holding views would pin old versions in the learner's memory.

Limits: same host only; CUDA needs the engine to see the learner's GPU (matched by UUID, so
CUDA_VISIBLE_DEVICES may renumber it) and to share its IPC namespace (not across containers
without ``--ipc=host``). A CUDA reply that never reaches an engine leaves its reference counter
set, and those buckets stay in the learner's limbo until it exits: one version's bytes per lost
reply.

Never imports learner or rollout code.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, rebuild_tensor, reduce_tensor

from asyncrl.weights.codec import Bucket, WeightsError, iter_buckets, raw_bytes, verify_bucket

Handle = Optional[dict]
"""One bucket's handle as it travels in msgpack; None for an empty bucket (nothing to share)."""


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

    def finish(self) -> list[torch.Tensor]:
        """The buckets, complete on their device before any engine is told about them."""
        for device in {b.device for b in self.buffers if b.is_cuda}:
            torch.cuda.synchronize(device)
        return self.buffers


def _allocate(nbytes: int, device: torch.device) -> torch.Tensor:
    if device.type != "cpu" or nbytes == 0:  # an empty file cannot be mapped; empty buckets are not shared
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    storage = torch.UntypedStorage._new_using_filename_cpu(nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


# --- learner side: handles ----------------------------------------------------------------------


def share(buffers: list[torch.Tensor]) -> list[Handle]:
    """One handle per bucket, for one fetch: on CUDA each call takes a new reference counter that
    the engine releases when it drops its view, so every reply must be reduced anew."""
    return [_handle(buffer) if buffer.numel() else None for buffer in buffers]


def _handle(buffer: torch.Tensor) -> dict:
    rebuild, args = reduce_tensor(buffer)
    if rebuild is rebuild_cuda_tensor:
        (_, size, stride, offset, _, _, device, handle, storage_bytes, storage_offset, _,
         ref_counter, ref_counter_offset, event, event_sync) = args
        return {"kind": "cuda", "device_uuid": str(torch.cuda.get_device_properties(device).uuid),
                "size": list(size), "stride": list(stride), "offset": offset, "handle": handle,
                "storage_bytes": storage_bytes, "storage_offset": storage_offset, "ref_counter": ref_counter,
                "ref_counter_offset": ref_counter_offset, "event": event, "event_sync": event_sync}
    if rebuild is not rebuild_tensor:
        raise WeightsError(f"a bucket on {buffer.device} cannot be shared across processes; use transport zmq")
    _, storage, (offset, size, stride, _) = args
    # torch's reduce_storage also takes a reference for the receiver (_shared_incref); the learner's
    # own reference keeps the file while the version is kept, so a reply that never arrives leaks nothing.
    manager, filename, storage_bytes = storage._share_filename_cpu_()
    return {"kind": "cpu", "manager": manager, "filename": filename, "storage_bytes": storage_bytes,
            "size": list(size), "stride": list(stride), "offset": offset}


# --- engine side: open, check, copy ---------------------------------------------------------------


def open_buckets(manifest: dict, handles) -> list[torch.Tensor]:
    """Every bucket of `manifest` copied out of the learner's memory into this process's, checked;
    WeightsError (naming the bucket) if a handle is malformed or cannot be opened, or its bytes are wrong."""
    metas = manifest["buckets"]
    if not isinstance(handles, list) or len(handles) != len(metas):
        _release(handles if isinstance(handles, list) else [])
        raise WeightsError(f"the reply holds {len(handles) if isinstance(handles, list) else 'no'} handles "
                           f"for {len(metas)} buckets")
    try:
        calls = [_parse(handle) for handle in handles]  # every field checked before anything is opened
    except (TypeError, ValueError) as exc:
        _release(handles)
        raise WeightsError(f"malformed handle in the reply: {exc}") from None
    buffers = []
    for index, (rebuild, args) in enumerate(calls):
        try:
            buffers.append(_own(manifest, index, rebuild(*args)))
        except RuntimeError as exc:  # torch's error for a file that is gone or a handle it cannot map
            _release(handles[index:])  # this one too: it failed before torch took over its counter
            raise WeightsError(f"bucket {index}: cannot open the learner's handle ({exc}); stale (the learner "
                               "dropped that version) or not on this host") from None
        except WeightsError:
            _release(handles[index + 1 :])
            raise
    return buffers


def _own(manifest: dict, index: int, view: torch.Tensor) -> torch.Tensor:
    """A copy in this process; the view goes out of scope here, which lets the learner free its bucket."""
    own = view.clone()
    if own.is_cuda:
        # Sizes only, as on the nccl path: a checksum would copy the bucket to the host, costing more
        # than the transfer; the bytes never left this host's device memory, and torch's reference
        # counter keeps the learner from reusing them before this copy is done.
        if own.numel() != manifest["buckets"][index]["nbytes"]:
            raise WeightsError(f"bucket {index}: {own.numel()} bytes on the device, the manifest says "
                               f"{manifest['buckets'][index]['nbytes']}")
        return own
    verify_bucket(manifest, index, own.numpy())
    return own


def _parse(handle: Handle) -> tuple[Callable[..., torch.Tensor], tuple]:
    """torch's rebuild function for `handle` and its arguments: the primitive fields checked, the
    fixed classes put back. Opens nothing."""
    if handle is None:
        return _empty, ()
    if not isinstance(handle, dict):
        raise TypeError(f"a handle must be a map, got {type(handle).__name__}")
    size, stride = _ints(handle, "size"), _ints(handle, "stride")
    offset, storage_bytes = _int(handle, "offset"), _int(handle, "storage_bytes")
    # A bucket is flat and lies inside its storage; checked here so that torch fails, if at all,
    # while opening (see _release), never after it has opened the storage.
    if len(size) != 1 or stride != [1] or offset + size[0] > storage_bytes:
        raise ValueError(f"size {size}, stride {stride}, offset {offset}: not a flat bucket inside {storage_bytes} bytes")
    size, stride = torch.Size(size), (1,)
    if handle.get("kind") == "cpu":
        return _rebuild_cpu, (_bytes(handle, "manager"), _bytes(handle, "filename"), storage_bytes, (offset, size, stride, False))
    if handle.get("kind") == "cuda":
        return rebuild_cuda_tensor, (
            torch.Tensor, size, stride, offset, torch.storage.TypedStorage, torch.uint8, _local_device(handle),
            _bytes(handle, "handle"), storage_bytes, _int(handle, "storage_offset"), False,
            _bytes(handle, "ref_counter"), _int(handle, "ref_counter_offset"), _bytes(handle, "event"),
            _bool(handle, "event_sync"))
    raise ValueError(f"unknown handle kind {handle.get('kind')!r}; expected 'cpu' or 'cuda'")


def _empty() -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _rebuild_cpu(manager: bytes, filename: bytes, storage_bytes: int, metadata: tuple) -> torch.Tensor:
    """torch's rebuild_storage_filename without its _shared_decref (the learner took no reference
    for us, see _handle), then torch's rebuild_tensor."""
    storage = torch.UntypedStorage._new_shared_filename_cpu(manager, filename, storage_bytes)
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.uint8, _internal=True)
    return rebuild_tensor(torch.Tensor, typed, metadata)


def _local_device(handle: dict) -> int:
    """This process's index of the learner's GPU (CUDA_VISIBLE_DEVICES may number it differently)."""
    uuid = handle.get("device_uuid")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            if str(torch.cuda.get_device_properties(index).uuid) == uuid:
                return index
    raise ValueError(f"the learner's GPU {uuid} is not visible to this engine; use transport zmq or shm")


def _release(handles: list) -> None:
    """Give back the CUDA reference counters of handles that will not be opened, so the learner
    can free those buckets (best effort: a malformed handle has nothing to give back)."""
    for handle in handles:
        try:
            if isinstance(handle, dict) and handle.get("kind") == "cuda":
                torch.UntypedStorage._release_ipc_counter(
                    _bytes(handle, "ref_counter"), _int(handle, "ref_counter_offset"), device=_local_device(handle))
        except (RuntimeError, TypeError, ValueError):
            continue


def _int(handle: dict, key: str) -> int:
    value = handle.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"handle field {key!r} must be a non-negative integer, got {value!r}")
    return value


def _ints(handle: dict, key: str) -> list[int]:
    value = handle.get(key)
    if not isinstance(value, list):
        raise TypeError(f"handle field {key!r} must be a list of integers, got {value!r}")
    return [_int({key: v}, key) for v in value]


def _bytes(handle: dict, key: str) -> bytes:
    value = handle.get(key)
    if not isinstance(value, bytes):
        raise TypeError(f"handle field {key!r} must be bytes, got {type(value).__name__}")
    return value


def _bool(handle: dict, key: str) -> bool:
    value = handle.get(key)
    if not isinstance(value, bool):
        raise TypeError(f"handle field {key!r} must be true or false, got {value!r}")
    return value

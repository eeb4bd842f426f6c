"""One bucket's cross-process handle as msgpack carries it: torch's reduction without pickle.

torch shares a tensor as a rebuild function and an argument tuple
(`torch.multiprocessing.reductions.reduce_tensor`); pickle would send both. The learner sends
only the tuple's primitive fields, in a map (`encode`); the engine puts back the fixed parts
(torch.Tensor, TypedStorage, uint8, its own index of the learner's GPU) and checks every field
before anything is opened (`parse`), so torch fails, if at all, while opening a handle, never
after it has taken over the handle's reference counter. A CUDA handle's fields carry the names
of `rebuild_cuda_tensor`'s parameters (`CUDA_PARAMETERS`): a torch that renames or reorders them
fails a test instead of sending fields to the wrong places.

`release` gives back the CUDA reference counters of handles an engine will not open. torch
counts every send in a shared-memory file; the learner's bucket stays allocated (in torch's
"limbo") until each of its counters is back to zero.

Must never open a handle, import learner or rollout code, or unpickle anything.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, rebuild_tensor

CUDA_PARAMETERS = (
    "tensor_cls", "tensor_size", "tensor_stride", "tensor_offset", "storage_cls", "dtype", "storage_device",
    "storage_handle", "storage_size_bytes", "storage_offset_bytes", "requires_grad", "ref_counter_handle",
    "ref_counter_offset", "event_handle", "event_sync_required",
)
"""`rebuild_cuda_tensor`'s parameters, in order: the argument tuple `reduce_tensor` returns for a CUDA tensor."""

CUDA_WIRE_FIELDS = ("tensor_offset", "storage_handle", "storage_size_bytes", "storage_offset_bytes",
                    "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
"""The CUDA parameters sent as they are; the others are fixed, or (the device) sent as the GPU's UUID."""

EVENT_HANDLE_BYTES = 64
"""sizeof(cudaIpcEventHandle_t): torch reads exactly this many bytes from an event handle, whatever its length."""

REF_COUNTER_SLOTS = 10000
"""torch's CUDA_IPC_REF_COUNTER_FILE_SIZE, the counters in one reference-counter file; torch
decrements the slot it is given without checking it, so `parse` and `release` do."""

MAX_BYTES = 1 << 48
"""Upper bound on every byte count and offset in a handle (256 TiB, beyond any device)."""

Handle = Optional[dict]
"""One bucket's handle as it travels; None for an empty bucket (nothing to share)."""


@dataclass(frozen=True)
class Parsed:
    """A checked handle: torch's rebuild function, its arguments, and the sums of the bucket's bytes."""

    rebuild: Callable[..., torch.Tensor]
    args: tuple
    sums: list[int]


# --- learner side ---------------------------------------------------------------------------------


def encode(rebuild: Callable, args: tuple, uuid_of: Optional[Callable[[int], str]] = None) -> dict:
    """The primitive fields of `reduce_tensor`'s (rebuild, args) for one flat uint8 bucket; ValueError
    (or TypeError) when torch returned something this code does not know."""
    if rebuild is rebuild_cuda_tensor:
        return _encode_cuda(dict(zip(CUDA_PARAMETERS, args, strict=True)), uuid_of or gpu_uuid)
    if rebuild is rebuild_tensor:
        return _encode_cpu(*args)
    raise ValueError(f"torch shares this bucket with {getattr(rebuild, '__name__', rebuild)!r}; "
                     "only CUDA and CPU buckets travel by ipc: use transport zmq")


def _encode_cuda(fields: dict, uuid_of: Callable[[int], str]) -> dict:
    fixed = (fields["tensor_cls"], fields["storage_cls"], fields["dtype"], fields["requires_grad"])
    if fixed != (torch.Tensor, torch.storage.TypedStorage, torch.uint8, False):
        raise ValueError(f"a bucket must be a plain uint8 tensor without grad, torch reduced {fixed}")
    wire = {name: fields[name] for name in CUDA_WIRE_FIELDS}
    wire.update(kind="cuda", device_uuid=uuid_of(fields["storage_device"]),
                tensor_size=list(fields["tensor_size"]), tensor_stride=list(fields["tensor_stride"]))
    return wire


def _encode_cpu(tensor_cls, storage, metadata: tuple) -> dict:
    tensor_offset, size, stride, requires_grad = metadata
    fixed = (tensor_cls, storage.dtype, requires_grad)
    if fixed != (torch.Tensor, torch.uint8, False):
        raise ValueError(f"a bucket must be a plain uint8 tensor without grad, torch reduced {fixed}")
    # torch's reduce_storage would also take a reference for the receiver (_shared_incref); the
    # learner's own reference keeps the file while the version is kept or draining, so a reply
    # that never arrives leaks nothing.
    manager, filename, storage_bytes = storage._share_filename_cpu_()
    return {"kind": "cpu", "manager": manager, "filename": filename, "storage_size_bytes": storage_bytes,
            "tensor_size": list(size), "tensor_stride": list(stride), "tensor_offset": tensor_offset}


# --- engine side ----------------------------------------------------------------------------------


def parse(handle: Handle, nbytes: int, device_of: Optional[Callable[[str], int]] = None) -> Parsed:
    """`handle` checked against the manifest's `nbytes` for its bucket and turned back into torch's
    call; TypeError or ValueError naming the field. Opens nothing."""
    if handle is None:
        if nbytes:
            raise ValueError(f"no handle for a bucket of {nbytes} bytes")
        return Parsed(_empty, (), [0, 0])
    if not isinstance(handle, dict):
        raise TypeError(f"a handle must be a map, got {type(handle).__name__}")
    size, stride = _ints(handle, "tensor_size"), _ints(handle, "tensor_stride")
    offset, storage_bytes = _int(handle, "tensor_offset"), _int(handle, "storage_size_bytes")
    if size != [nbytes] or stride != [1] or offset + nbytes > storage_bytes:
        raise ValueError(f"tensor_size {size}, tensor_stride {stride}, tensor_offset {offset}: not the manifest's "
                         f"flat bucket of {nbytes} bytes inside a storage of {storage_bytes}")
    sums = _ints(handle, "sums", upper=(1 << 63) - 1)
    if len(sums) != 2:
        raise ValueError(f"handle field 'sums' must hold 2 integers, got {sums}")
    kind = handle.get("kind")
    if kind == "cpu":
        metadata = (offset, torch.Size(size), (1,), False)
        return Parsed(_rebuild_cpu, (_bytes(handle, "manager"), _bytes(handle, "filename"), storage_bytes, metadata), sums)
    if kind == "cuda":
        return Parsed(rebuild_cuda_tensor, _cuda_args(handle, size, offset, storage_bytes, device_of or local_gpu), sums)
    raise ValueError(f"unknown handle kind {kind!r}; expected 'cpu' or 'cuda'")


def _cuda_args(handle: dict, size: list[int], offset: int, storage_bytes: int, device_of: Callable[[str], int]) -> tuple:
    fields = {
        "tensor_cls": torch.Tensor, "tensor_size": torch.Size(size), "tensor_stride": (1,), "tensor_offset": offset,
        "storage_cls": torch.storage.TypedStorage, "dtype": torch.uint8,
        "storage_handle": _bytes(handle, "storage_handle"),  # not length-checked: its length depends on the allocator
        "storage_size_bytes": storage_bytes, "storage_offset_bytes": _int(handle, "storage_offset_bytes"),
        "requires_grad": False, "ref_counter_handle": _bytes(handle, "ref_counter_handle"),
        "ref_counter_offset": _int(handle, "ref_counter_offset", upper=REF_COUNTER_SLOTS - 1),
        "event_handle": _bytes(handle, "event_handle", length=EVENT_HANDLE_BYTES),
        "event_sync_required": _bool(handle, "event_sync_required"),
    }
    fields["storage_device"] = device_of(handle.get("device_uuid"))  # last: every field is checked first
    return tuple(fields[name] for name in CUDA_PARAMETERS)


def _empty() -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _rebuild_cpu(manager: bytes, filename: bytes, storage_bytes: int, metadata: tuple) -> torch.Tensor:
    """torch's rebuild_storage_filename without its _shared_decref (the learner took no reference
    for us, see _encode_cpu), then torch's rebuild_tensor."""
    storage = torch.UntypedStorage._new_shared_filename_cpu(manager, filename, storage_bytes)
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.uint8, _internal=True)
    return rebuild_tensor(torch.Tensor, typed, metadata)


def release(handles: list) -> None:
    """Give back the CUDA reference counters of handles that will not be opened, so the learner can
    free those buckets. Needs neither the learner's GPU nor any GPU (torch only decrements a counter
    in shared memory), but a torch built with CUDA; where that fails, or a handle is too malformed
    to name its counter, the learner releases the counter itself after its grace period."""
    for handle in handles:
        if not isinstance(handle, dict) or handle.get("kind") != "cuda":
            continue
        try:
            counter = _bytes(handle, "ref_counter_handle")
            slot = _int(handle, "ref_counter_offset", upper=REF_COUNTER_SLOTS - 1)
            torch.UntypedStorage._release_ipc_counter_cuda(counter, slot)
        except (RuntimeError, TypeError, ValueError):
            continue


# --- GPUs by UUID -----------------------------------------------------------------------------------


def gpu_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


@functools.cache
def visible_gpus() -> tuple[str, ...]:
    """The UUIDs of the GPUs this process can open memory on (CUDA_VISIBLE_DEVICES may renumber them)."""
    if not torch.cuda.is_available():
        return ()
    return tuple(gpu_uuid(index) for index in range(torch.cuda.device_count()))


def local_gpu(uuid) -> int:
    """This process's index of the GPU with `uuid`."""
    gpus = visible_gpus()
    if uuid not in gpus:
        raise ValueError(f"the learner's GPU {uuid} is not visible to this engine (it sees {list(gpus)}); "
                         "use transport zmq or shm")
    return gpus.index(uuid)


# --- field checks -----------------------------------------------------------------------------------


def _int(handle: dict, key: str, upper: int = MAX_BYTES) -> int:
    value = handle.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= upper:
        raise TypeError(f"handle field {key!r} must be an integer in [0, {upper}], got {value!r}")
    return value


def _ints(handle: dict, key: str, upper: int = MAX_BYTES) -> list[int]:
    value = handle.get(key)
    if not isinstance(value, list):
        raise TypeError(f"handle field {key!r} must be a list of integers, got {value!r}")
    return [_int({key: v}, key, upper) for v in value]


def _bytes(handle: dict, key: str, length: Optional[int] = None) -> bytes:
    value = handle.get(key)
    if not isinstance(value, bytes) or not value:
        raise TypeError(f"handle field {key!r} must be non-empty bytes, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"handle field {key!r} must be {length} bytes, got {len(value)}")
    return value


def _bool(handle: dict, key: str) -> bool:
    value = handle.get(key)
    if not isinstance(value, bool):
        raise TypeError(f"handle field {key!r} must be true or false, got {value!r}")
    return value

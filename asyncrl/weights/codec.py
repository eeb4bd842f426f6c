"""Encoding of a weight version: a msgpack manifest, then a stream of buckets of raw bytes.

A bucket is one contiguous buffer holding several whole tensors back to back; the manifest lists,
per bucket, its size, its xxh3-64 checksum and each tensor's name, dtype, shape and byte offset. Buckets are
what every transport moves (one ZeroMQ frame, one slice of a shared-memory file, one collective
broadcast), and what bounds memory on the learner: `iter_buckets` copies tensors into the current
bucket one at a time and hands the bucket on when the next tensor would not fit, so a learner whose
parameters are sharded (ZeRO-3, FSDP) gathers one parameter at a time and never holds a second
full copy on the device. Decoding verifies every size and checksum before a single tensor is
returned, so a damaged transfer can never be applied (contract 6). No pickle, no sockets here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import xxhash

DTYPE_NAMES = {
    torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
    torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8", torch.bool: "bool",
}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
DEFAULT_BUCKET_BYTES = 64 << 20
CHECKSUM = "xxh3_64"
"""The manifest key of each bucket's checksum. xxh3 hashes about 20 GB/s on one core where zlib's
crc32 manages about 3 GB/s: on a loaded machine the crc32 was most of the gap between asyncrl and raw
ZeroMQ (docs/weights.md). It guards against damaged or mixed-up transfers, not against an attacker
(CurveZMQ authenticates peers)."""


def checksum(data) -> int:
    """xxh3-64 of a bytes-like object, without copying it."""
    return xxhash.xxh3_64_intdigest(data)


class WeightsError(ValueError):
    """A weight version that cannot be applied; the message names the tensor or bucket."""


@dataclass
class Bucket:
    index: int
    tensors: list[list]
    """[name, dtype name, shape, byte offset] per tensor, in stream order."""
    data: memoryview
    """The bucket's bytes; a view that keeps its backing buffer alive."""
    checksum: int

    def meta(self) -> dict:
        return {"nbytes": len(self.data), CHECKSUM: self.checksum, "tensors": self.tensors}


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor on its own device (no copy when contiguous)."""
    tensor = tensor.detach()
    if tensor.dtype not in DTYPE_NAMES:
        raise WeightsError(f"dtype {tensor.dtype} cannot be published; supported: {sorted(NAME_DTYPES)}")
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    allocate: Optional[Callable[[int], bytearray]] = None,
) -> Iterator[Bucket]:
    """Pack (name, tensor) pairs into host buckets of at most `bucket_bytes` (a larger tensor gets a
    bucket of its own).

    Each tensor is copied into the bucket before the next pair is asked for, so the iterable may
    hand out a tensor that is only valid until then: the hook for sharded learners is a generator
    that gathers one parameter (or one group of parameters) at a time, e.g. for DeepSpeed ZeRO-3

        def gathered(model):
            for name, p in model.named_parameters():
                with deepspeed.zero.GatheredParameters([p]):
                    yield name, p.data

    and the bucket owner is the only full-size host memory involved.
    """
    if bucket_bytes < 1:
        raise WeightsError(f"bucket_bytes={bucket_bytes}: must be >= 1; 64 MiB is a good default")
    # Uninitialised memory: a zero-filled 64 MiB bytearray per publish cost more than the whole
    # learner step for small models; pages a small model never touches are never committed.
    allocate = allocate or (lambda n: np.empty(n, dtype=np.uint8))
    index, used, buf, entries = 0, 0, None, []
    for name, tensor in named_tensors:
        raw = raw_bytes(tensor)
        size = raw.numel()
        if buf is not None and used + size > len(buf):
            yield _finish(index, buf, used, entries)
            index, used, buf, entries = index + 1, 0, None, []
        if buf is None:
            buf = allocate(max(bucket_bytes, size))
        if size:
            torch.frombuffer(buf, dtype=torch.uint8, count=size, offset=used).copy_(raw)
        entries.append([name, DTYPE_NAMES[tensor.dtype], list(tensor.shape), used])
        used += size
    if buf is not None:
        yield _finish(index, buf, used, entries)


def _finish(index: int, buf: bytearray, used: int, entries: list) -> Bucket:
    view = memoryview(buf)[:used]
    return Bucket(index, entries, view, checksum(view))


def make_manifest(version: int, buckets: Sequence[Bucket]) -> dict:
    return {"version": version, "buckets": [b.meta() for b in buckets], "nbytes": sum(len(b.data) for b in buckets)}


def verify_bucket(manifest: dict, index: int, data) -> None:
    """Raise WeightsError unless `data` is bucket `index` of `manifest`, whole and undamaged."""
    buckets = manifest.get("buckets")
    if not isinstance(buckets, list) or not 0 <= index < len(buckets):
        raise WeightsError(f"bucket {index} is not in the manifest of version {manifest.get('version')}")
    meta = buckets[index]
    if len(data) != meta["nbytes"]:
        raise WeightsError(f"bucket {index}: {len(data)} bytes arrived, the manifest says {meta['nbytes']}")
    if checksum(data) != meta.get(CHECKSUM):
        raise WeightsError(f"bucket {index}: checksum mismatch, transfer damaged")


def tensors_from_buckets(manifest: dict, buffers: Sequence) -> dict[str, torch.Tensor]:
    """Name -> tensor views into already verified bucket buffers (no copy).

    Views may be read-only (ZeroMQ frames, read-only maps); callers copy them into their own
    parameters, never write to them.
    """
    metas = manifest.get("buckets")
    if not isinstance(metas, list) or len(metas) != len(buffers):
        raise WeightsError(f"manifest lists {len(metas) if isinstance(metas, list) else '?'} buckets, got {len(buffers)}")
    state = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")  # read-only views by design, see above
        for index, (meta, buf) in enumerate(zip(metas, buffers)):
            if isinstance(buf, torch.Tensor):  # a bucket received on the device (nccl)
                whole = buf
            else:
                whole = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
            for name, dtype_name, shape, offset in meta["tensors"]:
                dtype = NAME_DTYPES.get(dtype_name)
                if dtype is None:
                    raise WeightsError(f"tensor {name!r}: unknown dtype {dtype_name!r}")
                size = dtype.itemsize * int(torch.Size(shape).numel())
                if offset < 0 or offset + size > len(buf):
                    raise WeightsError(f"tensor {name!r}: bytes [{offset}, {offset + size}) lie outside bucket {index}")
                state[name] = whole[offset : offset + size].view(dtype).reshape(shape)
    return state


def encode_state(state: dict[str, torch.Tensor], version: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> tuple[dict, list[memoryview]]:
    """A whole version in memory: (manifest, bucket buffers)."""
    buckets = list(iter_buckets(state.items(), bucket_bytes))
    return make_manifest(version, buckets), [b.data for b in buckets]


def decode_state(manifest: dict, buffers: Sequence) -> dict[str, torch.Tensor]:
    """Verify every bucket, then return the tensors."""
    for index, buf in enumerate(buffers):
        verify_bucket(manifest, index, buf)
    return tensors_from_buckets(manifest, buffers)

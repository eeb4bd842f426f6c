"""Encoding of a weight version: a msgpack manifest (names, shapes, dtypes, checksums, version)
and one raw frame per tensor. Decoding verifies every checksum and shape before anything is
handed to an engine, so a damaged transfer can never be applied (contract 6). No pickle.
"""

from __future__ import annotations

import zlib

import torch

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


class WeightsError(ValueError):
    pass


def encode_state(state: dict[str, torch.Tensor], version: int) -> tuple[dict, list[bytes]]:
    entries, frames = [], []
    for name, tensor in state.items():
        data = tensor.detach().to("cpu").contiguous()
        if data.dtype not in DTYPE_NAMES:
            raise WeightsError(f"tensor {name!r} has dtype {data.dtype}; supported: {sorted(NAME_DTYPES)}")
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        entries.append({"name": name, "shape": list(data.shape), "dtype": DTYPE_NAMES[data.dtype], "crc32": zlib.crc32(raw)})
        frames.append(raw)
    return {"version": version, "tensors": entries}, frames


def decode_state(manifest: dict, frames: list) -> dict[str, torch.Tensor]:
    tensors = manifest.get("tensors")
    if not isinstance(tensors, list) or len(tensors) != len(frames):
        raise WeightsError(f"manifest lists {len(tensors) if isinstance(tensors, list) else '?'} tensors, got {len(frames)} frames")
    state = {}
    for entry, frame in zip(tensors, frames):
        raw = bytes(frame)
        name = entry["name"]
        if zlib.crc32(raw) != entry["crc32"]:
            raise WeightsError(f"tensor {name!r}: checksum mismatch, transfer damaged")
        dtype = NAME_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise WeightsError(f"tensor {name!r}: unknown dtype {entry['dtype']!r}")
        shape = tuple(entry["shape"])
        expected = dtype.itemsize * int(torch.Size(shape).numel())
        if len(raw) != expected:
            raise WeightsError(f"tensor {name!r}: {len(raw)} bytes for shape {shape} {entry['dtype']}, expected {expected}")
        buf = bytearray(raw)
        state[name] = torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
    return state

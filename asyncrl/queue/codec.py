"""Wire encoding of trajectory groups and request envelopes: msgpack headers and raw array frames.

A group travels as one msgpack header (ids, rewards, lengths, finish reasons) followed by four
raw little-endian frames: prompt tokens (int32), all response tokens concatenated (int32), all
behaviour log-probs (float32) and all per-token versions (int32). No per-token Python objects are
built on the way in or out, and nothing here can unpickle: msgpack is decoded with
`strict_map_key` and without `ext` hooks. Every decode validates and raises `ProtocolError` with a
code the server counts. Must never import torch or touch sockets.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import msgpack
import numpy as np

from asyncrl.protocol import FINISH_REASONS, Sample, TrajectoryGroup

PROTOCOL_VERSION = 1
GROUP_FRAMES = 4
_TOKENS = np.dtype("<i4")
_FLOATS = np.dtype("<f4")


class ProtocolError(ValueError):
    """A message that breaks the wire protocol; `code` names the counter it is charged to."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack_header(frame: bytes, max_bytes: int = 1 << 20) -> dict:
    """Decode an envelope or group header, which must be a msgpack map with string keys."""
    if len(frame) > max_bytes:
        raise ProtocolError("oversized", f"header of {len(frame)} bytes exceeds the {max_bytes}-byte limit")
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("bad_msgpack", f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_schema", f"header must be a msgpack map, got {type(obj).__name__}")
    return obj


def _field(header: dict, key: str, kinds: tuple, where: str = "group") -> Any:
    if key not in header:
        raise ProtocolError("bad_schema", f"{where} header is missing field {key!r}")
    value = header[key]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise ProtocolError("bad_schema", f"{where} field {key!r} must be {names}, got {type(value).__name__}")
    return value


def encode_group(group: TrajectoryGroup) -> list[bytes]:
    """Header + 4 raw frames; see docs/protocol.md."""
    samples = group.samples
    header = {
        "id": group.group_id,
        "task": group.task,
        "engine": group.engine_id,
        "seed": int(group.seed),
        "ref": group.reference,
        "timings": {k: float(v) for k, v in group.timings.items()},
        "lens": [int(len(s.tokens)) for s in samples],
        "rewards": [float(s.reward) for s in samples],
        "finish": [s.finish_reason for s in samples],
    }
    tokens = np.concatenate([np.asarray(s.tokens, _TOKENS) for s in samples]) if samples else np.empty(0, _TOKENS)
    logprobs = np.concatenate([np.asarray(s.behav_logprobs, _FLOATS) for s in samples]) if samples else np.empty(0, _FLOATS)
    versions = np.concatenate([np.asarray(s.versions, _TOKENS) for s in samples]) if samples else np.empty(0, _TOKENS)
    return [
        pack(header),
        np.ascontiguousarray(group.prompt_tokens, _TOKENS).tobytes(),
        tokens.tobytes(),
        logprobs.tobytes(),
        versions.tobytes(),
    ]


def _array(frame, dtype: np.dtype, count: int, name: str) -> np.ndarray:
    buf = memoryview(frame)
    if buf.nbytes != count * dtype.itemsize:
        raise ProtocolError(
            "bad_frames", f"frame {name!r} has {buf.nbytes} bytes, expected {count} x {dtype.itemsize}"
        )
    return np.frombuffer(buf, dtype=dtype)


def decode_group(
    frames: list, vocab_size: Optional[int] = None, max_version: Optional[int] = None
) -> TrajectoryGroup:
    """Validate and decode one group; arrays are views on the received frames (no copy)."""
    if len(frames) != 1 + GROUP_FRAMES:
        raise ProtocolError("bad_frames", f"a group is 1 header + {GROUP_FRAMES} array frames, got {len(frames)} frames")
    header = unpack_header(bytes(frames[0]))
    group_id = _field(header, "id", (str,))
    if not 0 < len(group_id) <= 128:
        raise ProtocolError("bad_schema", f"group id must be 1..128 characters, got {len(group_id)}")
    lens = _field(header, "lens", (list,))
    rewards = _field(header, "rewards", (list,))
    finish = _field(header, "finish", (list,))
    if not lens:
        raise ProtocolError("bad_schema", f"group {group_id}: has no samples")
    if not (len(lens) == len(rewards) == len(finish)):
        raise ProtocolError(
            "bad_schema", f"group {group_id}: lens/rewards/finish have {len(lens)}/{len(rewards)}/{len(finish)} entries"
        )
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in lens):
        # Every sample has at least one token, so every sample has a behaviour version.
        raise ProtocolError("bad_schema", f"group {group_id}: lens must be positive integers, got {lens!r}")
    if any(not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r) for r in rewards):
        raise ProtocolError("bad_value", f"group {group_id}: rewards must be finite numbers, got {rewards!r}")
    if any(f not in FINISH_REASONS for f in finish):
        raise ProtocolError("bad_schema", f"group {group_id}: finish reasons must be one of {FINISH_REASONS}, got {finish!r}")
    prompt = np.frombuffer(memoryview(frames[1]), dtype=_TOKENS) if len(frames[1]) % 4 == 0 else None
    if prompt is None or len(prompt) == 0:
        raise ProtocolError("bad_frames", f"group {group_id}: prompt frame must hold at least one int32 token")
    total = sum(lens)
    tokens = _array(frames[2], _TOKENS, total, "tokens")
    logprobs = _array(frames[3], _FLOATS, total, "behav_logprobs")
    versions = _array(frames[4], _TOKENS, total, "versions")
    if not np.isfinite(logprobs).all():
        raise ProtocolError("bad_value", f"group {group_id}: behav_logprobs hold NaN or inf")
    if (logprobs > 1e-3).any():
        raise ProtocolError("bad_value", f"group {group_id}: behav_logprobs must be <= 0, max is {float(logprobs.max())}")
    if vocab_size is not None:
        for name, ids in (("prompt", prompt), ("tokens", tokens)):
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
                raise ProtocolError("bad_token", f"group {group_id}: {name} token id {bad} is outside the vocabulary [0, {vocab_size})")
    if versions.size and versions.min() < 0:
        raise ProtocolError("bad_version", f"group {group_id}: negative version {int(versions.min())}")
    if max_version is not None and versions.size and versions.max() > max_version:
        raise ProtocolError(
            "future_version", f"group {group_id}: version {int(versions.max())} is newer than the learner's {max_version}"
        )
    samples = []
    start = 0
    for n, reward, reason in zip(lens, rewards, finish):
        end = start + n
        samples.append(Sample(tokens[start:end], logprobs[start:end], versions[start:end], float(reward), reason))
        start = end
    timings = header.get("timings", {})
    return TrajectoryGroup(
        group_id=group_id,
        prompt_tokens=prompt,
        samples=samples,
        task=str(header.get("task", "")),
        engine_id=str(header.get("engine", "")),
        seed=int(header.get("seed", 0)) if isinstance(header.get("seed", 0), int) else 0,
        reference=str(header.get("ref", "")),
        timings={str(k): float(v) for k, v in timings.items() if isinstance(v, (int, float))}
        if isinstance(timings, dict)
        else {},
    )

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


def encode_group(group: TrajectoryGroup) -> list:
    """Header + 4 raw frames (bytes-like: `len` is the byte count); see docs/protocol.md."""
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
    # One copy per frame: concatenate writes straight into the buffer that becomes the frame.
    return [
        pack(header),
        np.ascontiguousarray(group.prompt_tokens, _TOKENS).data.cast("B"),
        _joined([s.tokens for s in samples], _TOKENS),
        _joined([s.behav_logprobs for s in samples], _FLOATS),
        _joined([s.versions for s in samples], _TOKENS),
    ]


def _joined(arrays: list, dtype: np.dtype) -> memoryview:
    if not arrays:
        return memoryview(b"")
    return np.concatenate(arrays, dtype=dtype, casting="unsafe").data.cast("B")


def _array(frame, dtype: np.dtype, count: int, name: str) -> np.ndarray:
    buf = memoryview(frame)
    if buf.nbytes != count * dtype.itemsize:
        raise ProtocolError(
            "bad_frames", f"frame {name!r} has {buf.nbytes} bytes, expected {count} x {dtype.itemsize}"
        )
    return np.frombuffer(buf, dtype=dtype)


_FINISH = frozenset(FINISH_REASONS)
_U32 = np.dtype("<u4")
_MIN, _MAX = np.minimum.reduce, np.maximum.reduce  # skip ndarray.min's Python layers on the hot path


def _check_ids(ids: np.ndarray, vocab_size: int, name: str, group_id: str) -> None:
    # Read as unsigned, a negative id is huge, so one reduction checks both ends of the range.
    if ids.size and int(_MAX(ids.view(_U32))) >= vocab_size:
        bad = int(_MIN(ids)) if int(_MIN(ids)) < 0 else int(_MAX(ids))
        raise ProtocolError("bad_token", f"group {group_id}: {name} token id {bad} is outside the vocabulary [0, {vocab_size})")


def _parse_header(frames: list) -> tuple[dict, list, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Check one group's header and frame sizes; returns (header, lens, prompt, tokens, logprobs, versions)."""
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
    # `type(x) is int` rather than isinstance: bools are ints to isinstance, and this runs per group.
    if not all(type(n) is int for n in lens) or min(lens) < 1:
        # Every sample has at least one token, so every sample has a behaviour version.
        raise ProtocolError("bad_schema", f"group {group_id}: lens must be positive integers, got {lens!r}")
    if not all(type(r) is float or type(r) is int for r in rewards) or not all(map(math.isfinite, rewards)):
        raise ProtocolError("bad_value", f"group {group_id}: rewards must be finite numbers, got {rewards!r}")
    if not all(type(f) is str for f in finish) or not _FINISH.issuperset(finish):
        raise ProtocolError("bad_schema", f"group {group_id}: finish reasons must be one of {FINISH_REASONS}, got {finish!r}")
    prompt = np.frombuffer(memoryview(frames[1]), dtype=_TOKENS) if len(frames[1]) % 4 == 0 else None
    if prompt is None or len(prompt) == 0:
        raise ProtocolError("bad_frames", f"group {group_id}: prompt frame must hold at least one int32 token")
    total = sum(lens)
    tokens = _array(frames[2], _TOKENS, total, "tokens")
    logprobs = _array(frames[3], _FLOATS, total, "behav_logprobs")
    versions = _array(frames[4], _TOKENS, total, "versions")
    return header, lens, prompt, tokens, logprobs, versions


def _check_arrays(group_id: str, prompt, tokens, logprobs, versions, vocab_size, max_version) -> int:
    """Check one group's arrays; returns its behaviour version (the oldest token's)."""
    low, high = float(_MIN(logprobs)), float(_MAX(logprobs))
    if not (low > -math.inf and high < math.inf):  # NaN fails every comparison
        raise ProtocolError("bad_value", f"group {group_id}: behav_logprobs hold NaN or inf")
    if high > 1e-3:
        raise ProtocolError("bad_value", f"group {group_id}: behav_logprobs must be <= 0, max is {high}")
    if vocab_size is not None:
        _check_ids(prompt, vocab_size, "prompt", group_id)
        _check_ids(tokens, vocab_size, "tokens", group_id)
    oldest, newest = int(_MIN(versions)), int(_MAX(versions))
    if oldest < 0:
        raise ProtocolError("bad_version", f"group {group_id}: negative version {oldest}")
    if max_version is not None and newest > max_version:
        raise ProtocolError("future_version", f"group {group_id}: version {newest} is newer than the learner's {max_version}")
    return oldest


_JOIN_LIMIT = 1 << 16
"""Joining copies; above this many tokens per message, per-group checks are cheaper than the copy."""


def _parse_many(frames: list, count: int, vocab_size: Optional[int], max_version: Optional[int]) -> list[tuple]:
    """Validate `count` groups laid end to end; returns each one's parsed parts plus its behaviour version.

    For small groups the array checks run once over all groups joined (a few numpy calls per
    message instead of a few per group, which is what makes small groups fast); only when that finds a problem are the
    groups checked one by one, to name the first bad one. A ProtocolError says which group it was.
    """
    per = 1 + GROUP_FRAMES
    if len(frames) != count * per:
        raise ProtocolError("bad_frames", f"{count} group(s) need {count * per} frames, got {len(frames)}")
    parsed = []
    for i in range(count):
        try:
            parsed.append(_parse_header(frames[i * per : (i + 1) * per]))
        except ProtocolError as exc:
            raise _where(exc, i, count) from None
    if count == 1 or sum(len(p[3]) for p in parsed) > _JOIN_LIMIT:
        checked = []
        for i, p in enumerate(parsed):
            try:
                checked.append((*p, _check_arrays(p[0]["id"], *p[2:], vocab_size, max_version)))
            except ProtocolError as exc:
                raise _where(exc, i, count) from None
        return checked
    join = np.concatenate
    prompts, tokens, logprobs, versions = (join([p[k] for p in parsed]) for k in (2, 3, 4, 5))
    starts = np.cumsum([0] + [len(p[5]) for p in parsed[:-1]])
    try:
        oldest = np.minimum.reduceat(versions, starts).tolist()
        _check_arrays("", prompts, tokens, logprobs, versions, vocab_size, max_version)
    except ProtocolError:
        for i, p in enumerate(parsed):
            try:
                _check_arrays(p[0]["id"], *p[2:], vocab_size, max_version)
            except ProtocolError as exc:
                raise _where(exc, i, count) from None
        raise
    return [(*p, v) for p, v in zip(parsed, oldest)]


def _where(exc: ProtocolError, index: int, count: int) -> ProtocolError:
    return ProtocolError(exc.code, f"group {index} of {count}: {exc}") if count > 1 else exc


def inspect_groups(frames: list, count: int, vocab_size: Optional[int] = None, max_version: Optional[int] = None):
    """Validate `count` groups as decode_groups does, without building them: [(group id, behaviour version)]."""
    return [(p[0]["id"], p[6]) for p in _parse_many(frames, count, vocab_size, max_version)]


def inspect_group(frames: list, vocab_size: Optional[int] = None, max_version: Optional[int] = None) -> tuple[str, int]:
    """Validate one group as decode_group does, without building it: (group id, behaviour version)."""
    return inspect_groups(frames, 1, vocab_size, max_version)[0]


def decode_groups(
    frames: list, count: int, vocab_size: Optional[int] = None, max_version: Optional[int] = None
) -> list[TrajectoryGroup]:
    """Validate and decode `count` groups laid end to end (a batch reply, a batched put)."""
    return [_build(*p[:6]) for p in _parse_many(frames, count, vocab_size, max_version)]


def decode_group(
    frames: list, vocab_size: Optional[int] = None, max_version: Optional[int] = None
) -> TrajectoryGroup:
    """Validate and decode one group; arrays are views on the received frames (no copy)."""
    return decode_groups(frames, 1, vocab_size, max_version)[0]


def _build(header: dict, lens: list, prompt, tokens, logprobs, versions) -> TrajectoryGroup:
    samples = []
    start = 0
    for n, reward, reason in zip(lens, header["rewards"], header["finish"]):
        end = start + n
        samples.append(Sample(tokens[start:end], logprobs[start:end], versions[start:end], float(reward), reason))
        start = end
    timings = header.get("timings", {})
    seed = header.get("seed", 0)
    return TrajectoryGroup(
        group_id=header["id"],
        prompt_tokens=prompt,
        samples=samples,
        task=str(header.get("task", "")),
        engine_id=str(header.get("engine", "")),
        seed=seed if type(seed) is int else 0,
        reference=str(header.get("ref", "")),
        timings={str(k): float(v) for k, v in timings.items() if isinstance(v, (int, float))}
        if isinstance(timings, dict)
        else {},
    )

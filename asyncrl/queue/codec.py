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
    # One copy per frame: concatenate writes straight into the buffer that becomes the frame.
    return [
        pack(_group_header(group)),
        np.ascontiguousarray(group.prompt_tokens, _TOKENS).data.cast("B"),
        _joined([s.tokens for s in samples], _TOKENS),
        _joined([s.behav_logprobs for s in samples], _FLOATS),
        _joined([s.versions for s in samples], _TOKENS),
    ]


def array_bytes(group: TrajectoryGroup) -> int:
    """Bytes of a group's 4 array frames (every sample has as many log-probs and versions as tokens)."""
    tokens = sum(len(s.tokens) for s in group.samples)
    return _TOKENS.itemsize * len(group.prompt_tokens) + (2 * _TOKENS.itemsize + _FLOATS.itemsize) * tokens


def group_parts(group: TrajectoryGroup) -> tuple[dict, list[tuple[np.dtype, list]]]:
    """A group's header and, for each of its 4 array frames, the dtype and the arrays laid end to end
    in it: for writers that place the frames themselves (a producer's arena, see shm.py)."""
    samples = group.samples
    return _group_header(group), [
        (_TOKENS, [group.prompt_tokens]),
        (_TOKENS, [s.tokens for s in samples]),
        (_FLOATS, [s.behav_logprobs for s in samples]),
        (_TOKENS, [s.versions for s in samples]),
    ]


def _group_header(group: TrajectoryGroup) -> dict:
    samples = group.samples
    return {
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
    return _parse_fields(unpack_header(bytes(frames[0])), *frames[1:])


def _parse_fields(header, prompt_frame, tokens_frame, logprobs_frame, versions_frame) -> tuple:
    """Check one group's decoded header against its four array buffers."""
    if not isinstance(header, dict):
        raise ProtocolError("bad_schema", f"a group header must be a msgpack map, got {type(header).__name__}")
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
    prompt_view = memoryview(prompt_frame)
    prompt = np.frombuffer(prompt_view, dtype=_TOKENS) if prompt_view.nbytes % 4 == 0 else None
    if prompt is None or len(prompt) == 0:
        raise ProtocolError("bad_frames", f"group {group_id}: prompt frame must hold at least one int32 token")
    total = sum(lens)
    tokens = _array(tokens_frame, _TOKENS, total, "tokens")
    logprobs = _array(logprobs_frame, _FLOATS, total, "behav_logprobs")
    versions = _array(versions_frame, _TOKENS, total, "versions")
    return header, lens, prompt, tokens, logprobs, versions


def _check_arrays(group_id: str, prompt, tokens, logprobs, versions, vocab_size, max_version) -> tuple[int, int]:
    """Check one group's arrays; returns its behaviour version (the oldest token's) and its newest token's."""
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
    return oldest, newest


_JOIN_LIMIT = 1 << 16
"""Joining copies; above this many tokens per message, per-group checks are cheaper than the copy."""


def _parse_many(frames: list, count: int, vocab_size: Optional[int], max_version: Optional[int]) -> list[tuple]:
    """Validate `count` groups laid end to end; returns each one's parsed parts plus its oldest and newest version."""
    per = 1 + GROUP_FRAMES
    if len(frames) != count * per:
        raise ProtocolError("bad_frames", f"{count} group(s) need {count * per} frames, got {len(frames)}")
    parsed = []
    for i in range(count):
        try:
            parsed.append(_parse_header(frames[i * per : (i + 1) * per]))
        except ProtocolError as exc:
            raise _where(exc, i, count) from None
    return _check_parsed(parsed, vocab_size, max_version)


def _split_packed(headers, plens, frames: list, count: int) -> list[tuple]:
    """Cut a packed batch (group headers, prompt lengths, 4 joined array frames) into per-group parts."""
    if not isinstance(headers, list) or not isinstance(plens, list) or len(headers) != count or len(plens) != count:
        raise ProtocolError("bad_schema", f"a packed batch of {count} group(s) needs 'headers' and 'plens' lists of {count}")
    if len(frames) != GROUP_FRAMES:
        raise ProtocolError("bad_frames", f"a packed batch is {GROUP_FRAMES} array frames after the header, got {len(frames)}")
    if not all(type(n) is int and n >= 1 for n in plens):
        raise ProtocolError("bad_schema", f"'plens' must be positive integers, got {plens!r:.200}")
    lens = [h.get("lens") if isinstance(h, dict) else None for h in headers]
    if not all(isinstance(x, list) and all(type(n) is int and n >= 1 for n in x) for x in lens):
        # Sizes first, so the cuts below are well defined; _parse_fields names the group and field.
        bad = next(i for i, x in enumerate(lens) if not (isinstance(x, list) and all(type(n) is int and n >= 1 for n in x)))
        try:
            _parse_fields(headers[bad], b"\0\0\0\0", b"", b"", b"")
        except ProtocolError as exc:
            raise _where(exc, bad, count) from None
        raise _where(ProtocolError("bad_schema", "lens must be a list of positive integers"), bad, count)
    totals = [sum(x) for x in lens]
    arrays = []
    for frame, dtype, width, name in zip(frames, (_TOKENS, _TOKENS, _FLOATS, _TOKENS), (sum(plens),) + (sum(totals),) * 3,
                                         ("prompts", "tokens", "behav_logprobs", "versions")):
        arrays.append(_array(frame, dtype, width, name))
    prompts, tokens, logprobs, versions = arrays
    parts, p, t = [], 0, 0
    for header, plen, total in zip(headers, plens, totals):
        p2, t2 = p + plen, t + total
        parts.append((header, prompts[p:p2], tokens[t:t2], logprobs[t:t2], versions[t:t2]))
        p, t = p2, t2
    return parts


def _plausible(header) -> bool:
    """The common case of _parse_fields's header checks, in a few C-level calls; False sends the
    group to _parse_fields, which finds and names the problem (or accepts a false alarm)."""
    try:
        gid, lens, rewards, finish = header["id"], header["lens"], header["rewards"], header["finish"]
        return (
            type(gid) is str and 0 < len(gid) <= 128 and type(lens) is list and type(rewards) is list
            and type(finish) is list and 0 < len(lens) == len(rewards) == len(finish)
            and _INT_ONLY.issuperset(map(type, lens)) and min(lens) >= 1
            and _NUMBER.issuperset(map(type, rewards)) and math.isfinite(sum(rewards))
            and _STR_ONLY.issuperset(map(type, finish)) and _FINISH.issuperset(finish)
        )
    except (KeyError, TypeError):
        return False


_INT_ONLY, _NUMBER, _STR_ONLY = frozenset([int]), frozenset([int, float]), frozenset([str])


def parse_packed(headers, plens, frames: list, count: int, vocab_size: Optional[int] = None,
                 max_version: Optional[int] = None, check: bool = True) -> list[tuple]:
    """Validate a packed batch: per group (header, lens, prompt, tokens, logprobs, versions, behaviour version,
    newest version)."""
    parts = _split_packed(headers, plens, frames, count)
    parsed = []
    for i, part in enumerate(parts):
        header = part[0]
        if _plausible(header):
            p, t, lp, v = part[1:]
            parsed.append((header, header["lens"], p, t, lp, v))
            continue
        try:
            parsed.append(_parse_fields(*part))
        except ProtocolError as exc:
            raise _where(exc, i, count) from None
    if not check:
        return [(*p, None, None) for p in parsed]
    return _check_parsed(parsed, vocab_size, max_version)


def encode_packed(groups: list[TrajectoryGroup]) -> tuple[list[dict], list[int], list]:
    """(group headers, prompt lengths, 4 joined array frames): a batch in 5 frames instead of 5 per group."""
    headers = [_group_header(g) for g in groups]
    plens = [int(len(g.prompt_tokens)) for g in groups]
    samples = [s for g in groups for s in g.samples]
    frames = [
        _joined([g.prompt_tokens for g in groups], _TOKENS),
        _joined([s.tokens for s in samples], _TOKENS),
        _joined([s.behav_logprobs for s in samples], _FLOATS),
        _joined([s.versions for s in samples], _TOKENS),
    ]
    return headers, plens, frames


def pack_arrays(headers: list[dict], groups_arrays: list[list]) -> tuple[list[dict], list[int], list[bytes]]:
    """Join already validated groups (their headers and 4 array frames each) into a packed batch."""
    plens = [len(a[0]) // 4 for a in groups_arrays]
    return headers, plens, [b"".join(a[k] for a in groups_arrays) for k in range(GROUP_FRAMES)]


def decode_packed(headers, plens, frames: list, count: int, vocab_size: Optional[int] = None,
                  max_version: Optional[int] = None, check: bool = True) -> list[TrajectoryGroup]:
    """Decode a packed batch; `check=False` trusts a sender that validated the arrays (the queue server)
    and checks only the headers and sizes."""
    return [_build(*p[:6]) for p in parse_packed(headers, plens, frames, count, vocab_size, max_version, check)]


def _check_parsed(parsed: list, vocab_size: Optional[int], max_version: Optional[int]) -> list[tuple]:
    """Array checks of parsed groups; returns each one's parts plus its behaviour (oldest) and newest version.

    For small groups the checks run once over all groups joined (a few numpy calls per message
    instead of a few per group, which is what makes small groups fast); only when that finds a
    problem are the groups checked one by one, to name the first bad one.
    """
    count = len(parsed)
    if count == 1 or sum(len(p[3]) for p in parsed) > _JOIN_LIMIT:
        checked = []
        for i, p in enumerate(parsed):
            try:
                checked.append((*p, *_check_arrays(p[0]["id"], *p[2:], vocab_size, max_version)))
            except ProtocolError as exc:
                raise _where(exc, i, count) from None
        return checked
    join = np.concatenate
    prompts, tokens, logprobs, versions = (join([p[k] for p in parsed]) for k in (2, 3, 4, 5))
    starts = np.cumsum([0] + [len(p[5]) for p in parsed[:-1]])
    try:
        oldest = np.minimum.reduceat(versions, starts).tolist()
        newest = np.maximum.reduceat(versions, starts).tolist()
        _check_arrays("", prompts, tokens, logprobs, versions, vocab_size, max_version)
    except ProtocolError:
        for i, p in enumerate(parsed):
            try:
                _check_arrays(p[0]["id"], *p[2:], vocab_size, max_version)
            except ProtocolError as exc:
                raise _where(exc, i, count) from None
        raise
    return [(*p, o, n) for p, o, n in zip(parsed, oldest, newest)]


def _where(exc: ProtocolError, index: int, count: int) -> ProtocolError:
    return ProtocolError(exc.code, f"group {index} of {count}: {exc}") if count > 1 else exc


def parse_groups(frames: list, count: int, vocab_size: Optional[int] = None, max_version: Optional[int] = None):
    """Validate `count` groups laid end to end: [(decoded group header, behaviour version, newest version)]."""
    return [(p[0], p[6], p[7]) for p in _parse_many(frames, count, vocab_size, max_version)]


def inspect_groups(frames: list, count: int, vocab_size: Optional[int] = None, max_version: Optional[int] = None):
    """Validate `count` groups as decode_groups does, without building them: [(group id, behaviour version)]."""
    return [(p[0]["id"], p[6]) for p in _parse_many(frames, count, vocab_size, max_version)]


def inspect_group(frames: list, vocab_size: Optional[int] = None, max_version: Optional[int] = None) -> tuple[str, int]:
    """Validate one group as decode_group does, without building it: (group id, behaviour version)."""
    return inspect_groups(frames, 1, vocab_size, max_version)[0]


def decode_groups(
    frames: list, count: int, vocab_size: Optional[int] = None, max_version: Optional[int] = None, check: bool = True
) -> list[TrajectoryGroup]:
    """Validate and decode `count` groups laid end to end (a batch reply, a batched put); `check=False`
    trusts a sender that validated the arrays (the queue server) and checks only headers and sizes."""
    per = 1 + GROUP_FRAMES
    if not check:
        if len(frames) != count * per:
            raise ProtocolError("bad_frames", f"{count} group(s) need {count * per} frames, got {len(frames)}")
        return [_build(*_parse_header(frames[i * per : (i + 1) * per])) for i in range(count)]
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

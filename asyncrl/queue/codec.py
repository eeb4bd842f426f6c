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
from itertools import accumulate, chain
from operator import attrgetter
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
        "lens": [len(s.tokens) for s in samples],
        "rewards": [float(s.reward) for s in samples],
        "finish": [s.finish_reason for s in samples],
    }


def _joined(arrays: list, dtype: np.dtype):
    """The arrays end to end as `dtype`, in one bytes-like object."""
    if not arrays:
        return memoryview(b"")
    try:
        if set(map(_DTYPE, arrays)) == {dtype}:
            # Already the wire's type: joining their bytes costs a third of concatenate for many small arrays.
            return b"".join(arrays)
    except (AttributeError, TypeError, BufferError):
        pass  # not all numpy arrays, or one is not contiguous
    return np.concatenate(arrays, dtype=dtype, casting="unsafe").data.cast("B")


_DTYPE = attrgetter("dtype")


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


def _check_header(header) -> tuple[str, list]:
    """Check one group's decoded header (not its arrays); returns (group id, lens)."""
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
    return group_id, lens


def _parse_fields(header, prompt_frame, tokens_frame, logprobs_frame, versions_frame) -> tuple:
    """Check one group's decoded header against its four array buffers."""
    group_id, lens = _check_header(header)
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


def _columns(headers: list) -> Optional[list]:
    """Every group header's required fields checked at once, in a few C-level passes over the whole batch
    rather than a few Python calls per group; returns each group's `lens`, or None when some header is not
    plainly valid (the caller then checks them one by one, which names the problem or finds a false alarm)."""
    try:
        ids = [h["id"] for h in headers]
        lens = [h["lens"] for h in headers]
        rewards = [h["rewards"] for h in headers]
        finish = [h["finish"] for h in headers]
    except (KeyError, TypeError, IndexError):
        return None
    if not (_STR_ONLY.issuperset(map(type, ids)) and _LIST_ONLY.issuperset(map(type, lens))
            and _LIST_ONLY.issuperset(map(type, rewards)) and _LIST_ONLY.issuperset(map(type, finish))):
        return None
    samples, id_chars = list(map(len, lens)), list(map(len, ids))
    if min(samples) < 1 or samples != list(map(len, rewards)) or samples != list(map(len, finish)):
        return None
    if min(id_chars) < 1 or max(id_chars) > 128:
        return None
    flat_lens, flat_rewards, flat_finish = (list(chain.from_iterable(x)) for x in (lens, rewards, finish))
    if not (_INT_ONLY.issuperset(map(type, flat_lens)) and min(flat_lens) >= 1
            and _NUMBER.issuperset(map(type, flat_rewards)) and math.isfinite(sum(flat_rewards))
            and _STR_ONLY.issuperset(map(type, flat_finish)) and _FINISH.issuperset(flat_finish)):
        return None
    return lens


_INT_ONLY, _NUMBER, _STR_ONLY, _LIST_ONLY = frozenset([int]), frozenset([int, float]), frozenset([str]), frozenset([list])
_FLOAT_ONLY = frozenset([float])


def parse_packed(headers, plens, frames: list, count: int, vocab_size: Optional[int] = None,
                 max_version: Optional[int] = None, check: bool = True) -> list[tuple]:
    """Validate a packed batch (group headers, prompt lengths, 4 joined array frames): per group (header,
    lens, prompt, tokens, logprobs, versions, behaviour version, newest version), the arrays views on the
    frames. The arrays are checked joined, as they arrived, with no copy; `check=False` (a consumer trusting
    the queue server) checks only the headers and sizes and leaves both versions None."""
    if not isinstance(headers, list) or not isinstance(plens, list) or len(headers) != count or len(plens) != count:
        raise ProtocolError("bad_schema", f"a packed batch of {count} group(s) needs 'headers' and 'plens' lists of {count}")
    if len(frames) != GROUP_FRAMES:
        raise ProtocolError("bad_frames", f"a packed batch is {GROUP_FRAMES} array frames after the header, got {len(frames)}")
    if not (_INT_ONLY.issuperset(map(type, plens)) and min(plens) >= 1):
        raise ProtocolError("bad_schema", f"'plens' must be positive integers, got {plens!r:.200}")
    lens = _columns(headers)
    if lens is None:
        lens = []
        for i, header in enumerate(headers):
            try:
                lens.append(_check_header(header)[1])
            except ProtocolError as exc:
                raise _where(exc, i, count) from None
    totals = list(map(sum, lens))
    p_ends, t_ends = list(accumulate(plens)), list(accumulate(totals))
    prompts = _array(frames[0], _TOKENS, p_ends[-1], "prompts")
    tokens = _array(frames[1], _TOKENS, t_ends[-1], "tokens")
    logprobs = _array(frames[2], _FLOATS, t_ends[-1], "behav_logprobs")
    versions = _array(frames[3], _TOKENS, t_ends[-1], "versions")
    parts = []
    p = t = 0
    for header, group_lens, p2, t2 in zip(headers, lens, p_ends, t_ends):
        parts.append((header, group_lens, prompts[p:p2], tokens[t:t2], logprobs[t:t2], versions[t:t2]))
        p, t = p2, t2
    if not check:
        return [(*part, None, None) for part in parts]
    try:
        _check_arrays("", prompts, tokens, logprobs, versions, vocab_size, max_version)
    except ProtocolError:
        _check_each(parts, vocab_size, max_version)  # names the first bad group
        raise
    starts = [0, *t_ends[:-1]]
    oldest = np.minimum.reduceat(versions, starts).tolist()
    newest = np.maximum.reduceat(versions, starts).tolist()
    return [(*part, o, n) for part, o, n in zip(parts, oldest, newest)]


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
    if len(parsed) == 1 or sum(len(p[3]) for p in parsed) > _JOIN_LIMIT:
        return _check_each(parsed, vocab_size, max_version)
    join = np.concatenate
    prompts, tokens, logprobs, versions = (join([p[k] for p in parsed]) for k in (2, 3, 4, 5))
    starts = np.cumsum([0] + [len(p[5]) for p in parsed[:-1]])
    try:
        oldest = np.minimum.reduceat(versions, starts).tolist()
        newest = np.maximum.reduceat(versions, starts).tolist()
        _check_arrays("", prompts, tokens, logprobs, versions, vocab_size, max_version)
    except ProtocolError:
        _check_each(parsed, vocab_size, max_version)  # names the first bad group
        raise
    return [(*p, o, n) for p, o, n in zip(parsed, oldest, newest)]


def _check_each(parsed: list, vocab_size: Optional[int], max_version: Optional[int]) -> list[tuple]:
    """Array checks group by group; the first bad group's error names it."""
    checked = []
    for i, p in enumerate(parsed):
        try:
            checked.append((*p, *_check_arrays(p[0]["id"], *p[2:], vocab_size, max_version)))
        except ProtocolError as exc:
            raise _where(exc, i, len(parsed)) from None
    return checked


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
    """A group from its checked header and arrays; samples are views on the arrays (no copy)."""
    if len(lens) == 1:  # no cut needed
        samples = [Sample(tokens, logprobs, versions, float(header["rewards"][0]), header["finish"][0])]
    else:
        samples = []
        start = 0
        for end, reward, reason in zip(accumulate(lens), header["rewards"], header["finish"]):
            samples.append(Sample(tokens[start:end], logprobs[start:end], versions[start:end], float(reward), reason))
            start = end
    get = header.get
    task, engine, ref, seed, timings = get("task", ""), get("engine", ""), get("ref", ""), get("seed", 0), get("timings")
    if type(timings) is not dict:
        timings = {}
    elif not (_STR_ONLY.issuperset(map(type, timings)) and _FLOAT_ONLY.issuperset(map(type, timings.values()))):
        timings = {str(k): float(v) for k, v in timings.items() if isinstance(v, (int, float))}
    return TrajectoryGroup(
        header["id"], prompt, samples,
        task if type(task) is str else str(task),
        engine if type(engine) is str else str(engine),
        seed if type(seed) is int else 0,
        ref if type(ref) is str else str(ref),
        timings,  # a dict of its own, fresh from msgpack
    )

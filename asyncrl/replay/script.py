"""The replay mirror's write script and the records it takes (mirror.py's writer calls it).

One Lua call writes a whole batch of records: the groups' hashes and events, the indexes, the
counters and retention (docs/replay.md has the key layout). `reject_args` and `group_args` turn
the mirror's records into the script's msgpack records. Must never touch a socket.
"""

from __future__ import annotations

import json

from asyncrl.protocol import FINISH_REASONS
from asyncrl.queue.codec import unpack_header
from asyncrl.replay.store import FRAME_FIELDS

# Writes one batch of records in one call, so a batch costs one command to pack and one reply to
# read whatever it holds. ARGV: now, lost, maxlen, max_bytes, group key prefix, run, the records as
# one msgpack array (decoded by Redis's built-in cmsgpack: packing it is one C call, where an argument
# per field costs the writer's Python far more than Redis), then the array frames of groups that keep
# them. A record is
#   ['r', code, detail, learner_version, ts]                                       (a reject)
#   ['g', kind, gid, kept, nbytes, nstatus, fields, event, frames]                  (a group)
# fields being the group hash's field/value pairs as one flat array, its first nstatus items the
# status (all a later record of the group changes unless it carries arrays), event the event's
# pairs after kind and group, frames how many frame arguments (named FRAME_FIELDS[2..]) complete
# the fields. Redis's time goes mostly to the fields it stores (about 0.6 us a pair here), so the
# event holds only what `tail` needs to follow a run, and the script copies no field lists.
# A group is indexed the first time it is written; a later record of it (a drop of an accepted
# group) updates its status, and its content only if it carries arrays. Then the oldest groups
# are deleted while the run is over its group or byte limit. Group keys are built inside the
# script, so the layout needs a single Redis, not a cluster.
WRITE_BATCH = """
local meta, by_seq, events, drops, rejects, runs = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local now, maxlen, max_bytes, prefix = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local frame_names = {%s}
local records = cmsgpack.unpack(ARGV[7])
local at = 8
local count = {accept = 0, drop = 0, reject = 0, skipped = 0}
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
local bytes = tonumber(redis.call('HGET', meta, 'bytes') or '0')
-- New groups' arrival numbers, added with one ZADD for the whole batch.
local seqs = {}
for _, rec in ipairs(records) do
  if rec[1] == 'r' then
    local code = rec[2]
    redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'kind', 'reject', 'reason', code, 'detail', rec[3],
               'learner_version', rec[4], 'ts', rec[5])
    redis.call('HINCRBY', rejects, code, 1)
    count.reject = count.reject + 1
  else
    local kind, gid, kept, nbytes, nstatus, fields, event = rec[2], rec[3], rec[4], rec[5], rec[6], rec[7], rec[8]
    for j = 1, rec[9] do
      fields[#fields + 1] = frame_names[j]
      fields[#fields + 1] = ARGV[at]
      at = at + 1
    end
    local key = prefix .. gid
    if redis.call('EXISTS', key) == 0 then
      seq = seq + 1
      redis.call('HSET', key, 'seq', seq, unpack(fields))
      local n = #seqs
      seqs[n + 1], seqs[n + 2] = seq, gid
      bytes = bytes + nbytes
    elseif kept == 1 then
      redis.call('HSET', key, unpack(fields))
    else
      redis.call('HSET', key, unpack(fields, 1, nstatus))
    end
    redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'kind', kind, 'group', gid, unpack(event))
    if kind == 'drop' then redis.call('HINCRBY', drops, fields[4], 1) end
    count[kind] = count[kind] + 1
    if kept == 0 then count.skipped = count.skipped + 1 end
  end
end
if #seqs > 0 then
  redis.call('ZADD', by_seq, unpack(seqs))
end
if count.accept > 0 then redis.call('HINCRBY', meta, 'accepted', count.accept) end
if count.drop > 0 then redis.call('HINCRBY', meta, 'dropped', count.drop) end
if count.reject > 0 then redis.call('HINCRBY', meta, 'rejected', count.reject) end
if count.skipped > 0 then redis.call('HINCRBY', meta, 'arrays_skipped', count.skipped) end
-- Retention: the oldest groups go, a chunk at a time (one command per chunk, not per group).
local n = redis.call('ZCARD', by_seq)
local trimmed = 0
while n > maxlen or (bytes > max_bytes and n > 1) do
  local take = math.min(math.max(n - maxlen, 1), 512)
  local popped = redis.call('ZPOPMIN', by_seq, take)
  local gkeys = {}
  for j = 1, #popped, 2 do
    local gid = popped[j]
    gkeys[#gkeys + 1] = prefix .. gid
    bytes = bytes - tonumber(redis.call('HGET', prefix .. gid, 'nbytes') or '0')
  end
  redis.call('UNLINK', unpack(gkeys))
  n = n - #gkeys
  trimmed = trimmed + #gkeys
end
if trimmed > 0 then redis.call('HINCRBY', meta, 'trimmed', trimmed) end
redis.call('HSET', meta, 'seq', seq, 'bytes', bytes, 'last_ts', now, 'lost', ARGV[2])
redis.call('ZADD', runs, now, ARGV[6])
return n
""" % ", ".join(f"'{name}'" for name in FRAME_FIELDS[1:])


def reject_args(record: tuple) -> list:
    _, _, code, detail, learner_version, ts, _, _ = record
    return ["r", code, detail, learner_version, repr(ts)]


def group_args(record: tuple, frames: list) -> list:
    """A group record as WRITE_BATCH takes it: its hash fields (docs/replay.md) and its event; its array
    frames, if it keeps them, are appended to `frames`. Runs once per record in the writer process, at
    the queue's rate: the list fields are joined as strings (json.dumps of each cost most of the time)."""
    kind, gid, reason, payload, learner_version, ts, version, max_version = record
    header_bytes = bytes(payload[0])
    header = unpack_header(header_bytes)
    lens, rewards, finish = header["lens"], header["rewards"], header["finish"]
    reward = repr(float(sum(rewards) / len(rewards)))
    nbytes = sum(map(len, payload))
    kept = len(payload) == len(FRAME_FIELDS)
    staleness = max(0, learner_version - version)
    ts = repr(ts)
    timings = header.get("timings")
    fields = [
        # the status: what a drop of an accepted group changes
        "status", "dropped" if kind == "drop" else "accepted", "reason", reason, "learner_version", learner_version,
        "staleness", staleness, "ts" if kind == "accept" else "dropped_ts", ts,
        # the content
        "version", version,
        "max_version", max_version,
        "reward", reward,
        "samples", len(lens),
        "tokens", sum(lens),
        "task", str(header.get("task", "")),
        "engine", str(header.get("engine", "")),
        "nbytes", nbytes,
        "rewards", _numbers(rewards),
        "lens", _numbers(lens),
        "finish", '["' + '","'.join(finish) + '"]' if _FINISH.issuperset(finish) else _json(finish),
        "seed", str(int(header.get("seed", 0))),  # a string: Lua numbers are doubles, seeds may be 64-bit
        "ref", str(header.get("ref", "")),
        "timings", _json(timings) if timings else "{}",
        "arrays", "kept" if kept else "skipped",
    ]
    if kept:
        fields += [FRAME_FIELDS[0], header_bytes]
        frames.extend(map(memoryview, payload[1:]))
    event = ["version", version, "staleness", staleness, "reward", reward]
    if reason:
        event += ["reason", reason]
    return ["g", kind, gid, 1 if kept else 0, nbytes, _STATUS_ITEMS, fields, event, len(payload) - 1]


def _numbers(values: list) -> str:
    """Compact JSON of a list of ints and finite floats (what the queue admits for lens and rewards):
    repr is what json.dumps writes for each."""
    return "[" + ",".join(map(repr, values)) + "]"


_FINISH = frozenset(FINISH_REASONS)
_STATUS_ITEMS = 10
"""The status's items at the head of a group record's fields (status, reason, learner_version, staleness, ts)."""
_json = json.JSONEncoder(separators=(",", ":")).encode
"""Compact JSON for the list fields: Redis keeps a small hash compact while its values stay short."""

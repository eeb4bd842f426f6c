"""The Redis key layout of the replay mirror and everything that reads or deletes it.

Owns key names (docs/replay.md documents them for plain `redis-cli`), the connection settings
(AUTH and TLS come from the URL; reconnects use redis-py's Retry with exponential backoff), the
summary fields stored with each group, and the queries behind `asyncrl replay`. Writing belongs
to `mirror.py`. Must never be imported by `queue/`: Redis is an optional dependency.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from asyncrl.protocol import TrajectoryGroup
from asyncrl.queue.codec import decode_group

PREFIX = "asyncrl"
RUNS_KEY = f"{PREFIX}:runs"
"""ZSET: run name -> unix time of its last write."""

FRAME_FIELDS = ("frame.header", "frame.prompt", "frame.tokens", "frame.behav_logprobs", "frame.versions")
"""Group hash fields holding the group's wire frames, in wire order (asyncrl.queue.codec)."""
PROX_FIELD = "frame.prox_logprobs"
"""Optional float32 frame a learner may add: proximal log-probs, from which `show` prints importance weights."""

SUMMARY_FIELDS = (
    "status", "reason", "seq", "version", "max_version", "learner_version", "staleness", "reward",
    "samples", "tokens", "task", "engine", "ts", "nbytes", "lens", "arrays",
)
"""Plain-text group hash fields that `ls`, `stats` and `export` read without the frames."""

_NUMBERS = {"seq": int, "version": int, "max_version": int, "learner_version": int, "staleness": int,
            "samples": int, "tokens": int, "nbytes": int, "reward": float, "ts": float}


_EVENT_DETAILS = ("samples", "task", "engine")
"""Group hash fields an event is completed with for reading (the stream holds only kind, group,
version, staleness, reward and a drop's reason); none of them changes after the group arrives."""


class ReplayError(RuntimeError):
    """A replay query that cannot be answered; the message says what to do."""


class ArraysNotKept(ReplayError):
    """The group was mirrored without its arrays (beyond replay.array_mib_per_s); `summary` is what is kept."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class RunKeys:
    """Every key of one run: `asyncrl:run:<run>` and its children."""

    run: str

    @property
    def base(self) -> str:
        return f"{PREFIX}:run:{self.run}"

    @property
    def meta(self) -> str:
        return self.base

    @property
    def events(self) -> str:
        return f"{self.base}:events"

    @property
    def by_seq(self) -> str:
        return f"{self.base}:by_seq"

    @property
    def drops(self) -> str:
        return f"{self.base}:drops"

    @property
    def rejects(self) -> str:
        return f"{self.base}:rejects"

    @property
    def group_prefix(self) -> str:
        return f"{self.base}:group:"

    def group(self, group_id: str) -> str:
        return self.group_prefix + group_id

    def pattern(self) -> str:
        """SCAN pattern matching every child key, with the run name's glob characters escaped."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.base) + ":*"


def redact(url: str) -> str:
    """The URL with its password (and a TLS key's `ssl_password`) replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    if "ssl_password=" in parts.query:
        parts = parts._replace(query=re.sub(r"(^|&)ssl_password=[^&]*", r"\1ssl_password=***", parts.query))
    return urlunsplit(parts)


def connection_hint(url: str, error: str) -> str:
    """What to do about `error`, a failure to reach the Redis at `url`."""
    if "CERTIFICATE_VERIFY_FAILED" in error:
        return ("the server's TLS certificate was not verified; name the CA that signed it in the URL: "
                "rediss://host:port/db?ssl_ca_certs=/path/ca.pem")
    if urlsplit(url).scheme == "rediss":
        return ("is that port serving TLS? TLS settings go in the URL: ssl_ca_certs=/path/ca.pem, and "
                "ssl_certfile=/path/cert.pem&ssl_keyfile=/path/key.pem where the server demands a client certificate")
    return "is redis-server running? pass --url or set ASYNCRL_REPLAY_URL"


def connect(url: str, socket_timeout: float = 5.0, retries: int = 3) -> redis.Redis:
    """A client for `url` (redis://user:pass@host:port/db, rediss:// for TLS, unix:// sockets).

    Connection errors are retried `retries` times with exponential backoff by redis-py itself, and
    a dropped connection is re-established on the next command, so callers never loop by hand.
    """
    try:
        return redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=min(socket_timeout, 2.0),
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            health_check_interval=30,
        )
    except ValueError as exc:
        raise ReplayError(
            f"replay URL {redact(url)!r} is not a Redis URL ({exc}); use redis://[user:pass@]host:port/db or rediss://"
        ) from None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))


def parse_summary(values: Iterable) -> Optional[dict]:
    """SUMMARY_FIELDS values (HMGET order) as a typed dict; None when the group is gone (trimmed)."""
    values = list(values)
    if values[0] is None:
        return None
    out = {}
    for name, raw in zip(SUMMARY_FIELDS, values):
        text = _text(raw)
        if name == "lens":
            out[name] = json.loads(text) if text else []
        elif name in _NUMBERS:
            out[name] = _NUMBERS[name](text) if text != "" else None
        else:
            out[name] = text
    return out


class ReplayStore:
    """Read and delete access to what the mirror wrote; one instance per Redis."""

    def __init__(self, client: redis.Redis, url: str = ""):
        self.r = client
        self.url = url

    @classmethod
    def open(cls, url: str) -> "ReplayStore":
        store = cls(connect(url, retries=1), url)
        try:
            store.r.ping()
        except redis.AuthenticationError as exc:
            raise ReplayError(
                f"Redis at {redact(url)} refused the credentials: {exc}; put them in the URL: redis://[user]:PASSWORD@host:port/db"
            ) from None
        except redis.ResponseError as exc:
            raise ReplayError(
                f"Redis at {redact(url)} answered {exc}; put the password in the URL: redis://[user]:PASSWORD@host:port/db"
            ) from None
        except redis.RedisError as exc:
            raise ReplayError(
                f"cannot reach Redis at {redact(url)}: {exc}; {connection_hint(url, str(exc))}"
            ) from None
        return store

    # -- runs -------------------------------------------------------------------------------

    def runs(self) -> list[str]:
        """Run names, most recently written first."""
        return [_text(name) for name in self.r.zrevrange(RUNS_KEY, 0, -1)]

    def resolve_run(self, run: Optional[str]) -> str:
        names = self.runs()
        if run is not None:
            if run not in names:
                raise ReplayError(f"run {run!r} is not stored in {redact(self.url)}; stored runs: {names}")
            return run
        if len(names) == 1:
            return names[0]
        if not names:
            raise ReplayError(f"no runs are stored in {redact(self.url)}; set replay.redis_url in the run's config")
        raise ReplayError(f"{len(names)} runs are stored ({', '.join(names)}); pass --run NAME")

    def run_info(self, run: str) -> dict:
        keys = RunKeys(run)
        meta = {_text(k): _text(v) for k, v in self.r.hgetall(keys.meta).items()}
        info = {
            "run": run,
            "groups": self.r.zcard(keys.by_seq),
            "events": self.r.xlen(keys.events) if self.r.exists(keys.events) else 0,
            "bytes": int(meta.get("bytes") or 0),
            "first_ts": float(meta.get("first_ts") or 0.0),
            "last_ts": float(meta.get("last_ts") or 0.0),
            "task": meta.get("task", ""),
            "tokenizer": meta.get("tokenizer", ""),
        }
        for name in ("accepted", "dropped", "rejected", "lost", "trimmed", "arrays_skipped"):
            info[name] = int(meta.get(name) or 0)
        return info

    def run_config(self, run: str) -> Optional[dict]:
        raw = self.r.hget(RunKeys(run).meta, "config")
        return json.loads(raw) if raw else None

    def delete_run(self, run: str) -> int:
        """Delete every key of `run`; returns how many keys went."""
        keys = RunKeys(run)
        deleted = 0
        batch: list = [keys.meta]
        for key in self.r.scan_iter(match=keys.pattern(), count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += self.r.unlink(*batch)
                batch = []
        if batch:
            deleted += self.r.unlink(*batch)
        self.r.zrem(RUNS_KEY, run)
        return deleted

    # -- groups -----------------------------------------------------------------------------

    def group_ids(self, run: str) -> list[str]:
        """The stored groups' ids in arrival order. Filters read the groups' summaries: an index per
        filtered field would cost the mirror Redis time for every group at the queue's rate."""
        return [_text(g) for g in self.r.zrange(RunKeys(run).by_seq, 0, -1)]

    def summaries(self, run: str, ids: list[str], chunk: int = 500) -> Iterator[dict]:
        """Summary dicts (with 'id') of the groups still stored, in the order of `ids`."""
        keys = RunKeys(run)
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            pipe = self.r.pipeline(transaction=False)
            for gid in part:
                pipe.hmget(keys.group(gid), SUMMARY_FIELDS)
            for gid, values in zip(part, pipe.execute()):
                summary = parse_summary(values)
                if summary is not None:
                    summary["id"] = gid
                    yield summary

    def find_group(self, group_id: str, run: Optional[str] = None) -> tuple[str, str]:
        """(run, full id) of a group id or unique id prefix, searched in `run` or every run."""
        runs = [run] if run is not None else self.runs()
        matches = []
        for name in runs:
            keys = RunKeys(name)
            if self.r.exists(keys.group(group_id)):
                return name, group_id
            escaped = re.sub(r"([*?\[\]\\])", r"\\\1", group_id)
            matches += [(name, _text(m)) for m, _ in self.r.zscan_iter(keys.by_seq, match=escaped + "*", count=1000)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            where = f"run {run!r}" if run else f"any of the {len(runs)} stored runs"
            raise ReplayError(f"group {group_id!r} is not in {where}; `asyncrl replay ls` lists the stored groups")
        raise ReplayError(f"group id prefix {group_id!r} matches {len(matches)} groups; give more characters")

    def load_group(self, run: str, group_id: str) -> tuple[TrajectoryGroup, dict, Optional[bytes]]:
        """(group, summary, proximal log-probs frame or None) of one stored group."""
        key = RunKeys(run).group(group_id)
        values = self.r.hmget(key, [*FRAME_FIELDS, PROX_FIELD, *SUMMARY_FIELDS])
        frames, prox, rest = values[: len(FRAME_FIELDS)], values[len(FRAME_FIELDS)], values[len(FRAME_FIELDS) + 1 :]
        summary = parse_summary(rest)
        if summary is None:
            raise ReplayError(f"group {group_id!r} of run {run!r} is no longer stored (trimmed by retention or deleted)")
        summary["id"] = group_id
        if any(f is None for f in frames):
            raise ArraysNotKept(f"group {group_id!r} of run {run!r} was mirrored without its tokens and log-probs "
                                "(its arrays were beyond replay.array_mib_per_s); `asyncrl replay ls` shows its summary", summary)
        return decode_group(frames), summary, prox

    def counts(self, run: str) -> tuple[dict[str, int], dict[str, int]]:
        """(drops by reason, rejects by code) over the run's whole life, trimmed groups included."""
        keys = RunKeys(run)
        drops = {_text(k): int(v) for k, v in self.r.hgetall(keys.drops).items()}
        rejects = {_text(k): int(v) for k, v in self.r.hgetall(keys.rejects).items()}
        return drops, rejects

    def events(self, run: str, start: str = "-", end: str = "+", count: Optional[int] = None,
               reverse: bool = False) -> list[tuple[str, dict]]:
        keys = RunKeys(run)
        raw = (self.r.xrevrange(keys.events, end, start, count=count) if reverse
               else self.r.xrange(keys.events, start, end, count=count))
        return self._completed(run, raw)

    def follow(self, run: str, last_id: str, block_ms: int) -> list[tuple[str, dict]]:
        """Events after `last_id`, waiting up to `block_ms` for the first one."""
        reply = self.r.xread({RunKeys(run).events: last_id}, block=block_ms, count=100)
        return self._completed(run, [entry for _, entries in reply or [] for entry in entries])

    def _completed(self, run: str, raw: list) -> list[tuple[str, dict]]:
        """Stream entries as (id, fields), a group's event completed from its hash (`samples`, `task`,
        `engine`, while the group is stored) and with its own `learner_version` (version + staleness:
        the hash's is overwritten by a later drop), and every event given `ts` (a group's event has
        none: its entry id is the time Redis wrote it)."""
        events = [(_text(eid), {_text(k): _text(v) for k, v in fields.items()}) for eid, fields in raw]
        groups = [e for _, e in events if "group" in e and "task" not in e]
        if groups:
            pipe = self.r.pipeline(transaction=False)
            for e in groups:
                pipe.hmget(RunKeys(run).group(e["group"]), _EVENT_DETAILS)
            for e, values in zip(groups, pipe.execute()):
                e.update({k: _text(v) for k, v in zip(_EVENT_DETAILS, values) if v is not None})
        for eid, e in events:
            e.setdefault("ts", repr(int(eid.split("-")[0]) / 1000))
            if "group" in e and "learner_version" not in e and "version" in e and "staleness" in e:
                e["learner_version"] = str(int(e["version"]) + int(e["staleness"]))
        return events
